"""Templates without registration (instgenie.auto_register) in the step loop, without Triton.

The loop runs one request at a time here (max_active=1): each edit and each recording
then runs alone, as the explicitly registered template's run does, so the exactness
invariant applies and the comparisons are bit-exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from conftest import engine_over, png, rect_mask, template_image
from instgenie import Engine
from instgenie.auto_register import AutoRegisterConfig, AutoRegistrar
from instgenie.cache.host import HostTier
from instgenie.scheduler import FcfsScheduler, SchedulerConfig
from instgenie.step_loop import EditRequest, LoopObserver, StepLoop
from test_step_loop import Recorder

STEPS = 3


class Counts(LoopObserver):
    def __init__(self) -> None:
        self.hits = self.misses = self.recorded = 0

    def auto_template(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def auto_registered(self) -> None:
        self.recorded += 1


def _loop(engine: Engine, policy: str, observer: LoopObserver, **config: object) -> StepLoop:
    return StepLoop(engine, scheduler=FcfsScheduler(SchedulerConfig(max_active=1)), observer=observer,
                    auto_register=AutoRegistrar(AutoRegisterConfig(policy=policy, **config)))  # type: ignore[arg-type]


def _edit(loop: StepLoop, name: str, image: bytes, mask: bytes, prompt: str = "a green chair") -> Recorder:
    sink = Recorder()
    loop.submit(EditRequest(name, prompt=prompt, mask=mask, image=image, seed=5, steps=STEPS), sink)
    return sink.wait(120)


def _wait_recorded(observer: Counts, count: int, loop: StepLoop) -> None:
    deadline = time.monotonic() + 60
    while observer.recorded < count:
        assert time.monotonic() < deadline, "the recording never finished"
        time.sleep(0.02)
    assert loop.load().waiting == 0


@pytest.mark.parametrize("variant", ["flux-fill", "sd-inpaint"])
def test_the_third_edit_of_a_raw_image_is_masked_and_equals_the_registered_templates_edit(engines, variant: str) -> None:  # type: ignore[no-untyped-def]
    engine = engine_over(engines[variant])  # an empty cache: the loop's own
    observer = Counts()
    loop = _loop(engine, "second_sight", observer)
    image, mask = png(template_image(81)), png(rect_mask(0.25, seed=81))
    try:
        first = _edit(loop, "first", image, mask)
        second = _edit(loop, "second", image, mask)
        _wait_recorded(observer, 1, loop)
        third = _edit(loop, "third", image, mask)
    finally:
        loop.stop()
    for sink in (first, second, third):
        assert sink.error is None, sink.error
    assert first.outcome.computed_tokens == first.outcome.num_tokens == second.outcome.computed_tokens
    assert 0 < third.outcome.computed_tokens < third.outcome.num_tokens  # only the masked tokens
    assert (observer.misses, observer.recorded, observer.hits) == (2, 1, 1)
    # The same edit of the template registered by hand (the triggering edit's prompt, same settings), in another engine.
    explicit = engine_over(engines[variant])
    template = explicit.register_template(image, "a green chair", seed=5, steps=STEPS)
    assert third.outcome.template_id == template.template_id
    by_hand = explicit.edit(mask, "a green chair", template_id=template.template_id)
    assert torch.equal(third.outcome.latents, by_hand.latents)
    assert third.outcome.png == by_hand.png
    # Its first two edits were the full computation.
    assert torch.equal(first.outcome.latents, explicit.edit(mask, "a green chair", image=image, seed=5, steps=STEPS).latents)


def test_policy_off_never_records_and_always_records_on_first_sight(engines) -> None:  # type: ignore[no-untyped-def]
    image, mask = png(template_image(82)), png(rect_mask(0.3, seed=82))
    engine = engine_over(engines["flux-fill"])
    observer = Counts()
    loop = _loop(engine, "off", observer)
    try:
        edits = [_edit(loop, f"off{i}", image, mask) for i in range(3)]
    finally:
        loop.stop()
    assert all(e.outcome.computed_tokens == e.outcome.num_tokens for e in edits)
    assert (observer.misses, observer.recorded, observer.hits) == (3, 0, 0) and engine.template_ids() == []

    eager = Counts()
    loop = _loop(engine_over(engines["flux-fill"]), "always", eager)
    try:
        _edit(loop, "once", image, mask)
        _wait_recorded(eager, 1, loop)
        after = _edit(loop, "twice", image, mask)
    finally:
        loop.stop()
    assert after.outcome.computed_tokens < after.outcome.num_tokens and eager.hits == 1


def test_a_template_a_client_registered_is_found_even_with_policy_off(engines) -> None:  # type: ignore[no-untyped-def]
    image, mask = png(template_image(83)), png(rect_mask(0.3, seed=83))
    engine = engine_over(engines["flux-fill"])
    observer = Counts()
    loop = _loop(engine, "off", observer)
    try:
        registered = Recorder()
        loop.submit(EditRequest("reg", action="register", prompt="a shelf", image=image, seed=5, steps=STEPS), registered)
        registered.wait(120)
        found = _edit(loop, "found", image, mask)
        _edit(loop, "again", image, mask, prompt="a sofa")
    finally:
        loop.stop()
    assert found.outcome.computed_tokens < found.outcome.num_tokens and observer.hits == 2
    assert found.outcome.template_id == registered.outcome.template_id


def test_auto_templates_are_bounded_and_dropped_least_recently_used_first(engines) -> None:  # type: ignore[no-untyped-def]
    engine = engine_over(engines["flux-fill"])
    observer = Counts()
    loop = _loop(engine, "always", observer, max_templates=2)
    images = [png(template_image(90 + i)) for i in range(3)]
    mask = png(rect_mask(0.3, seed=90))
    try:
        for index, image in enumerate(images):
            _edit(loop, f"img{index}", image, mask)
            _wait_recorded(observer, index + 1, loop)
    finally:
        loop.stop()
    assert len(engine.template_ids()) == 2  # the first image's template was dropped
    assert loop.auto_register is not None and len(loop.auto_register.auto_templates()) == 2


def test_a_recording_the_cache_cannot_hold_fails_alone_and_edits_carry_on(engines) -> None:  # type: ignore[no-untyped-def]
    # No disk tier and a 1 KiB host budget: no template fits, so every recording fails.
    engine = engine_over(engines["flux-fill"], host_budget_bytes=1024)
    observer = Counts()
    loop = _loop(engine, "always", observer)
    image, mask = png(template_image(86)), png(rect_mask(0.3, seed=86))
    try:
        edits = []
        for index in range(2):
            edits.append(_edit(loop, f"edit{index}", image, mask))
            deadline = time.monotonic() + 60
            while loop.load() != type(loop.load())():  # the failed recording has left the loop
                assert time.monotonic() < deadline, loop.load()
                time.sleep(0.02)
    finally:
        loop.stop()
    assert all(e.error is None and e.outcome.computed_tokens == e.outcome.num_tokens for e in edits)
    assert (observer.misses, observer.recorded, observer.hits) == (2, 0, 0) and engine.template_ids() == []
    assert loop.auto_register is not None and loop.auto_register.auto_templates() == []


@dataclass
class _Sized:
    """A host-tier entry stand-in: the tier reads nothing of an entry but its size."""

    nbytes: int


def test_expendable_entries_leave_host_memory_first() -> None:
    evicted: list[tuple[str, int]] = []
    tier = HostTier(budget_bytes=300, on_evict=lambda key, size: evicted.append(key))
    tier.put(("registered", 0), _Sized(100))  # type: ignore[arg-type]
    tier.put(("auto", 0), _Sized(100))  # type: ignore[arg-type]
    tier.mark_expendable("auto")
    tier.get(("registered", 0))  # least recently used now: the auto one; touch it too
    tier.get(("auto", 0))
    tier.put(("new", 0), _Sized(150))  # type: ignore[arg-type]  # 50 bytes over: one entry goes
    assert evicted == [("auto", 0)]  # though "registered" was used less recently

