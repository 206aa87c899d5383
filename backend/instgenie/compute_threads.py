"""One thread per process runs multi-threaded CPU kernels: the one that steps the denoiser.

PyTorch's CPU kernels run on OpenMP (libgomp). Each thread that calls a
multi-threaded kernel gets a team of its own, kept until that thread exits, and
libgomp counts every team's threads. While it manages more threads than the machine
has CPUs, it stops letting an idle team spin and puts it to sleep at once, so every
kernel of the step loop then pays a futex wake-up of its team. A step is a few
thousand small kernels: on 2 cores one masked edit (flux-fill ``small``, 512 px)
took 1.6 s on a thread beside the team its loading had left on the main thread,
against 1.05 s with no second team (``docs/benchmarks/serving.md``, "Where the
serving path lost time").

So a process that serves keeps the step loop's team the only one:

- it loads the model on a thread that exits afterwards (:func:`on_passing_thread`);
- its helper threads (request preparation beside an out-of-process codec, cache
  prefetch) call :func:`single_threaded_helper` first: their tensor work is copies,
  packing, seeded noise and elementwise arithmetic, whose results do not depend on
  the thread count, so exactness holds with one thread.

A helper that runs a network (the in-process codec's text encoders and VAE) must keep
the loop's thread count instead: a matmul's rounding depends on how it is split.

Every thread sets its count with :func:`use_intra_op_threads`, never with a bare
``torch.set_num_threads``: torch fixes a thread's count lazily, at its first kernel,
from whatever count any thread set last, so a helper setting 1 between the loop's
``set_num_threads(2)`` and its first step left the loop single-threaded.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def use_intra_op_threads(count: int) -> None:
    """Run this thread's CPU kernels on ``count`` threads, whatever other threads set later."""
    torch.get_num_threads()  # torch's lazy per-thread initialisation, now rather than at the first kernel
    torch.set_num_threads(count)


def single_threaded_helper() -> None:
    """Run this thread's kernels on itself alone, so it starts no OpenMP team."""
    use_intra_op_threads(1)


def on_passing_thread(fn: Callable[..., T], *args: object, name: str = "instgenie-load", **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` on a new thread that exits afterwards, taking its OpenMP team along.

    The thread keeps the caller's intra-op thread count; ``fn``'s exception is raised here.
    """
    threads = torch.get_num_threads()
    outcome: dict[str, object] = {}

    def run() -> None:
        use_intra_op_threads(threads)
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
