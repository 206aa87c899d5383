"""KServe v2 over HTTP, forwarded: ``generate_stream`` (SSE), ``generate``, ``infer``, metadata.

An inference POST is routed by the policy from its JSON body (``generate*``: inputs
by name) and streamed back as the instance writes it, so server-sent events arrive
step by step; other ``/v2`` requests go to any healthy instance. A request that
cannot connect is retried on another instance before anything reached the client.
Closing the client connection closes the upstream one, which is how an SSE client
cancels a request on Triton. ``ACTION=register`` goes to every healthy instance.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING

from instgenie_protocol import error_message

from .broadcast import register_everywhere
from .grpc_proxy import NoInstance
from .instances import Instance, RequestCost
from .requests import inspect_json, template_id_error

if TYPE_CHECKING:
    from .service import Router

__all__ = ["forward", "open_routed"]

log = logging.getLogger("instgenie.router")

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}
_CHUNK = 64 * 1024


def forward(handler: BaseHTTPRequestHandler, router: "Router", method: str) -> None:
    """Answer ``handler``'s request from an instance (the handler's headers are read, its body not yet)."""
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else b""
    cost, register, request_id = RequestCost(0.0), False, ""
    if method == "POST" and "/generate" in handler.path:
        try:
            fields = json.loads(body or b"{}")
            info = inspect_json(fields, pixels_per_token=router.pool.pixels_per_token(), cost=router.pool.step_cost())
            cost, register, request_id = info.cost, info.action == "register", str(fields.get("id", ""))
        except (ValueError, AttributeError):
            pass  # not JSON: the instance answers with its own error
        else:
            refused = template_id_error(info, request_id)
            if refused is not None:  # a malformed id never leaves the router
                _reply_error(handler, 400, refused)
                return
    if register:
        _broadcast(router, handler, method, body, cost)
        return
    try:
        instance, key, upstream = open_routed(router, method, handler.path, body, _forwarded_headers(handler), cost)
    except NoInstance as exc:
        _reply_error(handler, 503, f"no healthy instance: {exc}")
        return
    _relay(router, instance, key, upstream, handler, request_id)


def open_routed(
    router: "Router", method: str, path: str, body: bytes, headers: dict[str, str], cost: RequestCost
) -> tuple[Instance, str, http.client.HTTPConnection]:
    """Send a request to the policy's instance for ``cost``, booked there under the key
    returned (the caller ends with ``router.pool.finish(instance, key)``); an instance
    that cannot be reached is marked unhealthy and the next one tried.

    Raises:
        NoInstance: no healthy instance is left to try.
    """
    tried: set[str] = set()
    while True:
        key = uuid.uuid4().hex
        instance = router.grpc.choose(cost, tried, key)
        tried.add(instance.name)
        try:
            return instance, key, _open(instance, method, path, body, headers, router.config.request_timeout_s)
        except OSError as exc:
            router.pool.finish(instance, key)
            log.warning("HTTP %s %s: %s unreachable (%s); retrying elsewhere", method, path, instance.name, exc)
            router.scraper.set_health(instance, False)
            router.metrics.count("instgenie_router_retried_total", instance.name)


def _forwarded_headers(handler: BaseHTTPRequestHandler) -> dict[str, str]:
    return {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}


def _open(
    instance: Instance, method: str, path: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(instance.host, instance.http_port, timeout=timeout_s)
    connection.request(method, path, body=body or None, headers=headers)
    return connection


def _relay(
    router: "Router",
    instance: Instance,
    key: str,
    connection: http.client.HTTPConnection,
    handler: BaseHTTPRequestHandler,
    request_id: str,
) -> None:
    """Stream the instance's answer to the client; ``key``: the request's booking on ``instance``.

    The whole answer is bounded by the router's ``request_timeout_s`` (each read waits
    at most until that deadline), so a stream whose instance goes silent ends; an SSE
    client then gets an error event naming its request, as an instance's own errors read.
    """
    router.metrics.count("instgenie_router_routed_total", instance.name)
    deadline = time.monotonic() + router.config.request_timeout_s
    answered = streaming = False
    try:
        response = connection.getresponse()
        handler.send_response(response.status)
        answered = True
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                handler.send_header(name, value)
        handler.send_header("Connection", "close")  # the body ends when the connection does
        handler.end_headers()
        streaming = "text/event-stream" in (response.getheader("Content-Type") or "")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no final answer within the router's request timeout ({router.config.request_timeout_s:g} s)")
            assert connection.sock is not None
            connection.sock.settimeout(left)
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            handler.wfile.write(chunk)
            handler.wfile.flush()
    except (OSError, http.client.HTTPException) as exc:
        # The client went away (which cancels the request upstream as the connection
        # closes below), or the instance failed or went silent: nothing can be retried.
        log.info("HTTP %s: relay from %s ended: %s", handler.path, instance.name, exc)
        timed_out = isinstance(exc, TimeoutError)
        text = error_message(request_id, "timeout" if timed_out else "unavailable",
                             f"instance {instance.name} stopped answering: {exc}")  # fmt: skip
        with contextlib.suppress(OSError):
            if not answered:
                _reply_error(handler, 504 if timed_out else 502, text)
            elif streaming:  # an SSE client hears it as the instances' own errors read
                handler.wfile.write(b"data: " + json.dumps({"error": text}).encode() + b"\n\n")
                handler.wfile.flush()
    finally:
        connection.close()
        router.pool.finish(instance, key)
        handler.close_connection = True


def _broadcast(router: "Router", handler: BaseHTTPRequestHandler, method: str, body: bytes, cost: RequestCost) -> None:
    instances = router.pool.healthy()
    if not instances:
        _reply_error(handler, 503, "no healthy instance")
        return

    def register(instance: Instance) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = _open(instance, method, handler.path, body, _forwarded_headers(handler), router.config.request_timeout_s)
        try:
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    with ThreadPoolExecutor(len(instances)) as pool:
        results = register_everywhere(instances, register, pool, router.config.request_timeout_s)
    answers = [answer for _, answer in results if not isinstance(answer, Exception)]
    if not answers:
        _reply_error(handler, 503, "no instance could register the template")
        return
    status, headers, content = answers[0]
    handler.send_response(status)
    for name, value in headers:
        if name.lower() not in _HOP_BY_HOP:
            handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(content)))
    handler.end_headers()
    handler.wfile.write(content)


def _reply_error(handler: BaseHTTPRequestHandler, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
