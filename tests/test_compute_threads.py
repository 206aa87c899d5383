"""Intra-op threads: each thread keeps the count it set, and loading leaves no OpenMP team behind."""

from __future__ import annotations

import threading

import pytest
import torch

from instgenie.compute_threads import on_passing_thread, single_threaded_helper, use_intra_op_threads


def test_a_thread_keeps_its_count_when_another_sets_one_before_its_first_kernel() -> None:
    # The order that left the step loop single-threaded: the loop sets its count, a
    # helper sets 1, and only then does the loop run its first kernel.
    loop_set, helper_set = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def loop() -> None:
        use_intra_op_threads(2)
        loop_set.set()
        helper_set.wait(10)
        torch.ones(4).sum()
        seen["loop"] = torch.get_num_threads()

    def helper() -> None:
        loop_set.wait(10)
        single_threaded_helper()
        helper_set.set()
        seen["helper"] = torch.get_num_threads()

    threads = [threading.Thread(target=loop), threading.Thread(target=helper)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen == {"loop": 2, "helper": 1}


def test_on_passing_thread_returns_raises_and_leaves_no_thread() -> None:
    before = threading.active_count()
    caller_threads = torch.get_num_threads()
    assert on_passing_thread(lambda a, b=0: (a + b, torch.get_num_threads()), 1, b=2) == (3, caller_threads)
    with pytest.raises(KeyError, match="missing"):
        on_passing_thread(lambda: {}["missing"])
    assert threading.active_count() == before
