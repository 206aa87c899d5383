"""The launcher's own listening sockets in front of Triton's: it owns every client connection.

Why (Triton 2.51, read in its source and reproduced): on SIGTERM the HTTP front waits,
one second at a time out of ``--exit-timeout-secs``, for every open client connection
to close, and only the client can close an idle keep-alive connection; the models then
get no time to unload, ``finalize()`` never runs and the server exits 1. An open gRPC
stream that carried a request holds that request, and with it the model, until the
client ends the stream, so the model never unloads at all. Neither can be fixed by
flags or signals: whoever holds the connections decides. So Triton listens only on
private loopback ports, and :class:`ConnectionFront` accepts clients on the public
ones and relays bytes both ways. Stopping, it closes the connections itself once the
work has drained; recovering, it refuses clients until the new server is ready, so
readiness checks tell the truth and in-flight clients hear of a failure at once.

The relay is a byte pump (no HTTP or HTTP/2 parsing) on one asyncio thread; Nagle is
off on both sides, so streamed progress is not delayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_CONNECT_TIMEOUT_S = 5.0
_CALL_TIMEOUT_S = 10.0


class ConnectionFront:
    """Public listeners for named endpoints (``http``, ``grpc``, ``metrics``), each relayed to a private port.

    Args:
        host: the public address to bind (``0.0.0.0``: every interface).
        ports: endpoint name -> public port (0: a free one, see :attr:`ports`).

    Until :meth:`route` names the private ports, and again after :meth:`refuse`, a
    new client connection is closed at once.
    """

    def __init__(self, host: str, ports: Mapping[str, int]) -> None:
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="instgenie-front", daemon=True)
        self._thread.start()
        self._targets: dict[str, int] = {}
        self._last_upload = 0.0  # loop time of the last request bytes a client sent (not metrics)
        self._relays: set[asyncio.Transport] = set()  # every open transport, client and upstream sides
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self.ports: dict[str, int] = {}
        try:
            for name, port in ports.items():
                server = self._call(asyncio.start_server(self._handler(name), host, port, reuse_address=True))
                self._servers[name] = server
                self.ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            self.close()
            raise

    # -- control (any thread) ------------------------------------------------------------
    def route(self, targets: Mapping[str, int]) -> None:
        """Relay new connections of each endpoint to ``127.0.0.1:targets[name]``."""
        self._loop.call_soon_threadsafe(self._targets.update, dict(targets))

    def refuse(self) -> int:
        """Close every open connection and refuse new ones until :meth:`route`; returns how many were open."""
        return self._call(self._refuse())

    def stop_listening(self) -> None:
        """Accept no new connection (open ones carry on)."""
        self._call(self._stop_listening())

    def open_connections(self) -> int:
        """Client connections being relayed now."""
        return self._call(self._count())

    def quiet_s(self) -> float:
        """Seconds since a client last sent bytes to the HTTP or gRPC endpoint (not the metrics one).

        A request in transit is invisible to the server's gauges for a moment; a drain
        waits for a quiet front as well as for idle gauges.
        """
        return self._call(self._quiet())

    def close(self) -> None:
        """Close every connection and listener and end the relay thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._stop_listening())
                self._call(self._refuse())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    # -- the loop's side ---------------------------------------------------------------
    def _call(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_CALL_TIMEOUT_S)

    async def _refuse(self) -> int:
        self._targets.clear()
        relays = list(self._relays)
        for transport in relays:
            transport.abort()
        return len(relays) // 2

    async def _stop_listening(self) -> None:
        for server in self._servers.values():
            server.close()

    async def _count(self) -> int:
        return len(self._relays) // 2

    async def _quiet(self) -> float:
        return self._loop.time() - self._last_upload

    def _uploaded(self) -> None:
        self._last_upload = self._loop.time()

    def _handler(self, name: str):  # type: ignore[no-untyped-def]
        async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            target = self._targets.get(name)
            if target is None:
                client_writer.transport.abort()
                return
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", target), _CONNECT_TIMEOUT_S
                )
            except (OSError, asyncio.TimeoutError) as exc:
                logger.info("%s: cannot reach the server on port %d (%s); closing the client", name, target, exc)
                client_writer.transport.abort()
                return
            pair = (client_writer.transport, upstream_writer.transport)
            for writer in (client_writer, upstream_writer):
                with contextlib.suppress(OSError):
                    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._relays.update(pair)
            uploaded = None if name == "metrics" else self._uploaded
            try:
                await asyncio.gather(
                    _pump(client_reader, upstream_writer, pair, uploaded), _pump(upstream_reader, client_writer, pair)
                )
            finally:
                for transport in pair:
                    # Both sides ended: an orderly close, as the client itself would (an
                    # abort here reset Triton's side while it still answered a cancelled
                    # stream). Errors and refuse() abort instead.
                    transport.close()
                    self._relays.discard(transport)

        return relay


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    pair: tuple[asyncio.Transport, ...],
    on_data: Callable[[], None] | None = None,
) -> None:
    """Copy ``reader`` to ``writer`` until EOF (then half-close, as the peer did); an error closes both sides."""
    try:
        while data := await reader.read(_CHUNK):
            if on_data is not None:
                on_data()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (OSError, RuntimeError):  # reset, aborted by refuse(), or write after close
        for transport in pair:
            transport.abort()
