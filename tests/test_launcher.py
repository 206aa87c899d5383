"""The Triton launcher against a real ``tritonserver`` and a throwaway Python-backend model."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import instgenie_server
from instgenie_server import triton_install
from instgenie_protocol import sample_sum
from instgenie_server.launcher import (
    ServerStartError,
    TritonServer,
    add_serve_command,
    backend_directory,
    free_port,
    models_with_parameter,
    render_repository,
    serve_parameters,
    server_environment,
    set_config_parameters,
)

CONFIG = """\
name: "identity"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_STRING dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "model_dir" value: { string_value: "" } }
parameters: {
  key: "busy"
  value: { string_value: "0" }
}
"""

# Records its parameters on load and a marker on unload (in model_dir, when set), and
# exports the drain gauge: ``busy`` until the first request.
MODEL = """\
import json
import os

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.model_dir = params["model_dir"]
        # The family must outlive its metrics: keep it on self.
        self.family = pb_utils.MetricFamily(
            name="instgenie_active_requests", description="test gauge", kind=pb_utils.MetricFamily.GAUGE
        )
        self.active = self.family.Metric(labels={"instance": args["model_instance_name"]})
        self.active.set(float(params["busy"]))
        if self.model_dir:
            with open(os.path.join(self.model_dir, "initialized.json"), "w") as f:
                json.dump(params, f)

    def execute(self, requests):
        self.active.set(0.0)
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT", pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy())]
            )
            for r in requests
        ]

    def finalize(self):
        if self.model_dir:
            open(os.path.join(self.model_dir, "finalized"), "w").close()
"""


def write_repository(root: Path) -> Path:
    """A model repository with one Python-backend identity model (BYTES in, BYTES out)."""
    (root / "identity" / "1").mkdir(parents=True)
    (root / "identity" / "config.pbtxt").write_text(CONFIG)
    (root / "identity" / "1" / "model.py").write_text(MODEL)
    (root / "identity" / "1" / "__pycache__").mkdir()
    (root / "identity" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"stale")
    return root


@pytest.fixture
def triton_repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "source")


def render(source: Path, tmp_path: Path, **parameters: str) -> Path:
    """``source`` rendered into ``tmp_path/repo`` with ``parameters`` set on the identity model."""
    return render_repository(source, tmp_path / "repo", {"identity": parameters})


def infer(server: TritonServer, values: list[bytes]) -> list[bytes]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        tensor = httpclient.InferInput("INPUT", [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object))
        return list(client.infer("identity", [tensor]).as_numpy("OUTPUT"))
    finally:
        client.close()  # an open keep-alive connection holds up Triton's shutdown


def group_is_gone(pgid: int) -> bool:
    """No process (zombies aside) is left in the process group ``pgid``, checked via ``ps``."""
    table = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return not any(
        int(pg) == pgid and not stat.startswith("Z") for pg, stat in (row.split() for row in table.splitlines())
    )


def group_members(pgid: int) -> list[int]:
    table = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = (row.split() for row in table.splitlines())
    return [int(pid) for pid, pg, stat in rows if int(pg) == pgid and not stat.startswith("Z")]


def shm_regions(server: TritonServer) -> list[Path]:
    return list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


# --- units -------------------------------------------------------------------------


def test_render_repository_replaces_and_adds_parameters(triton_repository: Path, tmp_path: Path) -> None:
    dest = render(triton_repository, tmp_path, model_dir='/m "x"\\y', busy="1", device="cpu")

    config = (dest / "identity" / "config.pbtxt").read_text()
    assert 'key: "model_dir" value: { string_value: "/m \\"x\\"\\\\y" }' in config
    assert 'string_value: "1"' in config and 'string_value: "0"' not in config  # the multi-line entry too
    assert config.count('key: "device"') == 1 and config.rstrip().endswith('value: { string_value: "cpu" }\n}')
    assert (dest / "identity" / "1" / "model.py").read_text() == MODEL
    assert not list(dest.rglob("__pycache__"))
    assert (triton_repository / "identity" / "config.pbtxt").read_text() == CONFIG  # source untouched
    assert models_with_parameter(dest, "model_dir") == ["identity"]
    assert models_with_parameter(dest, "nope") == []


def test_render_repository_refuses_unknown_models_and_full_destinations(
    triton_repository: Path, tmp_path: Path
) -> None:
    with pytest.raises(KeyError, match="typo"):
        render_repository(triton_repository, tmp_path / "a", {"typo": {"k": "v"}})
    with pytest.raises(FileExistsError):
        render_repository(triton_repository, triton_repository)


def test_set_config_parameters_is_stable() -> None:
    once = set_config_parameters(CONFIG, {"device": "cuda:0", "model_dir": "/a"})
    assert set_config_parameters(once, {"device": "cuda:0", "model_dir": "/a"}) == once


def test_gauge_sum_sums_label_sets() -> None:
    text = (
        "# HELP instgenie_active_requests x\n"
        'instgenie_active_requests{instance="a b}"} 2\n'
        'instgenie_active_requests{instance="c"} 1.5\n'
        "instgenie_active_requests_total 7\n"
        "instgenie_waiting_requests 3\n"
    )
    assert sample_sum(text, "instgenie_active_requests") == 3.5
    assert sample_sum(text, "instgenie_waiting_requests") == 3
    assert sample_sum(text, "absent") == 0


def test_backend_directory_is_idempotent(tmp_path: Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for _ in range(2):
        python = backend_directory(tmp_path) / "python"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    stub = python / "triton_python_backend_stub"
    assert stub.resolve().parent.name == version and os.access(stub, os.X_OK)


def test_server_environment_puts_this_interpreter_first() -> None:
    env = server_environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"] == f"{os.path.dirname(sys.executable)}:/usr/bin"
    libs = env["LD_LIBRARY_PATH"].split(":")
    assert libs[0].endswith("nvidia_pytriton.libs") and Path(libs[0]).is_dir()
    assert libs[1:] == [sysconfig.get_config_var("LIBDIR"), "/opt/lib"]


def test_server_environment_keeps_freed_memory_for_the_next_step_unless_told_otherwise() -> None:
    # The stubs' models run on threads whose glibc arenas otherwise give every step's
    # activations back to the system and fault them in again (docs/benchmarks/serving.md).
    assert server_environment({"PATH": "/usr/bin"})["GLIBC_TUNABLES"] == triton_install.STUB_MALLOC_TUNABLES
    assert "glibc.malloc.trim_threshold=" in triton_install.STUB_MALLOC_TUNABLES
    assert "glibc.malloc.mmap_threshold=" in triton_install.STUB_MALLOC_TUNABLES
    mine = "glibc.malloc.arena_max=2"
    assert server_environment({"PATH": "/usr/bin", "GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"] == mine


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


# --- a system Triton install ($INSTGENIE_TRITON_HOME) --------------------------------

# Stands in for an NGC image's /opt/tritonserver/bin/tritonserver: records how it was run.
FAKE_TRITONSERVER = """\
#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/args"
env > "$(dirname "$0")/env"
"""


@pytest.fixture
def triton_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Triton install tree with a recording ``bin/tritonserver``, set as ``$INSTGENIE_TRITON_HOME``;
    the wheel is made unreachable, so any use of it fails the test."""
    home = tmp_path / "tritonserver"
    (home / "bin").mkdir(parents=True)
    (home / "backends" / "python").mkdir(parents=True)
    binary = home / "bin" / "tritonserver"
    binary.write_text(FAKE_TRITONSERVER)
    binary.chmod(0o755)
    monkeypatch.setenv("INSTGENIE_TRITON_HOME", str(home))

    def no_wheel() -> Path:
        raise AssertionError("the nvidia-pytriton wheel was used despite $INSTGENIE_TRITON_HOME")

    monkeypatch.setattr(triton_install, "pytriton_dir", no_wheel)
    return home


def test_triton_home_runs_its_own_server_and_backends(
    triton_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/cuda/compat/lib")
    server = TritonServer(tmp_path / "repo", log_file=tmp_path / "triton.log")
    server.start()
    deadline = time.monotonic() + 10
    while server.alive() and time.monotonic() < deadline:  # the stand-in records and exits
        time.sleep(0.05)
    assert server.stop(drain_timeout_s=0) == 0
    args = (triton_home / "bin" / "args").read_text().splitlines()
    assert f"--backend-directory={triton_home / 'backends'}" in args
    assert f"--model-repository={tmp_path / 'repo'}" in args
    # Triton listens on private loopback ports; the public one is the launcher's front.
    assert f"--grpc-port={server.private_ports['grpc']}" in args and "--grpc-address=127.0.0.1" in args
    env = dict(line.split("=", 1) for line in (triton_home / "bin" / "env").read_text().splitlines() if "=" in line)
    assert env["LD_LIBRARY_PATH"] == "/usr/local/cuda/compat/lib"
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)


def test_triton_home_leaves_library_path_alone(triton_home: Path) -> None:
    env = server_environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/usr/local/cuda/compat/lib:/opt/lib"})
    assert env["LD_LIBRARY_PATH"] == "/usr/local/cuda/compat/lib:/opt/lib"  # the image's order, compat first
    assert env["PATH"] == f"{os.path.dirname(sys.executable)}:/usr/bin"  # models still run with this Python


def test_triton_home_without_a_server_binary_fails_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSTGENIE_TRITON_HOME", str(tmp_path))
    server = TritonServer(tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match="INSTGENIE_TRITON_HOME=.* has no bin/tritonserver"):
        server.start()
    assert server.pid is None and server.log_file is None  # nothing started, no temporary folder made


# --- a real server -----------------------------------------------------------------


def test_server_serves_and_stops_cleanly(triton_repository: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    server = TritonServer(render(triton_repository, tmp_path, model_dir=str(marks)), log_file=tmp_path / "triton.log")
    with server:
        assert server.alive()
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
        assert server.metrics_url == f"http://127.0.0.1:{server.metrics_port}/metrics"
        assert infer(server, [b"a", b"\x00bc"]) == [b"a", b"\x00bc"]
        assert shm_regions(server)  # the prefix really names this server's regions
        pgid = server.pid
        assert pgid is not None and not group_is_gone(pgid)  # the check below can see the group
        # The stubs inherit the allocator settings. (ld.so parses GLIBC_TUNABLES in place
        # on the initial stack, which /proc shows cut at the first separator.)
        first = f"GLIBC_TUNABLES={triton_install.STUB_MALLOC_TUNABLES.split(':')[0]}".encode()
        stubs = [pid for pid in group_members(pgid) if pid != pgid]
        assert stubs and all(
            any(entry.startswith(first) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")) for pid in stubs
        )
    assert server._process is not None and server._process.returncode == 0  # Triton's own clean exit
    assert (marks / "finalized").exists()  # SIGTERM to the server alone: models unloaded
    assert group_is_gone(pgid)
    assert not shm_regions(server)
    assert server.stop() == 0  # idempotent
    assert "successfully unloaded 'identity'" in (tmp_path / "triton.log").read_text()


def test_drain_waits_for_the_gauges(triton_repository: Path, tmp_path: Path) -> None:
    with TritonServer(render(triton_repository, tmp_path, busy="1")) as server:
        started = time.monotonic()
        assert server.drain(0.6) is False
        assert time.monotonic() - started >= 0.6
        infer(server, [b"x"])  # execute() sets the gauge to 0
        assert server.drain(5.0) is True


def test_stop_kills_a_server_that_ignores_sigterm(triton_repository: Path, tmp_path: Path) -> None:
    server = TritonServer(render(triton_repository, tmp_path), exit_timeout_s=60)
    with server:
        # An idle keep-alive connection makes Triton wait out its whole exit timeout.
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port)
        connection.request("GET", "/v2/health/ready")
        assert connection.getresponse().read() == b""
        pgid = server.pid
        started = time.monotonic()
        assert server.stop(drain_timeout_s=0, term_timeout_s=1.0) == -signal.SIGKILL
        assert time.monotonic() - started < 5
    connection.close()
    assert group_is_gone(pgid)
    assert not shm_regions(server)
    assert not server.alive()


def test_start_failure_raises_with_the_log(tmp_path: Path) -> None:
    started = time.monotonic()
    server = TritonServer(tmp_path / "missing")
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 1.*failed to stat file .*missing"), server:
        pass
    assert time.monotonic() - started < 10


def test_start_refuses_a_busy_port(triton_repository: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = TritonServer(triton_repository, http_port=sock.getsockname()[1])
        with pytest.raises(ServerStartError, match="already in use"):
            server.start()
    assert server.pid is None


# --- the serve command -------------------------------------------------------------


def test_serve_command_sets_run() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--max-active", "3"])
    assert callable(args.run) and args.max_active == 3 and args.http_port == 8000


def test_the_cache_mode_examples_in_the_help_are_modes_the_model_accepts() -> None:
    import argparse

    from instgenie.cache import CacheMode

    parser = argparse.ArgumentParser()
    serve = add_serve_command(parser.add_subparsers(dest="command"))
    (action,) = [a for a in serve._actions if "--cache-mode" in a.option_strings]
    examples = action.help.split("e.g. ", 1)[1].split(" (", 1)[0].split(" or ")
    assert len(examples) >= 2
    for example in examples:
        CacheMode.parse(example)  # raises on a mode the server would refuse at load


def test_serve_sets_cache_parameters_only_where_declared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    for name, keys in (("edit", ("model_dir", "cache_dir", "cache_mode", "sparse_convs")), ("baseline", ("model_dir",))):
        (tmp_path / name).mkdir()
        blocks = "".join(f'parameters {{ key: "{key}" value {{ string_value: "" }} }}\n' for key in keys)
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\n{blocks}')
    monkeypatch.setenv("INSTGENIE_CACHE_DIR", "/var/cache/instgenie")
    monkeypatch.setenv("INSTGENIE_MODEL", "/models/flux-fill")
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--cache-mode", "kv-bfloat16-unmasked", "--dtype", "bfloat16", "--sparse-convs", "off"])
    assert args.model == "/models/flux-fill"  # environment-driven, as the container images set it
    parameters = serve_parameters(args, tmp_path, Path(args.model))
    common = {"model_dir": "/models/flux-fill", "device": "cpu", "dtype": "bfloat16"}
    assert parameters["baseline"] == common
    assert parameters["edit"] == common | {
        "cache_dir": "/var/cache/instgenie", "cache_mode": "kv-bfloat16-unmasked", "sparse_convs": "off"
    }


def test_serve_runs_until_sigterm(triton_repository: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    ports = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"]
    package_root = str(Path(instgenie_server.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "instgenie_server.serve", "serve", "--model-repository", str(triton_repository)]
    command += ["--model", str(model), "--max-active", "3", "--dtype", "bfloat16", "--ready-timeout", "20", *ports]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(5)]
        assert lines[0].startswith("http: 127.0.0.1:") and lines[1].startswith("grpc: 127.0.0.1:"), lines
        assert lines[2].startswith("metrics: http://127.0.0.1:") and lines[4] == "ready", lines
        health = lines[3].removeprefix("health: ")
        assert health.startswith("http://127.0.0.1:") and health.endswith("/ready"), lines
        with urllib.request.urlopen(health, timeout=5) as response:  # the launcher's own probe
            assert response.status == 200
        seen = json.loads((model / "initialized.json").read_text())
        assert seen == {
            "model_dir": str(model.resolve()),
            "busy": "0",
            "device": "cpu",
            "dtype": "bfloat16",
            "max_active": "3",
        }
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
    assert (model / "finalized").exists()
