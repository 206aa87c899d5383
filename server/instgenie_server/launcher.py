"""Run a real ``tritonserver`` from the files of the installed ``nvidia-pytriton`` wheel.

Only the wheel's files are used (server binary, Python backend, backend stubs, shared
libraries), never PyTriton's Python API. Where Triton is installed already (the NGC
``tritonserver`` images: ``/opt/tritonserver``), ``$INSTGENIE_TRITON_HOME`` points at
that tree and the wheel is not needed at all (:func:`system_triton_home`). This module
imports neither Triton's Python packages nor torch, so it is cheap to import from a CLI.

Shutdown order (see docs on Triton 2.51 pitfalls): drain on our own metrics, SIGTERM,
then SIGKILL of the whole process group, then remove the shared-memory regions a killed
server leaves in ``/dev/shm``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .front import ConnectionFront

logger = logging.getLogger(__name__)

#: Requests the server holds: our edit model's gauges, and those Triton has queued for a
#: model but not handed to it yet. The server is drained when they sum to zero.
DRAIN_GAUGES = (
    "instgenie_active_requests",
    "instgenie_waiting_requests",
    "instgenie_finishing_requests",  # its final response is still to be sent: keep the connection
    "nv_inference_pending_request_count",
)
#: And no request bytes arrived for this long: a request in transit is in no gauge yet.
DRAIN_QUIET_S = 0.5

_SHM_DIR = Path("/dev/shm")
_POLL_S = 0.1
_METRICS_READ_ATTEMPTS = 3  # failed metrics reads in a row before draining gives up
_LOG_TAIL_BYTES = 4000


class ServerStartError(RuntimeError):
    """``tritonserver`` exited or did not become ready; the message ends with its log tail."""


# --- files and environment ---------------------------------------------------------


@functools.cache
def pytriton_dir() -> Path:
    """Folder of the installed ``pytriton`` package, found without importing it.

    Importing ``pytriton`` would pull in tritonclient, gRPC and numpy; we only need its files.

    Raises:
        FileNotFoundError: ``nvidia-pytriton`` is not installed (``pip install .[server]``).
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed; install the 'server' extra")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def system_triton_home() -> Path | None:
    """``$INSTGENIE_TRITON_HOME``: a Triton install tree to run instead of the wheel's; ``None`` if unset.

    The tree holds ``bin/tritonserver`` and ``backends/python/`` (with a stub built for
    its own Python), as ``/opt/tritonserver`` in ``nvcr.io/nvidia/tritonserver:<tag>-py3``.

    Raises:
        FileNotFoundError: the variable is set but ``bin/tritonserver`` is not in that folder.
    """
    home = os.environ.get("INSTGENIE_TRITON_HOME")
    if not home:
        return None
    if not (Path(home) / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"INSTGENIE_TRITON_HOME={home} has no bin/tritonserver")
    return Path(home)


def triton_dir() -> Path:
    """The wheel's Triton tree: ``bin/tritonserver``, ``backends/python``, ``python_backend_stubs``."""
    return pytriton_dir() / "tritonserver"


def triton_libs_dir() -> Path:
    """The wheel's bundled shared libraries, which live beside the package (auditwheel layout)."""
    return pytriton_dir().parent / "nvidia_pytriton.libs"


def backend_directory(dest: Path) -> Path:
    """Assemble a Triton backend directory with the Python backend at ``dest/python``.

    The stub matches the running interpreter's version, so models run with this Python.
    Files are symlinked into the wheel (they are already executable there); calling it
    again on the same ``dest`` is a no-op. Returns ``dest`` (pass it as
    ``--backend-directory``).

    Raises:
        FileNotFoundError: the wheel has no stub for this Python version.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": triton_dir() / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": triton_dir() / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": triton_dir() / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing from nvidia-pytriton (Python {version} unsupported?)")
        link = python_dir / name
        if link.is_symlink() and link.readlink() == source:
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(source)
    return dest


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver``: ``base`` (default ``os.environ``) plus library and binary paths.

    ``LIBDIR`` follows the wheel's libraries because without it the stub can load a
    different libpython than this interpreter's; the interpreter's folder leads ``PATH``
    so the stub runs models with this venv's packages without activating it. With
    :func:`system_triton_home` set only ``PATH`` changes.
    """
    env = dict(os.environ if base is None else base)
    # A system install's stub links the image's own libpython, and its LD_LIBRARY_PATH
    # (CUDA compat libraries first) must stay as the image set it.
    if system_triton_home() is None:
        library_dirs = [str(triton_libs_dir()), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = _join_path(library_dirs, env.get("LD_LIBRARY_PATH", ""))
    # dirname of sys.executable, not its resolved target: the venv's bin, not the base Python's.
    env["PATH"] = _join_path([os.path.dirname(sys.executable)], env.get("PATH", ""))
    return env


def _join_path(front: Sequence[str], existing: str) -> str:
    return os.pathsep.join([part for part in front if part] + ([existing] if existing else []))


# --- model repository --------------------------------------------------------------


def _parameter_pattern(key: str) -> re.Pattern[str]:
    """Match ``key: "KEY" value { string_value: "..." }``: group 1 runs up to the value's opening quote."""
    return re.compile(
        r'(\bkey\s*:\s*"' + re.escape(key) + r'"\s*value\s*:?\s*\{\s*string_value\s*:\s*")(?:[^"\\]|\\.)*"'
    )


def _pbtxt_string(value: str) -> str:
    """Escape ``value`` for a double-quoted protobuf text-format string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def set_config_parameters(config: str, parameters: Mapping[str, str]) -> str:
    """Return ``config`` (config.pbtxt text) with each ``parameters`` entry's ``string_value`` set.

    Existing entries are rewritten in place; missing keys are appended as new
    ``parameters`` blocks.
    """
    for key, value in parameters.items():
        pattern = _parameter_pattern(key)
        quoted = _pbtxt_string(value)
        if pattern.search(config):
            # A function replacement, so backslashes in ``quoted`` are not read as group references.
            config = pattern.sub(lambda match, value=quoted: match.group(1) + value + '"', config)
        else:
            config = (
                config.rstrip("\n") + f'\nparameters {{\n  key: "{key}"\n  value: {{ string_value: "{quoted}" }}\n}}\n'
            )
    return config


def models_with_parameter(repository: Path, key: str) -> list[str]:
    """Names of the models in ``repository`` whose config.pbtxt declares the parameter ``key``."""
    pattern = _parameter_pattern(key)
    return sorted(
        config.parent.name for config in repository.glob("*/config.pbtxt") if pattern.search(config.read_text())
    )


def render_repository(src: Path, dest: Path, parameters: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """Copy the model repository ``src`` to ``dest``, setting config parameters per model.

    ``parameters`` maps a model name to ``{key: string_value}``; see
    :func:`set_config_parameters`. ``__pycache__`` folders are not copied. Returns ``dest``.

    Raises:
        FileNotFoundError: ``src`` is not a folder.
        FileExistsError: ``dest`` exists and is not empty (a stale model would be served).
        KeyError: a model named in ``parameters`` has no config.pbtxt in ``src``.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"model repository {src} does not exist")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; render into a new folder")
    parameters = parameters or {}
    missing = [name for name in parameters if not (src / name / "config.pbtxt").is_file()]
    if missing:
        raise KeyError(f"no config.pbtxt for model(s) {missing} in {src}")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for name, values in parameters.items():
        config = dest / name / "config.pbtxt"
        config.write_text(set_config_parameters(config.read_text(), values))
    return dest


# --- ports, metrics, processes -----------------------------------------------------


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports the OS considers free on ``host`` (all bound at once, so no repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may still take it)."""
    return _free_ports(host, 1)[0]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: ports in TIME_WAIT are usable by Triton too; only a listener blocks it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def gauge_sum(metrics_text: str, name: str) -> float:
    """Sum of the Prometheus samples called ``name`` over all label sets (0.0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in ("{", " "):
            continue
        # Label values may contain spaces: the value is the first token after the labels.
        rest = line[line.rindex("}") + 1 :] if "}" in line else line[len(name) :]
        total += float(rest.split()[0])
    return total


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, from ``/proc``.

    Zombies are skipped: orphaned stubs are reaped by PID 1, which may take its time,
    and a zombie holds no resources.
    """
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _log_tail(path: Path, size: int = _LOG_TAIL_BYTES) -> str:
    """The last ``size`` characters of the log at ``path``, without Triton's settings table.

    The table (lines of ``|`` and ``+--``) is ~3 KB printed right before a startup
    error, so it would otherwise push the error itself out of the tail.
    """
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - 8 * size))
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(no server log: {exc})"
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith(("|", "+-"))]
    return "".join(lines)[-size:]


# --- the server --------------------------------------------------------------------


class TritonServer:
    """One ``tritonserver`` process (and its Python stubs) in a process group of its own.

    Triton listens on private loopback ports; clients connect to the public ones, which
    a :class:`~instgenie_server.front.ConnectionFront` in this process owns (see its
    module for why: Triton cannot stop cleanly while clients hold connections).

    Args:
        model_repository: folder of models (``<name>/config.pbtxt`` + version folders).
        http_port, grpc_port, metrics_port: public ports; ``None`` picks free ones.
        host: address the public endpoints bind to.
        log_file: where the server's stdout and stderr go (appended); default: a file in
            a private temporary folder removed by :meth:`stop`.
        extra_args: more ``tritonserver`` flags, appended last.
        exit_timeout_s: ``--exit-timeout-secs``: seconds Triton gets after SIGTERM to
            unload its models (``finalize()``); no client connection is open by then.
        load_models: ``None`` loads every model in the repository at startup; a list
            uses ``--model-control-mode=explicit`` and loads only those.
        environment: extra environment variables of the server and its stubs.

    Use as a context manager (start, wait ready, stop) or call the methods. The
    server gets SIGKILL when the thread that started it ends (a parent-death signal),
    so a killed launcher leaves nothing running: start it from a long-lived thread.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
        exit_timeout_s: int = 10,
        load_models: Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).absolute()
        self.host = host
        picked = iter(_free_ports(host, [http_port, grpc_port, metrics_port].count(None)))
        self.http_port = http_port if http_port is not None else next(picked)
        self.grpc_port = grpc_port if grpc_port is not None else next(picked)
        self.metrics_port = metrics_port if metrics_port is not None else next(picked)
        self.extra_args = list(extra_args)
        self.exit_timeout_s = exit_timeout_s
        self.load_models = None if load_models is None else list(load_models)
        self.environment = dict(environment or {})
        # The prefix names the launcher's pid, so a later start can tell a dead
        # predecessor's regions (remove_leftovers) from a live server's.
        self.shm_prefix = f"{_SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"
        self._log_file = None if log_file is None else Path(log_file).absolute()
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._front: ConnectionFront | None = None
        self._private: dict[str, int] = {}  # endpoint -> Triton's own loopback port
        self._stop_lock = threading.Lock()
        self._python_env: _PythonEnvClaim | None = None

    # endpoints -------------------------------------------------------------------

    @property
    def _connect_host(self) -> str:
        # Clients cannot connect to a wildcard address; the loopback reaches it.
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (the form ``tritonclient.http`` takes)."""
        return f"{self._connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (the form ``tritonclient.grpc`` takes)."""
        return f"{self._connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{self._connect_host}:{self.metrics_port}/metrics"

    @property
    def private_ports(self) -> dict[str, int]:
        """Triton's own loopback ports by endpoint (``http``, ``grpc``, ``metrics``); empty before start."""
        return dict(self._private)

    @property
    def private_metrics_url(self) -> str:
        """The metrics page on Triton's own port (the launcher's reads bypass the front)."""
        return f"http://127.0.0.1:{self._private['metrics']}/metrics"

    @property
    def log_file(self) -> Path | None:
        """The server log (set once started)."""
        return self._log_file

    @property
    def pid(self) -> int | None:
        """PID of ``tritonserver``, also its process group id; ``None`` before :meth:`start`."""
        return None if self._process is None else self._process.pid

    @property
    def front(self) -> ConnectionFront | None:
        """The public listeners (``None`` before :meth:`start`)."""
        return self._front

    # lifecycle -------------------------------------------------------------------

    def command(self, backend_dir: Path, ports: Mapping[str, int] | None = None) -> list[str]:
        """The ``tritonserver`` command line, with Python backend files under ``backend_dir``.

        ``ports``: Triton's own (private, loopback) ports; default: the public ones.
        """
        ports = ports or {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        home = system_triton_home()
        args = [
            str((home if home is not None else triton_dir()) / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            # Our configs are complete; auto-complete costs ~1.5 s of startup per server.
            "--disable-auto-complete-config",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        for name in ("http", "grpc", "metrics"):
            args += [f"--{name}-address=127.0.0.1", f"--{name}-port={ports[name]}"]
        if self.load_models is not None:
            args.append("--model-control-mode=explicit")
            args += [f"--load-model={name}" for name in self.load_models]
        return args + self.extra_args

    def start(self) -> None:
        """Open the public ports and launch ``tritonserver`` (own process group); return at once.

        Raises:
            RuntimeError: already started.
            ServerStartError: a port is already taken (a foreign server would otherwise
                answer our readiness checks).
            FileNotFoundError: ``$INSTGENIE_TRITON_HOME`` has no ``bin/tritonserver``.
        """
        if self._process is not None:
            raise RuntimeError("server already started")
        busy = [port for port in (self.http_port, self.grpc_port, self.metrics_port) if _port_in_use(self.host, port)]
        if busy:
            raise ServerStartError(f"port(s) {busy} already in use on {self.host}")
        system_triton_home()  # a wrong $INSTGENIE_TRITON_HOME fails before anything is made
        remove_leftovers()
        self._workdir = tempfile.TemporaryDirectory(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-")
        if self._log_file is None:
            self._log_file = Path(self._workdir.name) / "tritonserver.log"
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._front = ConnectionFront(
                self.host, {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
            )
        except OSError as exc:
            raise ServerStartError(f"cannot listen on {self.host}: {exc}") from exc
        try:
            self._launch()
        except BaseException:  # nothing started: give the ports back
            self._front.close()
            self._front = None
            raise

    def _launch(self, extra_environment: Mapping[str, str] | None = None) -> None:
        """Start a ``tritonserver`` process on fresh private ports and route the front to them."""
        assert self._workdir is not None and self._log_file is not None and self._front is not None
        home = system_triton_home()
        backends = home / "backends" if home is not None else backend_directory(Path(self._workdir.name) / "backends")
        self._private = dict(zip(("http", "grpc", "metrics"), _free_ports("127.0.0.1", 3)))
        command = self.command(backends, self._private)
        # Temporary files of the server and its stubs (multiprocessing's pymp-* folders
        # of codec workers) live in the work folder, so a kill leaves none in /tmp.
        temporary = Path(self._workdir.name) / "tmp"
        temporary.mkdir(exist_ok=True)
        self._python_env = _PythonEnvClaim(Path(self._workdir.name))
        logger.info("starting %s", " ".join(command))
        with self._log_file.open("ab") as log:
            # A new session: terminal Ctrl-C reaches only us (we drain first), and the
            # stubs share the server's process group, so killpg reaches all of them.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment()
                | {SHM_PREFIX_VARIABLE: self.shm_prefix, "TMPDIR": str(temporary)}
                | self.environment
                | dict(extra_environment or {}),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._front.route(self._private)

    def restart(self, extra_environment: Mapping[str, str] | None = None) -> None:
        """Recover: close every client connection, kill the server's process group, start
        a new server on the same public ports. Returns at once (then :meth:`wait_ready`)."""
        if self._process is None or self._front is None:
            raise RuntimeError("server not started")
        closed = self._front.refuse()
        self._kill_group(self._process.pid)
        self._process.wait()
        self._remove_shm()
        if self._python_env is not None:
            self._python_env.remove()
        logger.info("server killed (%d client connections closed); starting it again", closed)
        self._launch(extra_environment)

    def alive(self) -> bool:
        """Whether the ``tritonserver`` process is running."""
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The process's exit status (negative: killed by that signal); None while it runs or before start."""
        return None if self._process is None else self._process.poll()

    def stub_processes(self) -> dict[int, str]:
        """Live Python-backend stubs of the server: pid -> model instance (its model folder's name)."""
        if self._process is None:
            return {}
        stubs = {}
        for pid in process_group_members(self._process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 1:
                # argv[1] is the model's version folder: <repository>/<model>/<version>/model.py
                stubs[pid] = Path(argv[1].decode(errors="replace")).parent.parent.name
        return stubs

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll ``GET /v2/health/ready`` until it answers 200, for up to ``timeout_s`` seconds.

        Raises:
            RuntimeError: not started.
            ServerStartError: the server exited or was not ready in time (with its log tail).
        """
        if self._process is None:
            raise RuntimeError("server not started")
        url = f"http://127.0.0.1:{self._private['http']}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise ServerStartError(f"tritonserver exited with code {code} while starting\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        if self._python_env is not None:
                            self._python_env.claim()
                        logger.info("tritonserver ready at http %s, grpc %s", self.http_url, self.grpc_url)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while models load
            if time.monotonic() > deadline:
                raise ServerStartError(f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def log_tail(self, size: int = _LOG_TAIL_BYTES) -> str:
        """The last ``size`` characters of the server log, headed by its path ('' without a log)."""
        return f"--- {self._log_file} (tail) ---\n{_log_tail(self._log_file, size)}" if self._log_file else ""

    def read_metrics(self, timeout_s: float = 1.0) -> str:
        """The Prometheus text of Triton's metrics page (from its private port).

        Raises:
            OSError: the page cannot be read (server down or busy).
        """
        with urllib.request.urlopen(self.private_metrics_url, timeout=timeout_s) as response:
            return response.read().decode()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds until the :data:`DRAIN_GAUGES` sum to zero and no
        request bytes arrived for :data:`DRAIN_QUIET_S`.

        Returns whether the server is idle. A server whose metrics cannot be read (it
        exited, or has none: a few reads in a row fail) counts as idle: there is
        nothing left to wait for. One slow or failed read on a busy machine does not.
        """
        deadline = time.monotonic() + timeout_s
        failures = 0
        while self.alive():
            try:
                text = self.read_metrics()
            except (OSError, ConnectionError) as exc:
                failures += 1
                if failures >= _METRICS_READ_ATTEMPTS:
                    logger.warning("cannot read %s (%s); not draining", self.private_metrics_url, exc)
                    return True
                time.sleep(_POLL_S)
                continue
            failures = 0
            busy = sum(gauge_sum(text, name) for name in DRAIN_GAUGES)
            if busy == 0 and (self._front is None or self._front.quiet_s() >= DRAIN_QUIET_S):
                return True
            if time.monotonic() > deadline:
                logger.warning("%g request(s) still running after %.0f s of draining", busy, timeout_s)
                return False
            time.sleep(_POLL_S * 5)
        return True

    def stop(self, drain_timeout_s: float = 60.0, term_timeout_s: float = 15.0) -> int | None:
        """Stop accepting, drain, close every client connection, SIGTERM; SIGKILL if it hangs. Idempotent.

        With no client connection left, Triton unloads its models (``finalize()`` runs)
        and exits 0 within ``exit_timeout_s``. Shared memory it leaves is removed.

        Args:
            drain_timeout_s: seconds to wait for running and queued requests to finish.
            term_timeout_s: seconds Triton gets to exit after SIGTERM before SIGKILL.
                Keep it above ``exit_timeout_s`` so Triton can finish its own shutdown.

        Returns the server's exit status (negative: killed by that signal), ``None`` if
        it never started.
        """
        with self._stop_lock:
            process = self._process
            if process is None:
                return None
            if self._front is not None:
                self._front.stop_listening()
            if process.poll() is None:
                self.drain(drain_timeout_s)
                if self._front is not None:
                    closed = self._front.refuse()
                    logger.info("closed %d client connection(s) before stopping", closed)
                # SIGTERM to the server alone: Triton then unloads models so finalize()
                # runs; the stubs ignore SIGTERM anyway. SIGKILL below takes the group.
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(term_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "tritonserver did not exit %.0f s after SIGTERM; killing its process group", term_timeout_s
                    )
            self._kill_group(process.pid)
            code = process.wait()
            if self._front is not None:
                self._front.close()
                self._front = None
            self._remove_shm()
            if self._python_env is not None:
                self._python_env.remove()
                self._python_env = None
            if self._workdir is not None:
                self._workdir.cleanup()
                if self._log_file is not None and self._log_file.is_relative_to(self._workdir.name):
                    self._log_file = None
                self._workdir = None
            logger.log(logging.INFO if code == 0 else logging.WARNING, "tritonserver stopped (status %s)", code)
            return code

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once, as a crash would; then clean up."""
        if self._process is None:
            return
        self._kill_group(self._process.pid)
        self._process.wait()
        self.stop(drain_timeout_s=0)

    def _remove_shm(self) -> None:
        _remove_shm_regions(self.shm_prefix)

    @staticmethod
    def _kill_group(pgid: int, timeout_s: float = 5.0) -> None:
        """SIGKILL every process left in the group and wait (``timeout_s`` seconds) until none lives."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(_POLL_S / 2)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(drain_timeout_s=0)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


# --- what a killed launcher leaves ------------------------------------------------------

_SHM_PREFIX = "instgenie_"
#: Tells the stubs the server's shared-memory prefix, so the semaphores their worker
#: pools create carry it and are removed with the server's regions.
SHM_PREFIX_VARIABLE = "INSTGENIE_SHM_PREFIX"
_WORKDIR_PREFIX = "instgenie-triton-"
_REPOSITORY_PREFIX = "instgenie-repo-"
_PR_SET_PDEATHSIG = 1
_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


_PYTHON_ENV_PATTERN = re.compile(r"python_env_[A-Za-z0-9]{6}")
_PYTHON_ENV_RECORD = "python-env"


class _PythonEnvClaim:
    """The ``/tmp/python_env_XXXXXX`` folder the Python backend of one server made.

    python_backend 24.10 makes it with ``mkdtemp`` on a fixed ``/tmp`` path (TMPDIR does
    not move it) and removes it only when the server exits cleanly, so each killed
    server would leave one. Its name does not say whose it is: a folder is claimed
    only when it is the one new folder between launch and readiness (with several
    servers starting at once none is claimed and it stays). The claim is recorded in
    the work folder, so :func:`remove_leftovers` removes it for a killed launcher too.
    A live server's folder is never removed: the backend fails its exit without it.
    """

    def __init__(self, workdir: Path) -> None:
        self._record = workdir / _PYTHON_ENV_RECORD
        self._launched_at = time.time()
        self._before = set(_python_env_folders())
        self._record.unlink(missing_ok=True)

    def claim(self) -> None:
        if self._record.exists():
            return
        new = [f for f in set(_python_env_folders()) - self._before if _ctime(f) >= self._launched_at - 1]
        if len(new) == 1:
            self._record.write_text(str(new[0]))

    def remove(self) -> None:
        """Remove the claimed folder; call only once the server is dead."""
        _remove_recorded_python_env(self._record)


def _python_env_folders() -> list[Path]:
    return [f for f in Path("/tmp").glob("python_env_*") if _PYTHON_ENV_PATTERN.fullmatch(f.name)]


def _ctime(path: Path) -> float:
    try:
        return path.stat().st_ctime
    except OSError:
        return 0.0


def _remove_recorded_python_env(record: Path) -> None:
    try:
        folder = Path(record.read_text().strip())
    except OSError:
        return
    if folder.parent == Path("/tmp") and _PYTHON_ENV_PATTERN.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
    record.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the launcher's starting thread dies (even by SIGKILL)."""
    _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    """The launcher pid a leftover's name starts with after ``prefix`` (``None`` if it names none)."""
    digits = name[len(prefix) :].split("_", 1)[0].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


def _remove_shm_regions(prefix: str) -> None:
    # Triton's regions start with the prefix; the stubs' multiprocessing semaphores are
    # named "sem.<prefix>..." (see instgenie.codec: INSTGENIE_SHM_PREFIX).
    for pattern in (f"{prefix}*", f"sem.{prefix}*"):
        for region in _SHM_DIR.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                region.unlink()


def remove_leftovers() -> list[Path]:
    """Remove what launchers that died without stopping left: shared-memory regions and
    temporary folders whose owner process is gone. Returns what was removed.

    Their names carry the owning launcher's pid, so a running server's are never touched.
    """
    removed: list[Path] = []
    for shm in [*_SHM_DIR.glob(f"{_SHM_PREFIX}*"), *_SHM_DIR.glob(f"sem.{_SHM_PREFIX}*")]:
        owner = _owner_pid(shm.name.removeprefix("sem."), _SHM_PREFIX)
        if owner is not None and not _pid_alive(owner):
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
                removed.append(shm)
    temp = Path(tempfile.gettempdir())
    for prefix in (_WORKDIR_PREFIX, _REPOSITORY_PREFIX):
        for folder in temp.glob(f"{prefix}*"):
            owner = _owner_pid(folder.name, prefix)
            if owner is not None and not _pid_alive(owner) and folder.is_dir() and not folder.is_symlink():
                _remove_recorded_python_env(folder / _PYTHON_ENV_RECORD)
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        logger.info("removed what a killed launcher left: %s", ", ".join(str(p) for p in removed))
    return removed


# --- CLI ---------------------------------------------------------------------------

#: ``serve`` options forwarded as config parameters to every model that declares ``model_dir``.
_FORWARDED = ("model_dir", "device", "dtype", "max_active", "max_waiting", "max_sequence_length")
# Set only on the models that declare them (the edit model's activation cache).
_FORWARDED_WHERE_DECLARED = ("cache_dir", "cache_mode", "cache_budget_bytes", "cost_model")


def default_model_repository() -> Path:
    """``$INSTGENIE_MODEL_REPOSITORY``, else the source tree's ``model_repository/``."""
    override = os.environ.get("INSTGENIE_MODEL_REPOSITORY")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "model_repository"


def _default_model() -> Path:
    """The tiny Flux Fill model in ``./models/flux-fill-tiny``, built on first use."""
    target = Path("models") / "flux-fill-tiny"
    if (target / "model_index.json").is_file():
        return target
    from instgenie.tiny import make_model  # torch + diffusers: only when actually needed

    logger.info("building the tiny default model in %s", target)
    return make_model("flux-fill", target, size="tiny")


def _port_arg(port: int) -> int | None:
    return None if port == 0 else port


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind to a clean stop."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals() -> None:
    # A second Ctrl-C must not interrupt the clean stop half way (that would orphan the
    # server, which lives in its own session); the drain timeout bounds the wait instead.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise_stop(signum: int, _frame: object) -> None:
    _ignore_stop_signals()
    raise _StopRequested(signal.Signals(signum).name)


def serve_parameters(args: argparse.Namespace, repository: Path, model: Path) -> dict[str, dict[str, str]]:
    """The config parameters ``serve`` sets, per model of ``repository``, from its arguments."""
    values = {"model_dir": str(model.resolve())} | {
        key: str(getattr(args, key)) for key in _FORWARDED[1:] if getattr(args, key) is not None
    }
    parameters = {name: dict(values) for name in models_with_parameter(repository, "model_dir")}
    for key in _FORWARDED_WHERE_DECLARED:
        if getattr(args, key) is not None:
            for name in models_with_parameter(repository, key):
                parameters.setdefault(name, {})[key] = str(getattr(args, key))
    return parameters


def _serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0 after a clean stop) or until it dies (exit 1)."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in _STOP_SIGNALS}
    try:
        return _run_server(args)
    except _StopRequested as exc:
        logger.info("%s received; server stopped", exc)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_server(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else _default_model()
    if not model.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist")
    source = Path(args.model_repository) if args.model_repository else default_model_repository()
    with tempfile.TemporaryDirectory(prefix=f"{_REPOSITORY_PREFIX}{os.getpid()}-") as rendered:
        repository = render_repository(source, Path(rendered) / "models", serve_parameters(args, source, model))
        server = TritonServer(
            repository,
            http_port=_port_arg(args.http_port),
            grpc_port=_port_arg(args.grpc_port),
            metrics_port=_port_arg(args.metrics_port),
            host=args.host,
            log_file=args.log_file,
        )
        from .supervisor import HealthEndpoint, SupervisionConfig, Supervisor  # they build on this module

        supervisor = Supervisor(
            server,
            SupervisionConfig(
                stall_timeout_s=args.stall_timeout,
                max_restarts=args.max_restarts,
                restart_window_s=args.restart_window,
                ready_timeout_s=args.ready_timeout,
            ),
        )
        health = HealthEndpoint(lambda: supervisor.health, args.host, args.health_port) if args.health_port >= 0 else None
        drain_timeout = args.drain_timeout
        try:
            server.start()
            server.wait_ready(args.ready_timeout)
            print(f"http: {server.http_url}\ngrpc: {server.grpc_url}\nmetrics: {server.metrics_url}", flush=True)
            if health is not None:
                print(f"health: http://{server.http_url.rsplit(':', 1)[0]}:{health.port}/ready", flush=True)
            print("ready", flush=True)
            supervisor.run()  # returns only when recovery failed; a stop signal raises
            logger.error("recovery failed; exiting so that the orchestrator restarts the instance\n%s", server.log_tail())
            drain_timeout = 0.0  # a broken server's gauges are stale: nothing to wait for
            return 1
        finally:
            _ignore_stop_signals()
            server.stop(drain_timeout_s=drain_timeout)
            if health is not None:
                health.close()


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``subparsers``; it sets ``run`` to a ``(args) -> exit code`` callable."""
    serve = subparsers.add_parser("serve", help="run Triton Inference Server with the InstGenIE models")
    serve.add_argument(
        "--model",
        default=os.environ.get("INSTGENIE_MODEL") or None,
        help="diffusers pipeline folder (default: $INSTGENIE_MODEL, else build/reuse ./models/flux-fill-tiny)",
    )
    serve.add_argument(
        "--model-repository",
        help="Triton model repository to serve (default: $INSTGENIE_MODEL_REPOSITORY or the source tree's model_repository/)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    serve.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
    serve.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
    serve.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")
    serve.add_argument("--device", default="cpu", help="torch device of the models")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    serve.add_argument("--max-active", type=int, help="requests in the step loop at once (default: model config)")
    serve.add_argument("--max-waiting", type=int, help="queued requests before refusing (default: model config)")
    serve.add_argument("--max-sequence-length", type=int, help="text tokens (default: model config)")
    serve.add_argument(
        "--cache-dir",
        default=os.environ.get("INSTGENIE_CACHE_DIR") or None,
        help="disk tier of the template caches, one per instance (default: $INSTGENIE_CACHE_DIR, else host memory only)",
    )
    serve.add_argument(
        "--cache-mode", help="cache storage mode, e.g. bfloat16,unmasked or float32,input (default: model config)"
    )
    serve.add_argument("--cache-budget-bytes", type=int, help="host-memory tier budget (default: model config)")
    serve.add_argument(
        "--cost-model",
        default=os.environ.get("INSTGENIE_COST_MODEL") or None,
        help="costs.json from `instgenie profile` (default: $INSTGENIE_COST_MODEL, else load every cached block)",
    )
    serve.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    serve.add_argument("--drain-timeout", type=float, default=60.0, help="seconds running requests get on shutdown")
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="seconds with requests active and no denoising step finished before the server counts as wedged and is restarted",
    )
    serve.add_argument(
        "--max-restarts", type=int, default=5, help="restarts allowed within --restart-window; one more exits 1 (give up)"
    )
    serve.add_argument("--restart-window", type=float, default=600.0, help="seconds over which restarts are counted")
    serve.add_argument(
        "--health-port",
        type=int,
        default=8003,
        help="the launcher's probes: /live (supervising) and /ready (server ready, no fault); 0 = any free port, -1 = off",
    )
    serve.set_defaults(run=_serve)
    return serve


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m instgenie_server.launcher serve ...``."""
    parser = argparse.ArgumentParser(prog="instgenie-server", description=__doc__.split("\n", 1)[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.run(args))
    except (ServerStartError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
