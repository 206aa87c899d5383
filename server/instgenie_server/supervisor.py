"""Supervision of one running server: notice what Triton does not, and recover.

Triton 2.51 neither restarts a Python-backend stub that died nor fails the requests it
held, and its health endpoints keep answering 200 (observed: a killed ``instgenie_edit``
stub left 6 streams waiting for 120 s and every later request failing, while ready
stayed 200). A step loop that stops stepping (a wedged kernel, a deadlock, a stopped
process) looks the same from outside. So the launcher watches, every ``poll_interval_s``:

- the ``tritonserver`` process;
- every stub process found once the server was ready (a stub that is gone died);
- the step loop: requests active (``instgenie_active_requests``) while no step finished
  (``instgenie_steps_total`` unchanged) for ``stall_timeout_s``.

On a fault it restarts the whole server (:meth:`TritonServer.restart`), not the model:
unloading a model whose stub died never finishes while its requests hold the model,
and only closing their connections ends those requests. The front closes every client
connection at once, so in-flight requests end with a connection error now (the
clients turn it into ``unavailable`` naming their request), readiness checks are
refused until the new server is ready, and templates come back from the disk tier.
More than ``max_restarts`` restarts within ``restart_window_s`` (or a restart that does
not become ready) gives up: :meth:`Supervisor.run` returns 1 and the orchestrator
restarts the pod (its liveness probe is the process).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from instgenie_protocol import sample_sum

from .server_process import ServerStartError, TritonServer

logger = logging.getLogger(__name__)

#: Environment variable carrying how often the launcher restarted the server; the edit
#: model exports it as ``instgenie_server_restarts_total``.
RESTARTS_VARIABLE = "INSTGENIE_RESTARTS"

_ACTIVE = "instgenie_active_requests"
_STEPS = "instgenie_steps_total"


@dataclass(frozen=True)
class SupervisionConfig:
    """How the launcher watches its server. Times in seconds."""

    poll_interval_s: float = 0.5
    stall_timeout_s: float = 120.0  # work active and no step finished this long: wedged
    max_restarts: int = 5  # within restart_window_s; one more gives up
    restart_window_s: float = 600.0
    ready_timeout_s: float = 300.0  # a restarted server must be ready within this

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or self.stall_timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ValueError("supervision times must be > 0")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")


class StallWatch:
    """Tells a wedged step loop from a busy one, from successive metrics pages."""

    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._steps: float | None = None
        self._since = clock()  # when the step count last moved, or work last was absent

    def observe(self, metrics_text: str) -> str | None:
        """Feed one metrics page; a description of the stall if the loop is wedged, else ``None``."""
        now = self._clock()
        active = sample_sum(metrics_text, _ACTIVE)
        steps = sample_sum(metrics_text, _STEPS)
        if active == 0 or steps != self._steps:
            self._steps, self._since = steps, now
            return None
        if now - self._since >= self.stall_timeout_s:
            return f"the step loop is stalled: {active:g} request(s) active, no step for {now - self._since:.0f} s"
        return None


class Health(enum.Enum):
    """What the launcher knows of its server."""

    STARTING = "starting"
    READY = "ready"
    RECOVERING = "recovering"
    FAILED = "failed"  # recovery gave up; the launcher exits


class Supervisor:
    """Watches a started, ready :class:`TritonServer` and restarts it on a fault."""

    def __init__(self, server: TritonServer, config: SupervisionConfig = SupervisionConfig()) -> None:
        self.server = server
        self.config = config
        self.health = Health.STARTING
        self.restarts = 0
        self._recent: deque[float] = deque()  # restart times within the window
        self._stubs: dict[int, str] = {}
        self._stall = StallWatch(config.stall_timeout_s)

    def watch(self) -> None:
        """Take the server as it is now (ready) as the healthy state to hold."""
        self.health = Health.READY
        self._stubs = self.server.stub_processes()
        self._stall = StallWatch(self.config.stall_timeout_s)
        logger.info("supervising tritonserver %s with %d stub(s): %s", self.server.pid, len(self._stubs),
                    ", ".join(f"{name} ({pid})" for pid, name in sorted(self._stubs.items())))  # fmt: skip

    def fault(self) -> str | None:
        """One check; what is wrong with the server, or ``None``."""
        if not self.server.alive():
            return f"tritonserver exited with status {self.server.exit_code}"
        live = self.server.stub_processes()
        for pid, name in sorted(self._stubs.items()):
            if pid not in live:
                return f"the Python backend stub of {name} (pid {pid}) died"
        try:
            text = self.server.read_metrics(timeout_s=max(1.0, self.config.poll_interval_s))
        except OSError:
            # A busy server can miss one read; it is the stall clock that decides.
            return None
        return self._stall.observe(text)

    def run(self) -> int:
        """Watch until recovery fails (returns 1); a stop signal ends it by raising."""
        if self.health is Health.STARTING:
            self.watch()
        while True:
            time.sleep(self.config.poll_interval_s)
            fault = self.fault()
            if fault is not None and not self.recover(fault):
                return 1

    def recover(self, fault: str) -> bool:
        """Restart the server after ``fault`` (again, while a restart does not become
        ready); ``False`` when the restart budget is spent: giving up."""
        self.health = Health.RECOVERING
        while True:
            now = time.monotonic()
            while self._recent and now - self._recent[0] > self.config.restart_window_s:
                self._recent.popleft()
            if len(self._recent) >= self.config.max_restarts:
                self.health = Health.FAILED
                logger.error("%s; %d restart(s) in the last %.0f s already: giving up", fault, len(self._recent),
                             self.config.restart_window_s)  # fmt: skip
                return False
            self._recent.append(now)
            self.restarts += 1
            logger.error("%s; restarting the server (restart %d)", fault, self.restarts)
            try:
                self.server.restart({RESTARTS_VARIABLE: str(self.restarts)})
                self.server.wait_ready(self.config.ready_timeout_s)
            except ServerStartError as exc:
                fault = f"the restarted server did not become ready ({str(exc).splitlines()[0]})"
                continue
            logger.warning("server ready again %.1f s after the fault was noticed (restart %d)",
                           time.monotonic() - now, self.restarts)  # fmt: skip
            self.watch()
            return True


class HealthEndpoint:
    """The launcher's own probes on ``host:port``: what really reflects the instance's health.

    ``GET /live``: 200 while the launcher supervises (recovering included), 503 once it
    gave up (it then exits). ``GET /ready``: 200 only while the server is ready and no
    fault is being recovered from. Triton's own endpoints answer 200 with a dead stub.
    """

    def __init__(self, health: Callable[[], Health], host: str, port: int) -> None:
        self._server = ThreadingHTTPServer((host, port), _health_handler(health))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="instgenie-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _health_handler(health: Callable[[], Health]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            state = health()
            if self.path == "/live":
                ok = state is not Health.FAILED
            elif self.path == "/ready":
                ok = state is Health.READY
            else:
                self._reply(404, b"not found\n")
                return
            self._reply(200 if ok else 503, f"{state.value}\n".encode())

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            logger.debug("health: " + format, *args)

    return Handler
