"""One ``tritonserver`` process and its Python stubs: start, readiness, drain, stop, cleanup.

Shutdown order (Triton 2.51): stop accepting on the public ports, drain on our own
metrics, close every client connection (:mod:`.front`), SIGTERM, then SIGKILL of the
whole process group, then remove the shared-memory regions and temporary folders a
killed server leaves (:func:`remove_leftovers` does the same for a killed launcher).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from instgenie_protocol import sample_sum

from .front import ConnectionFront
from .leftovers import SHM_PREFIX, SHM_PREFIX_VARIABLE, WORKDIR_PREFIX, PythonEnvClaim, remove_leftovers, remove_shm_regions
from .triton_install import backend_directory, server_environment, system_triton_home, triton_dir

__all__ = [
    "DRAIN_GAUGES",
    "DRAIN_QUIET_S",
    "SHM_PREFIX_VARIABLE",
    "ServerStartError",
    "TritonServer",
    "free_port",
    "process_group_members",
    "remove_leftovers",
]

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

_POLL_S = 0.1
_METRICS_READ_ATTEMPTS = 3  # failed metrics reads in a row before draining gives up
_LOG_TAIL_BYTES = 4000


class ServerStartError(RuntimeError):
    """``tritonserver`` exited or did not become ready; the message ends with its log tail."""


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
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"
        self._log_file = None if log_file is None else Path(log_file).absolute()
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._front: ConnectionFront | None = None
        self._private: dict[str, int] = {}  # endpoint -> Triton's own loopback port
        self._stop_lock = threading.Lock()
        self._python_env: PythonEnvClaim | None = None

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
        self._workdir = tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
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
        self._python_env = PythonEnvClaim(Path(self._workdir.name))
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
            busy = sum(sample_sum(text, name) for name in DRAIN_GAUGES)
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
        remove_shm_regions(self.shm_prefix)

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


_PR_SET_PDEATHSIG = 1
_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the launcher's starting thread dies (even by SIGKILL)."""
    _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
