"""KServe v2 over gRPC, forwarded: the router's data plane.

Every ``GRPCInferenceService`` call a Triton client makes is answered here:
inference is routed by the policy, everything else (metadata, config, readiness of
a model) goes to any healthy instance, and the router answers ``ServerLive`` and
``ServerReady`` itself (ready while any instance is). A client stream
(``ModelStreamInfer``, the decoupled edit model) may carry many requests; each is
forwarded on an upstream stream of its own to the instance chosen for it, and the
upstream responses are written back in arrival order.

Reliability: a request whose instance refuses the connection or fails before its
final response is retried on another instance (edits and registrations are
idempotent: same inputs, same result, same template id), the failed instance is
ejected until a health check passes; a client that cancels or disconnects cancels
its upstream calls, which frees the slots on the instances; ``max_in_flight``
bounds the requests the router holds, beyond which it answers ``overloaded``.
Template registrations are broadcast to every healthy instance, so every instance
that may serve the template has it, and kept (:mod:`~instgenie_router.registrations`)
to replay on an instance that becomes healthy later without them.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from instgenie_protocol import EDIT_MODEL, ServerError, error_message

from .broadcast import register_everywhere
from .instances import Instance, InstancePool, RequestCost
from .metrics import RouterMetrics
from .policies import Policy
from .registrations import Registrations, bytes_output, list_request
from .requests import inspect, template_id_error
from .signals import Scraper

__all__ = ["GrpcRouter", "NoInstance"]

log = logging.getLogger("instgenie.router")

# Codes that mean "this instance could not serve it" rather than "the request is bad".
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}
_FINAL_OUTPUTS = {"EDITED_IMAGE", "TEMPLATE", "TEMPLATES"}
_MESSAGE_BYTES = 256 * 2**20  # edited images and templates are MBs


class NoInstance(RuntimeError):
    """No healthy instance is left to try."""


class Overloaded(RuntimeError):
    """The router holds ``max_in_flight`` requests already."""


class GrpcRouter(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        pool: InstancePool,
        policy: Policy,
        scraper: Scraper,
        metrics: RouterMetrics,
        *,
        max_in_flight: int = 256,
        request_timeout_s: float = 600.0,
        max_attempts: int = 3,
        registrations: Registrations | None = None,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.scraper = scraper
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self.max_attempts = max_attempts
        self.registrations = registrations if registrations is not None else Registrations()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._workers = ThreadPoolExecutor(max_workers=max_in_flight + 8, thread_name_prefix="instgenie-route")
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, service_pb2_grpc.GRPCInferenceServiceStub] = {}
        self._channels_lock = threading.Lock()

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
        with self._channels_lock:
            for channel in self._channels.values():
                channel.close()

    def forget(self, instance: Instance) -> None:
        """Close the channel to an instance that left the pool."""
        with self._channels_lock:
            channel = self._channels.pop(instance.name, None)
            self._stubs.pop(instance.name, None)
        if channel is not None:
            channel.close()

    # -- upstream ------------------------------------------------------------------------
    def stub(self, instance: Instance) -> service_pb2_grpc.GRPCInferenceServiceStub:
        with self._channels_lock:
            if instance.name not in self._stubs:
                channel = grpc.insecure_channel(
                    instance.grpc_address,
                    options=[
                        ("grpc.max_send_message_length", _MESSAGE_BYTES),
                        ("grpc.max_receive_message_length", _MESSAGE_BYTES),
                    ],
                )
                self._channels[instance.name] = channel
                self._stubs[instance.name] = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return self._stubs[instance.name]

    def choose(self, cost: RequestCost, exclude: set[str], key: str | None = None) -> Instance:
        """The policy's instance for ``cost``; with ``key``, the request is booked there in the
        same step (the caller then calls ``pool.finish(instance, key)``)."""
        candidates = self.pool.healthy(exclude)
        if not candidates:
            raise NoInstance("no healthy instance" + (" left to retry on" if exclude else ""))
        started = time.perf_counter()
        with self.pool.lock:  # the policy reads bookkeeping that dispatches update
            instance = self.policy.choose(candidates, cost, self.pool.stale_after_s)
            if key is not None:
                self.pool.start_unlocked(instance, key, cost)
        self.metrics.decision(time.perf_counter() - started)
        return instance

    def _eject(self, instance: Instance, error: grpc.RpcError) -> None:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.scraper.set_health(instance, False)

    def admit(self) -> None:
        """Count one more request held; raises ``Overloaded`` at ``max_in_flight`` (pair with :meth:`leave`)."""
        with self._in_flight_lock:
            if self._in_flight >= self.max_in_flight:
                raise Overloaded(f"the router holds {self.max_in_flight} requests; retry later")
            self._in_flight += 1
            self.metrics.gauge("instgenie_router_in_flight_requests", self._in_flight)

    def leave(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
            self.metrics.gauge("instgenie_router_in_flight_requests", self._in_flight)

    # -- server-level calls -------------------------------------------------------------
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=bool(self.pool.healthy()))

    def _any(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        tried: set[str] = set()
        while True:
            try:
                instance = self.choose(RequestCost(0.0), tried)
            except NoInstance as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            tried.add(instance.name)
            try:
                return getattr(self.stub(instance), method)(request, timeout=10.0)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    context.abort(exc.code(), exc.details() or str(exc))
                self._eject(instance, exc)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The fleet's statistics: every healthy instance's, summed per model and version.

        Counters then only grow, whichever instances served a request (perf_analyzer
        reads them before and after a measurement window).
        """
        merged: dict[tuple[str, str], Any] = {}
        answered = False
        for instance in self.pool.healthy():
            try:
                response = self.stub(instance).ModelStatistics(request, timeout=10.0)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    context.abort(exc.code(), exc.details() or str(exc))
                self._eject(instance, exc)
                continue
            answered = True
            for stats in response.model_stats:
                key = (stats.name, stats.version)
                if key in merged:
                    _add_statistics(merged[key], stats)
                else:
                    merged[key] = stats
        if not answered:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy instance")
        return pb.ModelStatisticsResponse(model_stats=[merged[key] for key in sorted(merged)])

    # -- inference ------------------------------------------------------------------------
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.admit()
        except Overloaded as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            info = inspect(request, pixels_per_token=self.pool.pixels_per_token(), cost=self.pool.step_cost())
            refused = template_id_error(info, request.id)
            if refused is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
            tried: set[str] = set()
            for _ in range(self.max_attempts):
                key = uuid.uuid4().hex
                try:
                    instance = self.choose(info.cost, tried, key)
                except NoInstance as exc:
                    context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                tried.add(instance.name)
                self.metrics.count("instgenie_router_routed_total", instance.name)
                try:
                    return self.stub(instance).ModelInfer(request, timeout=self.request_timeout_s)
                except grpc.RpcError as exc:
                    self.metrics.count("instgenie_router_failed_total", instance.name)
                    if exc.code() not in _RETRYABLE:
                        context.abort(exc.code(), exc.details() or str(exc))
                    self._eject(instance, exc)
                    self.metrics.count("instgenie_router_retried_total", instance.name)
                finally:
                    self.pool.finish(instance, key)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"no instance served the request in {self.max_attempts} attempts")
        finally:
            self.leave()

    def ModelStreamInfer(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        responses: queue.Queue[Any] = queue.Queue()
        stream = _ClientStream(responses.put)
        context.add_callback(stream.cancel)  # the client cancelled, or its stream ended

        def read() -> None:
            try:
                for request in request_iterator:
                    responses.put(_STARTED)
                    self._workers.submit(self._serve, request, stream)
            except grpc.RpcError:
                pass  # the client went away: stream.cancel runs
            except Exception:  # noqa: BLE001 - a reader must not die silently
                log.exception("reading a client stream failed")
            finally:
                responses.put(_READ_DONE)

        threading.Thread(target=read, name="instgenie-route-reader", daemon=True).start()
        reading, active = True, 0
        while reading or active:
            item = responses.get()
            if item is _STARTED:
                active += 1
            elif item is _FINISHED:
                active -= 1
            elif item is _READ_DONE:
                reading = False
            elif not stream.cancelled.is_set():
                yield item

    def _serve(self, request: Any, stream: "_ClientStream") -> None:
        """Forward one streamed request (with retries); always ends with ``_FINISHED``."""
        try:
            self.admit()
        except Overloaded as exc:
            stream.send(_error_response(request, "overloaded", str(exc)))
            stream.send(_FINISHED)
            return
        try:
            info = inspect(request, pixels_per_token=self.pool.pixels_per_token(), cost=self.pool.step_cost())
            refused = template_id_error(info, request.id)
            if refused is not None:  # a malformed id never leaves the router
                stream.send(_error_text_response(request, refused))
            elif request.model_name == EDIT_MODEL and info.action == "register":
                self._broadcast(request, info.cost, stream)
            else:
                self._forward(request, self._with_record_cost(info.cost), stream)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not hang its stream
            log.exception("routing request %s failed", request.id)
            stream.send(_error_response(request, "router_error", f"{type(exc).__name__}: {exc}"))
        finally:
            self.leave()
            stream.send(_FINISHED)

    def _with_record_cost(self, cost: RequestCost) -> RequestCost:
        """``cost`` with what recording its template costs, when the router could replay it."""
        if cost.template_id is None:
            return cost
        return dataclasses.replace(cost, record_token_steps=self.registrations.record_token_steps(cost.template_id))

    def _forward(self, request: Any, cost: RequestCost, stream: "_ClientStream", exclude: set[str] | None = None) -> bool:
        """Stream ``request`` to an instance and its responses to the client; whether it succeeded."""
        tried = set(exclude or ())
        refusals: list[Any] = []  # unknown_template answers: the client's error if no instance has it
        for _attempt in range(self.max_attempts):
            if stream.cancelled.is_set():
                return False
            key = uuid.uuid4().hex
            try:
                instance = self.choose(cost, tried, key)
            except NoInstance as exc:
                stream.send(refusals[-1] if refusals else _error_response(request, "unavailable", str(exc)))
                return False
            tried.add(instance.name)
            outcome = self._attempt(instance, request, cost, stream, refusals, key)
            if outcome is not None:
                return outcome
            self.metrics.count("instgenie_router_retried_total", instance.name)
        stream.send(refusals[-1] if refusals else _error_response(
            request, "unavailable", f"no instance served the request in {self.max_attempts} attempts"
        ))  # fmt: skip
        return False

    def _attempt(
        self,
        instance: Instance,
        request: Any,
        cost: RequestCost,
        stream: "_ClientStream",
        refusals: list[Any] | None = None,
        key: str | None = None,
    ) -> bool | None:
        """One upstream stream; ``None`` when the request should go to another instance
        (an ``unknown_template`` refusal is then appended to ``refusals``). ``key``: the
        booking :meth:`choose` made, else one is made here."""
        if key is None:
            key = uuid.uuid4().hex
            self.pool.start(instance, key, cost)
        self.metrics.count("instgenie_router_routed_total", instance.name)
        call = self.stub(instance).ModelStreamInfer(iter([request]), timeout=self.request_timeout_s)
        stream.track(call)
        final = forwarded = False
        try:
            for response in call:
                if not forwarded and ServerError.parse(response.error_message).reason == "unknown_template":
                    # This instance lacks the template (it joined after the registration,
                    # or lost its disk): another one may hold it.
                    log.info("request %s: %s lacks its template; trying another instance", request.id, instance.name)
                    call.cancel()
                    with self.pool.lock:
                        instance.registered.discard(cost.template_id or "")
                    if refusals is not None:
                        refusals.append(response)
                    return None
                final = final or _is_final(response)
                forwarded = True
                if not response.error_message:
                    held = bytes_output(response, "TEMPLATE")
                    if held:  # a registration, or an edit of it: the instance holds that template
                        self.pool.registered(instance, {held[0].decode(errors="replace")})
                stream.send(response)
            return True
        except grpc.RpcError as exc:
            if stream.cancelled.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                return False
            self.metrics.count("instgenie_router_failed_total", instance.name)
            if final or exc.code() not in _RETRYABLE:
                reason = "timeout" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "upstream_error"
                stream.send(_error_response(request, reason, f"{instance.name}: {exc.code().name}: {exc.details()}"))
                return False
            log.warning("request %s failed on %s (%s); retrying elsewhere", request.id, instance.name, exc.code().name)
            self._eject(instance, exc)
            return None
        finally:
            stream.untrack(call)
            self.pool.finish(instance, key)

    def _broadcast(self, request: Any, cost: RequestCost, stream: "_ClientStream") -> None:
        """Register a template on every healthy instance, in parallel; answer when all are done.

        The client sees one instance's responses, after every instance holds the
        template, so an edit routed anywhere right after finds it. The other
        registrations are not cancelled with the client (the template is wanted
        everywhere it may be routed).
        """
        key = uuid.uuid4().hex
        try:
            chosen = self.choose(cost, set(), key)
        except NoInstance as exc:
            stream.send(_error_response(request, "unavailable", str(exc)))
            return
        held: list[Any] = []

        def register(instance: Instance) -> bool | None:
            if instance is chosen:  # its responses are the client's
                return self._attempt(chosen, request, cost, stream.holding(held), key=key)
            self._register_quietly(instance, request, cost)
            return None

        everywhere = [chosen, *self.pool.healthy({chosen.name})]
        results = register_everywhere(everywhere, register, self._workers, self.request_timeout_s, first_here=True)
        outcome = results[0][1] if not isinstance(results[0][1], Exception) else None
        template_ids = [t for r in held if not r.error_message for t in bytes_output(r, "TEMPLATE") or []]
        if template_ids:
            self.registrations.remember(template_ids[0].decode(errors="replace"), request, cost.token_steps)
        for response in held:
            stream.send(response)
        if outcome is None:  # the chosen instance failed: another one answers (it holds the template now)
            self._forward(request, cost, stream, exclude={chosen.name})

    def replay(self, instance: Instance) -> None:
        """In the background: register on ``instance`` the remembered templates it lacks."""
        if len(self.registrations):
            self._workers.submit(self._replay, instance)

    def _replay(self, instance: Instance) -> None:
        listed: list[Any] = []
        asked = self._attempt(instance, list_request(EDIT_MODEL, f"router-list-{uuid.uuid4().hex[:8]}"),
                              RequestCost(1.0), _ClientStream(listed.append))  # fmt: skip
        held = next((bytes_output(r, "TEMPLATES") for r in listed if not r.error_message), None)
        if not asked or held is None:
            log.warning("cannot list the templates of %s: %s", instance.name, [r.error_message for r in listed])
            return
        self.pool.registered(instance, {t.decode(errors="replace") for t in held}, replace=True)
        for template_id, request, token_steps in self.registrations.missing(instance.registered):
            if not instance.healthy:
                return
            log.info("registering %s on %s, which joined without it", template_id, instance.name)
            self.metrics.count("instgenie_router_replayed_registrations_total", instance.name)
            self._register_quietly(instance, request, RequestCost(token_steps, template_id))

    def _register_quietly(self, instance: Instance, request: Any, cost: RequestCost) -> None:
        errors: list[str] = []

        def collect(response: Any) -> None:
            if response.error_message:
                errors.append(response.error_message)

        if not self._attempt(instance, request, cost, _ClientStream(collect)) or errors:
            log.warning("registering %s on %s failed: %s", request.id, instance.name, errors or "unreachable")


class _ClientStream:
    """Where one client stream's responses go, and the upstream calls to cancel with it."""

    def __init__(self, send: Callable[[Any], None], cancelled: threading.Event | None = None) -> None:
        self.send = send
        self.cancelled = cancelled or threading.Event()
        self._calls: set[Any] = set()
        self._lock = threading.Lock()

    def holding(self, held: list[Any]) -> "_ClientStream":
        """The same stream (same cancellation) with responses kept in ``held`` instead of sent."""
        view = _ClientStream(held.append, self.cancelled)
        view._calls, view._lock = self._calls, self._lock
        return view

    def track(self, call: Any) -> None:
        with self._lock:
            self._calls.add(call)
        if self.cancelled.is_set():
            call.cancel()

    def untrack(self, call: Any) -> None:
        with self._lock:
            self._calls.discard(call)

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            for call in list(self._calls):
                call.cancel()


def _answered_by_any_instance(method: str) -> Callable[..., Any]:
    def call(self: GrpcRouter, request: Any, context: grpc.ServicerContext) -> Any:
        return self._any(method, request, context)

    call.__name__ = call.__qualname__ = method
    call.__doc__ = f"``{method}``, answered by any healthy instance (they serve one model repository)."
    return call


for _method in ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig", "RepositoryIndex"):
    setattr(GrpcRouter, _method, _answered_by_any_instance(_method))

_STARTED, _FINISHED, _READ_DONE = object(), object(), object()


def _add_statistics(total: Any, other: Any) -> None:
    """Add statistics message ``other`` into ``total``: counts and durations summed,
    ``last_inference`` the later one, repeated entries matched by batch size or map key."""
    for field, value in other.ListFields():
        if field.name == "last_inference":
            total.last_inference = max(total.last_inference, value)
        elif field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            target = getattr(total, field.name)
            for key, entry in value.items():
                if key in target:
                    _add_statistics(target[key], entry)
                else:
                    target[key].CopyFrom(entry)
        elif field.type == field.TYPE_MESSAGE and field.is_repeated:
            target = getattr(total, field.name)
            for entry in value:
                match = next((t for t in target if getattr(t, "batch_size", None) == getattr(entry, "batch_size", object())), None)
                if match is None:
                    target.add().CopyFrom(entry)
                else:
                    _add_statistics(match, entry)
        elif field.type == field.TYPE_MESSAGE:
            _add_statistics(getattr(total, field.name), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(total, field.name, getattr(total, field.name) + value)


def _is_final(response: Any) -> bool:
    if response.error_message:
        return True
    infer = response.infer_response
    final = infer.parameters.get("triton_final_response")
    if final is not None and final.bool_param:
        return True
    return any(output.name in _FINAL_OUTPUTS for output in infer.outputs)


def _error_response(request: Any, reason: str, message: str) -> Any:
    """An error on the stream, worded like the instances' own (``[request <id>] <reason>: ...``)."""
    return _error_text_response(request, error_message(request.id, reason, message))


def _error_text_response(request: Any, text: str) -> Any:
    return pb.ModelStreamInferResponse(
        error_message=text,
        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
    )
