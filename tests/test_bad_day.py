"""The bad day, against real processes: ``instgenie serve`` as a user runs it, then faults.

A killed stub, a wedged step loop, a killed launcher, repeated failures, stops with
connections and streams open, hostile template ids. Each test asserts what the user
sees: an error naming the request within a deadline, a recovery time, readiness that
tells the truth, nothing left running or in /dev/shm. Timings print (``pytest -s``).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from conftest import TEXT_LEN, png, rect_mask, template_image
from instgenie_client import (
    InstGenIEClient,
    InstGenIEConnectionError,
    InstGenIEServerError,
    RequestTimeout,
    SseInstGenIEClient,
)
from instgenie_protocol import sample_sum
from instgenie_server.config import ModelParameters
from instgenie_server.launcher import process_group_members
from serving_calls import Stream, tensor

STALL_TIMEOUT_S = 3.0  # the launcher's: a wedged loop is restarted this long after its last step
LONG_STEPS = 100  # the most a request may ask: an edit still running when the fault hits


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Launcher:
    """``instgenie serve`` in its own process, on free ports, with a disk tier."""

    def __init__(self, model_dir: Path, workdir: Path, *extra: str, ports: list[int] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = ports or _free_ports(4)
        self.http, self.grpc, self.metrics, self.health = self.ports
        self.workdir = workdir
        self.log = workdir / "triton.log"
        self.output = (workdir / "serve.out").open("w")
        command = [
            sys.executable, "-c", "import sys; from instgenie_cli import main; sys.exit(main())", "-v", "serve",
            "--model", str(model_dir), "--max-sequence-length", str(TEXT_LEN),
            "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
            "--health-port", str(self.health), "--cache-dir", str(workdir / "cache"), "--log-file", str(self.log),
            "--drain-timeout", "20", *extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.grpc_url = f"127.0.0.1:{self.grpc}"

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Seconds until both Triton's readiness (through the front) and the launcher's say ready."""
        started = time.monotonic()
        while not (self.triton_ready() and self.launcher_ready()):
            assert self.process.poll() is None, self.output_text()
            assert time.monotonic() - started < timeout_s, f"not ready in {timeout_s} s\n{self.output_text()}"
            time.sleep(0.05)
        return time.monotonic() - started

    def triton_ready(self) -> bool:
        return _status(f"http://127.0.0.1:{self.http}/v2/health/ready") == 200

    def launcher_ready(self) -> bool:
        return _status(f"http://127.0.0.1:{self.health}/ready") == 200

    def server_pid(self) -> int:
        (pid,) = [p for p in _children(self.process.pid) if b"tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return pid

    def stub_pid(self, model: str = "instgenie_edit") -> int:
        for pid in process_group_members(self.server_pid()):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"triton_python_backend_stub") and f"/models/{model}/".encode() in argv[1]:
                return pid
        raise AssertionError(f"no stub of {model}")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as response:
            return sample_sum(response.read().decode(), name)

    def output_text(self) -> str:
        self.output.flush()
        return (self.workdir / "serve.out").read_text()

    def shm_entries(self) -> list[str]:
        return sorted(n for n in os.listdir("/dev/shm") if f"instgenie_{self.process.pid}_" in n)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.output.close()


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, http.client.HTTPException):
        return None


@pytest.fixture(scope="module")
def served(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One supervised instance for the fault tests of this module, which leave it healthy."""
    launcher = Launcher(
        model_dirs["flux-fill"], tmp_path_factory.mktemp("served"), "--stall-timeout", str(STALL_TIMEOUT_S)
    )
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def long_template(served: Launcher) -> str:
    return InstGenIEClient(served.grpc_url).register_template(png(template_image(40)), "a hall", seed=2, steps=LONG_STEPS)


# -- a dead stub, a wedged loop ---------------------------------------------------------------


def _in_flight(launcher: Launcher, template_id: str, count: int) -> list:
    client = InstGenIEClient(launcher.grpc_url, timeout_s=120)
    jobs = [client.submit(png(rect_mask(0.3, seed=i)), "a lamp", template_id=template_id, request_id=f"job{i}") for i in range(count)]
    for job in jobs:  # every one of them is stepping (a job that ended first shows why)
        assert next(iter(job.progress), None) is not None, job.result()
    return jobs


def _outcomes(jobs: list, fault_at: float) -> list[tuple[float, Exception]]:
    outcomes = []
    for job in jobs:
        with pytest.raises(InstGenIEConnectionError) as info:
            job.result()
        outcomes.append((time.monotonic() - fault_at, info.value))
    return outcomes


def _wait_unready(launcher: Launcher, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while launcher.launcher_ready():
        assert time.monotonic() < deadline, f"the fault went unnoticed\n{launcher.output_text()[-3000:]}"
        time.sleep(0.05)


def _recovered(launcher: Launcher, fault_at: float, template_id: str, restarts: int) -> float:
    # Unready while it recovers, so the router ejects it meanwhile. The supervisor polls
    # every 0.5 s: a client may hear of the fault (its stream breaking) just before it.
    _wait_unready(launcher, timeout_s=2.0)
    assert not launcher.triton_ready(), launcher.output_text()[-3000:]
    launcher.wait_ready(timeout_s=60)
    recovery = time.monotonic() - fault_at
    assert launcher.metric("instgenie_server_restarts_total") == restarts
    client = InstGenIEClient(launcher.grpc_url, timeout_s=60)
    assert template_id in client.list_templates()  # back from the disk tier, without registering again
    result = client.edit(png(rect_mask(0.2, seed=9)), "a lamp", template_id=template_id)
    assert result.computed_tokens < result.num_tokens  # served from its cache
    return recovery


def test_a_killed_stub_fails_its_requests_at_once_and_the_instance_recovers(served: Launcher, long_template: str) -> None:
    jobs = _in_flight(served, long_template, 4)
    stub = served.stub_pid()
    fault_at = time.monotonic()
    os.kill(stub, signal.SIGKILL)
    outcomes = _outcomes(jobs, fault_at)
    for (seconds, error), job in zip(outcomes, jobs):
        # A clear error at once, naming the request: no stream hangs.
        assert seconds < 5 and error.reason == "unavailable" and f"[request {job.request_id}]" in str(error), error
    recovery = _recovered(served, fault_at, long_template, restarts=1)
    text = served.output_text()
    # Either the supervisor sees the stub gone, or tritonserver dies first: python_backend
    # 24.10 aborts (an uncaught boost lock_exception in ResponseSendDecoupled) when a
    # stub dies in the middle of sending a response. Either way: one restart, logged.
    assert (
        f"the Python backend stub of instgenie_edit (pid {stub}) died; restarting the server (restart 1)" in text
        or "tritonserver exited with status -6; restarting the server (restart 1)" in text
    ), text[-3000:]
    print(f"stub killed: requests failed after {max(s for s, _ in outcomes):.2f} s, ready again after {recovery:.1f} s")


def test_a_wedged_step_loop_is_restarted_after_the_stall_timeout(served: Launcher, long_template: str) -> None:
    jobs = _in_flight(served, long_template, 2)
    stub = served.stub_pid()
    fault_at = time.monotonic()
    os.kill(stub, signal.SIGSTOP)  # alive, holding its requests, stepping no more
    outcomes = _outcomes(jobs, fault_at)
    detected = max(s for s, _ in outcomes)
    # The launcher times the stall from the last step count the metrics page showed, and
    # the loop's step counts reach the page in batches: up to one flush before the fault.
    assert STALL_TIMEOUT_S - ModelParameters.metrics_flush_s <= detected < STALL_TIMEOUT_S + 10
    assert all(error.reason == "unavailable" for _, error in outcomes)
    deadline = time.monotonic() + 10
    while _alive(stub):  # the wedged process is killed with its server, not left behind
        assert time.monotonic() < deadline, "the wedged stub outlived its server"
        time.sleep(0.05)
    recovery = _recovered(served, fault_at, long_template, restarts=2)
    assert "the step loop is stalled: 2 request(s) active" in served.output_text()
    print(f"loop wedged: detected after {detected:.2f} s (stall timeout {STALL_TIMEOUT_S:g} s), ready again after {recovery:.1f} s")


# -- hostile template ids ---------------------------------------------------------------------


HOSTILE_IDS = ["/etc", "../../outside", "tpl-../../outside", "TPL-0123456789ABCDEF0123", "tpl-0123456789abcdef012", "tpl-\x00"]


def test_template_ids_are_names_not_paths(served: Launcher, tmp_path: Path) -> None:
    # A folder outside the cache that looks like a template, and a link to it planted in the cache.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"format": 1, "model": "x", "files": {}}))
    mode_folder = next((served.workdir / "cache").iterdir())
    planted = "tpl-" + "ab" * 10
    (mode_folder / planted).symlink_to(outside, target_is_directory=True)
    stream = Stream(served.grpc_url)
    try:
        calls = [
            stream.call({"TEMPLATE_ID": template_id, "MASK": png(rect_mask(0.2)), "PROMPT": "x"}, f"hostile{i}")
            for i, template_id in enumerate([*HOSTILE_IDS, str(outside), planted])
        ]
    finally:
        stream.close()
    for call in calls:
        assert call.error is not None and call.error.reason == "unknown_template", call.error
        assert str(tmp_path) not in call.error.message and str(served.workdir) not in call.error.message
    assert (outside / "manifest.json").is_file() and (mode_folder / planted).is_symlink()  # nothing deleted
    assert planted not in InstGenIEClient(served.grpc_url).list_templates()
    (mode_folder / planted).unlink()


def test_the_cli_refuses_a_malformed_template_id_before_sending(served: Launcher, tmp_path: Path) -> None:
    mask = tmp_path / "m.png"
    mask.write_bytes(png(rect_mask(0.2)))
    command = [sys.executable, "-c", "import sys; from instgenie_cli import main; sys.exit(main())", "edit", "--url",
               "127.0.0.1:1", "--template-id", "../../etc", "--mask", str(mask), "--prompt", "x", "-o", str(tmp_path / "o.png")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    # Refused locally (the url is unreachable on purpose): exit 2, a request error, not a connection error.
    assert done.returncode == 2 and "unknown_template" in done.stderr and "127.0.0.1:1" not in done.stderr, done.stderr


# -- the sync front's status codes --------------------------------------------------------------


def test_the_sync_model_answers_client_mistakes_with_400_and_invalid_argument(served: Launcher, long_template: str) -> None:
    wrong_size = png(rect_mask(0.2, size=64))  # the template is 128x128
    body = json.dumps({
        "id": "sync-bad",
        "inputs": [
            {"name": "TEMPLATE_ID", "datatype": "BYTES", "shape": [1], "data": [long_template]},
            {"name": "MASK", "datatype": "BYTES", "shape": [1], "data": [__import__("base64").b64encode(wrong_size).decode()]},
            {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["x"]},
        ],
    })  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", served.http, timeout=60)
    try:
        connection.request("POST", "/v2/models/instgenie_edit_sync/infer", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read().decode()
    finally:
        connection.close()
    assert response.status == 400 and "[request sync-bad] invalid_mask" in answer, (response.status, answer)
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        with pytest.raises(Exception) as info:
            client.infer("instgenie_edit_sync", [tensor("TEMPLATE_ID", "tpl-" + "0" * 20), tensor("MASK", png(rect_mask(0.2))),
                                                tensor("PROMPT", "x")], request_id="sync-unknown")  # fmt: skip
    finally:
        client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "[request sync-unknown] unknown_template" in str(info.value)


# -- clean stops --------------------------------------------------------------------------------


def test_sigterm_with_connections_and_streams_open_stops_cleanly(served: Launcher, long_template: str) -> None:
    """Idle keep-alive HTTP, an open gRPC stream that carried a request, an SSE stream that
    finished, a router in front that routed an edit (its channel open, its scrapes
    going on), and a streamed edit still running: exit 0, every model unloaded
    (finalize ran), nothing in /dev/shm, within the drain timeout + 10 s."""
    from instgenie_router.service import Router, RouterConfig

    spec = f"127.0.0.1:{served.grpc}:{served.http}:{served.metrics}"
    router = Router(RouterConfig([spec], grpc_port=0, http_port=0, metrics_port=0)).start()
    deadline = time.monotonic() + 30
    while not router.pool.healthy():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    routed = InstGenIEClient(f"127.0.0.1:{router.grpc_port}").edit(png(rect_mask(0.2, seed=5)), "a lamp", template_id=long_template)
    assert routed.computed_tokens < routed.num_tokens
    keep_alive = http.client.HTTPConnection("127.0.0.1", served.http)
    keep_alive.request("GET", "/v2/health/ready")
    keep_alive.getresponse().read()
    idle_stream = Stream(served.grpc_url)
    listed = idle_stream.call({"ACTION": "list"}, "listed")
    assert listed.error is None
    SseInstGenIEClient(f"127.0.0.1:{served.http}").list_templates()
    running = InstGenIEClient(served.grpc_url, timeout_s=120).submit(png(rect_mask(0.2, seed=3)), "a lamp", template_id=long_template)
    next(iter(running.progress))
    assert served.shm_entries()
    stop_at = time.monotonic()
    code = served.stop(timeout_s=40)
    took = time.monotonic() - stop_at
    assert code == 0 and took < 20 + 10, (code, took, served.output_text()[-3000:])
    assert running.result().computed_tokens < running.result().num_tokens  # drained: it finished
    log = served.log.read_text()
    for model in ("instgenie_edit", "instgenie_edit_sync", "diffusers_baseline"):
        assert f"successfully unloaded '{model}'" in log  # finalize() ran
    assert "Exit timeout expired" not in log
    assert served.shm_entries() == []
    keep_alive.close()
    idle_stream.close()
    router.stop()
    print(f"stopped cleanly in {took:.1f} s with open connections, a router and a running edit")


# -- the launcher's own death, and giving up ------------------------------------------------------


def test_a_sigkilled_launcher_takes_its_server_along_and_the_next_start_cleans_up(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    first = Launcher(model_dirs["flux-fill"], tmp_path / "first")
    first.wait_ready()
    server = first.server_pid()
    group = process_group_members(server)
    assert len(group) >= 4 and first.shm_entries()  # the server, three stubs, a codec worker
    killed_at = time.monotonic()
    first.process.kill()
    first.process.wait()
    while any(_alive(pid) for pid in group):
        assert time.monotonic() - killed_at < 5, [p for p in group if _alive(p)]
        time.sleep(0.05)
    gone = time.monotonic() - killed_at
    left = first.shm_entries()
    assert left  # a SIGKILL leaves Triton's regions behind...
    repository = list(Path("/tmp").glob(f"instgenie-repo-{first.process.pid}-*"))
    workdirs = list(Path("/tmp").glob(f"instgenie-triton-{first.process.pid}-*"))
    # python_backend's own /tmp/python_env_* folder, claimed by the launcher for its server
    python_envs = [Path(record.read_text()) for folder in workdirs for record in folder.glob("python-env")]
    assert repository and workdirs and python_envs and all(path.is_dir() for path in python_envs)
    second = Launcher(model_dirs["flux-fill"], tmp_path / "second", ports=first.ports)  # free again
    try:
        second.wait_ready()
        assert first.shm_entries() == []  # ...which the next start removes
        assert not any(path.exists() for path in repository + workdirs + python_envs)
    finally:
        assert second.stop() == 0
    first.output.close()
    print(f"launcher SIGKILLed: its server and stubs gone after {gone:.2f} s")


def test_recovery_that_keeps_failing_gives_up_and_exits_1(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    launcher = Launcher(model_dirs["flux-fill"], tmp_path, "--max-restarts", "1")
    try:
        launcher.wait_ready()
        os.kill(launcher.stub_pid(), signal.SIGKILL)
        _wait_unready(launcher)
        launcher.wait_ready()  # the one restart it may make
        group = process_group_members(launcher.server_pid())
        os.kill(launcher.stub_pid(), signal.SIGKILL)
        assert launcher.process.wait(30) == 1
        assert not any(_alive(pid) for pid in group)
        assert "giving up" in launcher.output_text()
        assert launcher.shm_entries() == []
    finally:
        launcher.stop()


# -- no client ever hangs ---------------------------------------------------------------------------


def test_no_client_hangs_on_a_silent_server(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Requests in flight when the edit stub freezes (SIGSTOP; an unsupervised server of
    the test's own): every client gives up within its stall timeout with an error naming
    the request, and so does the router within its request timeout, gRPC and SSE alike."""
    import asyncio

    from instgenie_client import AsyncInstGenIEClient
    from instgenie_router.service import Router, RouterConfig
    from instgenie_server.launcher import TritonServer, default_model_repository, models_with_parameter, render_repository

    # A request hears nothing until its first step: the stall timeout must cover the
    # preparation of 6 requests at once on a busy 2-core machine (2 s did not, once).
    stall, router_timeout = 5.0, 12.0
    source = default_model_repository()
    parameters = {"model_dir": str(model_dirs["flux-fill"]), "max_sequence_length": str(TEXT_LEN), "codec_nice": "0"}
    repository = render_repository(source, tmp_path / "models", dict.fromkeys(models_with_parameter(source, "model_dir"), parameters))
    server = TritonServer(repository, log_file=tmp_path / "server.log")
    with server:
        template_id = InstGenIEClient(server.grpc_url).register_template(png(template_image(41)), "a", seed=1, steps=LONG_STEPS)
        mask = png(rect_mask(1.0))  # every token: slow steps, still running when the stub freezes
        (mask_file := tmp_path / "m.png").write_bytes(mask)
        spec = f"127.0.0.1:{server.grpc_port}:{server.http_port}:{server.metrics_port}"
        config = RouterConfig([spec], grpc_port=0, http_port=0, metrics_port=0, request_timeout_s=router_timeout)
        (stub,) = [pid for pid, model in server.stub_processes().items() if model == "instgenie_edit"]
        started: dict[str, float] = {}
        results: dict[str, tuple[float, BaseException | None]] = {}

        def timed(name: str, call) -> None:  # type: ignore[no-untyped-def]
            started[name] = time.monotonic()
            try:
                call()
                results[name] = (time.monotonic(), None)
            except BaseException as error:  # noqa: BLE001 - recorded, asserted below
                results[name] = (time.monotonic(), error)

        def cli() -> None:
            command = [sys.executable, "-c", "import sys; from instgenie_cli import main; sys.exit(main())", "edit", "--url",
                       server.grpc_url, "--template-id", template_id, "--mask", str(mask_file), "--prompt", "x",
                       "--stall-timeout", str(stall), "-o", str(tmp_path / "o.png"), "--no-progress"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()}")

        with Router(config) as router:
            deadline = time.monotonic() + 30
            while not router.pool.healthy():
                assert time.monotonic() < deadline, "the router never saw the instance healthy"
                time.sleep(0.1)
            via_router = f"127.0.0.1:{router.grpc_port}"
            sse_url = f"127.0.0.1:{server.http_port}"
            calls = {
                "grpc": lambda: InstGenIEClient(server.grpc_url, stall_timeout_s=stall).edit(mask, "x", template_id=template_id, request_id="g1"),
                "asyncio": lambda: asyncio.run(AsyncInstGenIEClient(server.grpc_url, stall_timeout_s=stall).edit(mask, "x", template_id=template_id, request_id="a1")),
                "sse": lambda: SseInstGenIEClient(sse_url, stall_timeout_s=stall).edit(mask, "x", template_id=template_id, request_id="s1"),
                "cli": cli,
                # No limits of their own: the router's request timeout ends them.
                "router grpc": lambda: InstGenIEClient(via_router, timeout_s=None, stall_timeout_s=None).edit(mask, "x", template_id=template_id, request_id="r1"),
                "router sse": lambda: SseInstGenIEClient(f"127.0.0.1:{router.http_port}", timeout_s=None, stall_timeout_s=None).edit(mask, "x", template_id=template_id, request_id="r2"),
            }  # fmt: skip
            threads = [threading.Thread(target=timed, args=item) for item in calls.items()]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while sample_sum(server.read_metrics(), "instgenie_active_requests") < len(calls):  # all in flight
                assert time.monotonic() < deadline and not results, results
                time.sleep(0.02)
            os.kill(stub, signal.SIGSTOP)
            frozen_at = time.monotonic()
            for thread in threads:
                thread.join(60)
        server.kill()  # a stopped stub is not a server to stop cleanly (nor to send cancellations to)
    for name in ("grpc", "asyncio", "sse", "cli"):
        ended, error = results[name]
        assert error is not None and stall - 0.5 <= ended - frozen_at < stall + 8, (name, ended - frozen_at, error)
    for name, request_id in (("grpc", "g1"), ("asyncio", "a1"), ("sse", "s1")):
        error = results[name][1]
        assert isinstance(error, RequestTimeout) and error.reason == "stalled" and f"[request {request_id}]" in str(error)
    assert "exit 1" in str(results["cli"][1]) and "stalled" in str(results["cli"][1])
    for name, request_id in (("router grpc", "r1"), ("router sse", "r2")):
        ended, error = results[name]
        assert router_timeout - 0.5 <= ended - started[name] < router_timeout + 8 and ended > frozen_at, (name, error)
        assert isinstance(error, InstGenIEServerError) and error.request_id == request_id, (name, error)
        assert error.reason in ("timeout", "unavailable"), (name, error)
    print("gave up after the freeze: " + ", ".join(f"{name} {ended - frozen_at:.1f} s" for name, (ended, _) in results.items()))
