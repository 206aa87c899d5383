"""A process that must not outlive its parent: the server's model stubs and codec workers.

A SIGKILLed parent runs no cleanup, so its children are reparented and live on,
holding memory, /dev/shm semaphores and (for a Triton stub whose worker pool waits on
them at exit) each other. Each such child watches its parent itself and leaves at once.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_with_parent"]


def exit_with_parent(interval_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit``) when its parent dies.

    The parent is the one of the calling moment; the check runs every ``interval_s``
    seconds. Nothing is cleaned up: whoever supervised the parent cleans up after both.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="instgenie-exit-with-parent", daemon=True)
    thread.start()
    return thread
