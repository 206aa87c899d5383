"""The step loop without Triton: admission, overlap, cancellation, bounds, shutdown."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from conftest import png, rect_mask, template_image
from instgenie import Engine
from instgenie.errors import Cancelled, InstGenIEError, QueueFull, ShuttingDown
from instgenie.scheduler import FcfsScheduler, SchedulerConfig
from instgenie.step_loop import PHASES, EditRequest, JobOutcome, LoopObserver, StepLoop


@dataclass
class Recorder:
    """A sink that keeps every event with its time."""

    cancel_after_step: int | None = None
    steps: list[tuple[float, int, int]] = field(default_factory=list)
    outcome: JobOutcome | None = None
    error: InstGenIEError | None = None
    settled_count: int = 0
    settled: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def progress(self, step: int, total_steps: int) -> None:
        self.steps.append((time.monotonic(), step, total_steps))
        if self.cancel_after_step is not None and step >= self.cancel_after_step:
            self.cancel.set()

    def finish(self, outcome: JobOutcome) -> None:
        self.outcome = outcome
        self._settle()

    def fail(self, error: InstGenIEError) -> None:
        self.error = error
        self._settle()

    def _settle(self) -> None:
        self.settled_count += 1
        self.settled.set()

    def wait(self, timeout: float = 60) -> "Recorder":
        assert self.settled.wait(timeout), "request never settled"
        return self


class Steps(LoopObserver):
    def __init__(self) -> None:
        self.durations: list[float] = []
        self.batch_sizes: list[int] = []
        self.joined_after: list[int] = []
        self.reasons: list[str] = []

    def step(self, duration_s: float, batch_size: int, row_tokens: int) -> None:
        self.durations.append(duration_s)
        self.batch_sizes.append(batch_size)

    def joined(self, steps_waited: int) -> None:
        self.joined_after.append(steps_waited)

    def failed(self, reason: str) -> None:
        self.reasons.append(reason)


@pytest.fixture
def flux(engines: dict[str, Engine]) -> Engine:
    return engines["flux-fill"]


@pytest.fixture
def template_id(flux: Engine) -> str:
    return flux.register_template(png(template_image(11)), "a room", seed=3, steps=6).template_id


def edit(request_id: str, template_id: str, ratio: float, seed: int = 1, **kwargs) -> EditRequest:
    return EditRequest(request_id, prompt="a lamp", mask=png(rect_mask(ratio, seed=seed)), template_id=template_id, **kwargs)


def run_loop(flux: Engine, **kwargs) -> tuple[StepLoop, Steps]:
    observer = Steps()
    return StepLoop(flux, observer=observer, **kwargs), observer


# -- scheduler -----------------------------------------------------------------------


@dataclass
class Candidate:
    computed_tokens: int
    rows: int = 1
    grid_key: tuple[int, int] = (128, 128)
    full_blocks: int = 0


def test_scheduler_admits_in_order_up_to_max_active() -> None:
    scheduler = FcfsScheduler(SchedulerConfig(max_active=3))
    assert scheduler.admit([Candidate(10)], [Candidate(5), Candidate(7), Candidate(9)]) == [0, 1]


def test_scheduler_keeps_one_grid_per_batch_and_lets_the_batch_drain_for_another() -> None:
    scheduler = FcfsScheduler(SchedulerConfig(max_active=8))
    other = Candidate(5, grid_key=(256, 256))
    # The request on another grid blocks the ones behind it: no starvation.
    assert scheduler.admit([Candidate(10)], [Candidate(5), other, Candidate(6)]) == [0]
    assert scheduler.admit([], [other, Candidate(6)]) == [0]


def test_scheduler_token_budget_counts_padding_but_always_admits_a_lone_request() -> None:
    scheduler = FcfsScheduler(SchedulerConfig(max_active=8, max_batch_tokens=100))
    assert scheduler.admit([], [Candidate(500)]) == [0]
    # 2 rows padded to 40 tokens = 80 fits; a third row of 40 would be 120.
    assert scheduler.admit([Candidate(40)], [Candidate(10), Candidate(30)]) == [0]
    assert scheduler.admit([Candidate(10, rows=2)], [Candidate(30)]) == [0]  # 3 rows x 30 = 90


def test_scheduler_splits_a_step_into_calls_of_similar_token_counts() -> None:
    running = [Candidate(100), Candidate(10), Candidate(95), Candidate(12), Candidate(50, rows=2)]
    assert FcfsScheduler(SchedulerConfig()).calls(running) == [[0, 1, 2, 3, 4]]  # one call by default
    calls = FcfsScheduler(SchedulerConfig(max_padding_waste=0.25)).calls(running)
    assert calls == [[1, 3], [4], [2, 0]]
    for call in calls:  # padded cost within 25% of the useful cost
        longest = max(running[i].computed_tokens for i in call)
        rows = sum(running[i].rows for i in call)
        assert rows * longest <= 1.25 * sum(running[i].rows * running[i].computed_tokens for i in call)


def test_scheduler_puts_each_planned_prefix_in_calls_of_its_own() -> None:
    running = [Candidate(10), Candidate(12, full_blocks=2), Candidate(11), Candidate(40, full_blocks=2)]
    assert FcfsScheduler(SchedulerConfig()).calls(running) == [[0, 2], [1, 3]]
    calls = FcfsScheduler(SchedulerConfig(max_padding_waste=0.25)).calls(running)
    assert calls == [[0, 2], [1], [3]]


def test_scheduler_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_active=0)


# -- the loop --------------------------------------------------------------------------


@pytest.mark.parametrize("waste", [None, 0.25], ids=["one call", "calls by token count"])
def test_batched_results_equal_each_request_alone(flux: Engine, template_id: str, waste: float | None) -> None:
    loop, observer = run_loop(flux, scheduler=FcfsScheduler(SchedulerConfig(max_active=4, max_padding_waste=waste)))
    try:
        requests = [edit(f"r{i}", template_id, ratio, seed=i) for i, ratio in enumerate([0.1, 0.3, 0.5])]
        requests.append(EditRequest("raw", prompt="a vase", mask=png(rect_mask(0.2, seed=9)), image=png(template_image(12)), seed=2, steps=4))
        sinks = [Recorder() for _ in requests]
        for request, sink in zip(requests, sinks):
            loop.submit(request, sink)
        for sink in sinks:
            sink.wait()
    finally:
        loop.stop()
    assert max(observer.batch_sizes) >= 2  # they really shared steps
    for request, sink in zip(requests, sinks):
        assert sink.error is None, sink.error
        alone = flux.edit(request.mask, request.prompt, template_id=request.template_id, image=request.image, seed=request.seed, steps=request.steps)
        assert (sink.outcome.latents - alone.latents).abs().max().item() <= 1e-5
        assert [s for _, s, _ in sink.steps] == list(range(1, alone_steps(sink) + 1))


def alone_steps(sink: Recorder) -> int:
    return sink.outcome.total_steps


def test_a_new_request_joins_the_running_batch_within_one_step(flux: Engine, template_id: str) -> None:
    long_run = flux.register_template(png(template_image(13)), "a hall", seed=3, steps=60).template_id
    loop, observer = run_loop(flux)
    try:
        first = Recorder()
        loop.submit(edit("long", long_run, 0.3), first)
        while len(first.steps) < 3:
            time.sleep(0.005)
        second = Recorder()
        loop.submit(edit("short", template_id, 0.1), second)
        second.wait()
        first.wait()
    finally:
        loop.stop()
    assert observer.joined_after and max(observer.joined_after) <= 1
    # The short one ran inside the long one's steps and left first.
    assert first.steps[0][0] < second.steps[0][0] and second.steps[-1][0] < first.steps[-1][0]
    assert second.outcome is not None and first.outcome is not None
    assert 2 in observer.batch_sizes


def test_cancelled_request_leaves_within_one_step_and_frees_its_slot(flux: Engine, template_id: str) -> None:
    long_run = flux.register_template(png(template_image(14)), "a hall", seed=3, steps=30).template_id
    loop, observer = run_loop(flux, scheduler=FcfsScheduler(SchedulerConfig(max_active=1)))
    try:
        doomed = Recorder(cancel_after_step=2)
        loop.submit(edit("doomed", long_run, 0.3), doomed)
        queued = Recorder()
        loop.submit(edit("queued", template_id, 0.2), queued)
        doomed.wait()
        queued.wait()
    finally:
        loop.stop()
    assert isinstance(doomed.error, Cancelled)
    assert [s for _, s, _ in doomed.steps] == [1, 2]  # flagged after step 2, no step 3
    assert queued.outcome is not None and queued.error is None
    assert "cancelled" in observer.reasons


def test_queue_full_fails_at_once_and_drops_nothing(flux: Engine, template_id: str) -> None:
    loop, observer = run_loop(flux, scheduler=FcfsScheduler(SchedulerConfig(max_active=1)), max_waiting=2)
    try:
        sinks = [Recorder() for _ in range(6)]
        for i, sink in enumerate(sinks):
            loop.submit(edit(f"q{i}", template_id, 0.2, seed=i), sink)
        refused = [s for s in sinks if isinstance(s.error, QueueFull)]
        assert refused and all(s.settled.is_set() for s in refused)  # refused synchronously
        for sink in sinks:
            sink.wait()
    finally:
        loop.stop()
    assert all(s.settled_count == 1 for s in sinks)
    assert all(s.outcome is not None for s in sinks if s not in refused)
    assert "queue_full" in refused[0].error.reason and "max_waiting=2" in str(refused[0].error)


def test_bad_request_fails_alone_and_its_batch_mates_are_untouched(flux: Engine, template_id: str) -> None:
    loop, _ = run_loop(flux)
    try:
        good, bad, unknown = Recorder(), Recorder(), Recorder()
        loop.submit(edit("good", template_id, 0.3), good)
        loop.submit(EditRequest("bad", prompt="x", mask=b"not a png", template_id=template_id), bad)
        loop.submit(EditRequest("unknown", prompt="x", mask=png(rect_mask(0.2)), template_id="tpl-nope"), unknown)
        for sink in (good, bad, unknown):
            sink.wait()
    finally:
        loop.stop()
    assert bad.error.reason == "invalid_mask" and unknown.error.reason == "unknown_template"
    alone = flux.edit(png(rect_mask(0.3, seed=1)), "a lamp", template_id=template_id)
    assert torch.equal(good.outcome.latents, alone.latents)


def test_a_failing_call_fails_only_the_request_whose_state_raises(
    flux: Engine, template_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_run = flux.register_template(png(template_image(15)), "a hall", seed=3, steps=30).template_id
    prepare = flux.prepare_edit

    def prepare_with_fault(*args, request_id=None, **kwargs):
        state = prepare(*args, request_id=request_id, **kwargs)
        if request_id == "faulty":  # text of the wrong width: its call raises in any company
            state.text.prompt_embeds = state.text.prompt_embeds[..., :-1]
        return state

    monkeypatch.setattr(flux, "prepare_edit", prepare_with_fault)
    loop, observer = run_loop(flux)
    try:
        mates = [Recorder(), Recorder()]
        for i, sink in enumerate(mates):
            loop.submit(edit(f"mate{i}", long_run, 0.2 + 0.2 * i, seed=i), sink)
        while min(len(m.steps) for m in mates) < 2:
            time.sleep(0.005)
        faulty = Recorder()
        loop.submit(edit("faulty", long_run, 0.3, seed=5), faulty)  # joins the running pair
        for sink in (faulty, *mates):
            sink.wait()
    finally:
        loop.stop()
    assert faulty.error is not None and faulty.error.reason == "internal"
    assert "denoising step failed" in str(faulty.error) and not faulty.steps
    assert 3 not in observer.batch_sizes and observer.reasons == ["internal"]
    monkeypatch.undo()
    for i, sink in enumerate(mates):
        assert sink.error is None, sink.error
        # Every step taken, none twice: the failed call's retries advanced each mate once.
        assert [s for _, s, _ in sink.steps] == list(range(1, 31))
        alone = flux.edit(png(rect_mask(0.2 + 0.2 * i, seed=i)), "a lamp", template_id=long_run)
        # Batched with others for some steps: equal to alone up to batched-kernel rounding.
        assert (sink.outcome.latents - alone.latents).abs().max().item() <= 1e-5


def test_register_runs_in_the_loop_and_is_idempotent(flux: Engine) -> None:
    loop, observer = run_loop(flux)
    try:
        image = png(template_image(15))
        first = Recorder()
        loop.submit(EditRequest("reg1", action="register", prompt="a desk", image=image, seed=4, steps=3), first)
        first.wait()
        again = Recorder()
        steps_before = len(observer.durations)
        loop.submit(EditRequest("reg2", action="register", prompt="a desk", image=image, seed=4, steps=3), again)
        again.wait()
        edited = Recorder()
        loop.submit(edit("e", first.outcome.template_id, 0.2), edited)
        edited.wait()
    finally:
        loop.stop()
    assert first.outcome.template_id == again.outcome.template_id
    assert len(observer.durations) >= steps_before and again.outcome.total_steps == 0  # no recomputation
    assert edited.outcome.png.startswith(b"\x89PNG") and edited.outcome.template_id == first.outcome.template_id


def test_empty_mask_returns_the_template_without_stepping(flux: Engine, template_id: str) -> None:
    loop, observer = run_loop(flux)
    try:
        sink = Recorder()
        loop.submit(edit("empty", template_id, 0.0), sink)
        sink.wait()
    finally:
        loop.stop()
    assert sink.outcome.computed_tokens == 0 and not observer.durations and not sink.steps


def test_stop_settles_everything_and_refuses_new_work(flux: Engine, template_id: str) -> None:
    long_run = flux.register_template(png(template_image(16)), "a hall", seed=3, steps=50).template_id
    loop, _ = run_loop(flux, scheduler=FcfsScheduler(SchedulerConfig(max_active=1)))
    sinks = [Recorder() for _ in range(3)]
    for i, sink in enumerate(sinks):
        loop.submit(edit(f"s{i}", long_run, 0.3, seed=i), sink)
    while not sinks[0].steps:
        time.sleep(0.005)
    loop.stop(drain_timeout_s=0.0)
    assert all(s.settled_count == 1 for s in sinks)
    assert isinstance(sinks[0].error, ShuttingDown)
    late = Recorder()
    loop.submit(edit("late", template_id, 0.2), late)
    assert isinstance(late.error, ShuttingDown)


def test_drain_waits_for_in_flight_work(flux: Engine, template_id: str) -> None:
    loop, _ = run_loop(flux)
    sink = Recorder()
    loop.submit(edit("d", template_id, 0.3), sink)
    assert loop.drain(timeout_s=60)
    assert sink.outcome is not None and loop.load().active == 0
    loop.stop()


def test_load_reports_outstanding_token_steps(flux: Engine, template_id: str) -> None:
    loop, _ = run_loop(flux, scheduler=FcfsScheduler(SchedulerConfig(max_active=1)))
    loads = []

    class Watch(Recorder):
        def progress(self, step: int, total_steps: int) -> None:
            loads.append(loop.load())
            super().progress(step, total_steps)

    try:
        sink = Watch()
        loop.submit(edit("w", template_id, 0.3), sink)
        sink.wait()
    finally:
        loop.stop()
    outstanding = [l.outstanding_token_steps for l in loads]
    assert outstanding == sorted(outstanding, reverse=True) and outstanding[-1] == 0 and outstanding[0] > 0
    assert loads[0].active == 1 and loads[0].masked_tokens == sink.outcome.computed_tokens


class Phases(LoopObserver):
    def __init__(self) -> None:
        self.timelines: list[dict[str, float]] = []

    def timeline(self, phases: dict[str, float]) -> None:
        self.timelines.append(phases)


def test_a_finished_request_reports_the_seconds_of_each_phase(flux: Engine, template_id: str) -> None:
    observer = Phases()
    loop = StepLoop(flux, observer=observer)
    try:
        started = time.monotonic()
        edited, untouched = Recorder(), Recorder()
        loop.submit(edit("timed", template_id, 0.2), edited)
        edited.wait()
        elapsed = time.monotonic() - started
        loop.submit(edit("nothing to do", template_id, 0.0), untouched)
        untouched.wait()
    finally:
        loop.stop()
    timeline = edited.outcome.timeline
    assert list(timeline) == list(PHASES) and all(seconds >= 0 for seconds in timeline.values())
    assert 0 < sum(timeline.values()) <= elapsed and timeline["steps"] > 0
    assert list(untouched.outcome.timeline) == ["prepare", "finish"]  # never stepped
    assert observer.timelines == [timeline, untouched.outcome.timeline]


class StepWindows(LoopObserver):
    """When each step ran (start, end), from the loop's own step durations."""

    def __init__(self) -> None:
        self.windows: list[tuple[float, float]] = []

    def step(self, duration_s: float, batch_size: int, row_tokens: int) -> None:
        end = time.monotonic()
        self.windows.append((end - duration_s, end))


@pytest.mark.parametrize("turn_s", [5.0, 0.0, 0.1])
def test_the_loop_takes_turns_with_a_busy_helper_for_at_most_its_bound(
    flux: Engine, template_id: str, monkeypatch: pytest.MonkeyPatch, turn_s: float
) -> None:
    # A finish (VAE decode) that takes 0.4 s while another request still steps. Taking
    # turns: no step starts until it ends; never: steps go on beside it; a 0.1 s bound:
    # the loop waits that long and then steps on.
    render, renders = flux.codec.render, []

    def slow_render(*args, **kwargs):
        started = time.monotonic()
        time.sleep(0.4)
        try:
            return render(*args, **kwargs)
        finally:
            renders.append((started, time.monotonic()))

    monkeypatch.setattr(flux.codec, "render", slow_render)
    long_template = flux.register_template(png(template_image(11)), "a room", seed=3, steps=16).template_id
    observer = StepWindows()
    loop = StepLoop(flux, observer=observer, yield_to_helpers_s=turn_s)
    try:
        first, second = Recorder(), Recorder()
        loop.submit(edit("short", template_id, 0.2), first)
        deadline = time.monotonic() + 60
        while not first.steps and time.monotonic() < deadline:
            time.sleep(0.005)
        loop.submit(edit("long", long_template, 0.2), second)
        first.wait(), second.wait()
    finally:
        loop.stop()
    assert first.outcome is not None and second.outcome is not None
    render_start, render_end = renders[0]  # the short edit's finish, while the long one steps
    assert render_start < second.steps[-1][0]  # the long edit had steps left
    started_during = [start for start, _ in observer.windows if render_start < start < render_end]
    if turn_s == 5.0:
        assert started_during == [] and render_end < second.steps[-1][0]
    elif turn_s == 0.0:
        assert len(started_during) >= 2
    else:
        assert started_during and min(started_during) - render_start < turn_s + 0.3  # 0.3 s: one step on a slow machine
        assert min(started_during) - render_start >= turn_s - 0.01


def test_yield_to_helpers_must_not_be_negative(flux: Engine) -> None:
    with pytest.raises(ValueError, match="yield_to_helpers_s"):
        StepLoop(flux, yield_to_helpers_s=-1)


class Ledger(LoopObserver):
    """Counts settled requests; ``flush`` publishes the counts, as a batching observer sends them."""

    def __init__(self) -> None:
        self.pending = {"finished": 0, "failed": 0}
        self.published = dict(self.pending)

    def finished(self, latency_s: float) -> None:
        self.pending["finished"] += 1

    def failed(self, reason: str) -> None:
        self.pending["failed"] += 1

    def flush(self) -> None:
        self.published = dict(self.pending)


@dataclass
class Reader(Recorder):
    """A client that reads the published metrics the moment its answer arrives."""

    ledger: Ledger | None = None
    seen: dict[str, int] | None = None

    def _settle(self) -> None:
        assert self.ledger is not None
        self.seen = dict(self.ledger.published)
        super()._settle()


def test_metrics_count_a_request_before_its_answer_arrives(flux: Engine, template_id: str) -> None:
    ledger = Ledger()
    loop = StepLoop(flux, observer=ledger, scheduler=FcfsScheduler(SchedulerConfig(max_active=1)), max_waiting=1)
    try:
        done, bad = Reader(ledger=ledger), Reader(ledger=ledger)
        loop.submit(edit("done", template_id, 0.2), done)
        refused = Reader(ledger=ledger)
        loop.submit(edit("refused", template_id, 0.2), refused)  # max_waiting=1: refused at once
        done.wait()
        loop.submit(EditRequest("bad", prompt="x", mask=b"not a png", template_id=template_id), bad)
        bad.wait()
    finally:
        loop.stop()
    assert isinstance(refused.error, QueueFull) and refused.seen == {"finished": 0, "failed": 1}
    assert done.outcome is not None and done.seen == {"finished": 1, "failed": 1}
    assert bad.error is not None and bad.seen == {"finished": 1, "failed": 2}
