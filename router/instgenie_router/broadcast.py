"""A registration goes to every healthy instance at once, so an edit routed anywhere
right after finds its template: the one fan-out both proxies (gRPC and HTTP) use."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, TimeoutError
from typing import TypeVar

from .instances import Instance

__all__ = ["register_everywhere"]

log = logging.getLogger("instgenie.router")

Answer = TypeVar("Answer")


def register_everywhere(
    instances: Sequence[Instance],
    register: Callable[[Instance], Answer],
    executor: Executor,
    timeout_s: float,
    *,
    first_here: bool = False,
) -> list[tuple[Instance, Answer | Exception]]:
    """Run ``register`` on every instance in parallel and wait for all of them (each up to
    ``timeout_s``). Returns each instance's answer, or the exception it raised, in order.

    ``first_here``: the first instance's registration runs in the calling thread (a
    caller that is itself one of ``executor``'s workers then takes one worker fewer).
    """
    results: list[tuple[Instance, Answer | Exception]] = []
    rest = instances[1:] if first_here and instances else instances
    futures = [(instance, executor.submit(register, instance)) for instance in rest]
    if first_here and instances:
        try:
            results.append((instances[0], register(instances[0])))
        except Exception as exc:  # noqa: BLE001
            log.warning("registering on %s failed: %s", instances[0].name, exc)
            results.append((instances[0], exc))
    for instance, future in futures:
        try:
            results.append((instance, future.result(timeout=timeout_s)))
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - one instance's failure is logged, not raised
            log.warning("registering on %s failed: %s", instance.name, exc)
            results.append((instance, exc))
    return results
