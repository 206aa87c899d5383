"""Step-level continuous batching: one thread owns the model and steps every active request.

A request joins the running batch at the next step after it is prepared and
leaves the moment it finishes, so short edits never wait for long ones. Work that
is not a denoising step (decoding bytes, prompt encoding, VAE encode/decode, PNG
encoding) runs on a small worker pool, never on the loop's thread; the heavy part of
it goes through the engine's codec, which a server puts in lower-priority processes
(:class:`~instgenie.codec.ProcessCodec`) so it fills the gaps instead of stretching
the step cadence. Workers that run the networks themselves (an in-process codec) keep
the loop's intra-op thread count: CPU kernels round differently with another thread
count, and exactness needs identical kernels. Beside an out-of-process codec they run
single-threaded, so that the loop's OpenMP team stays the process's only one
(:mod:`~instgenie.compute_threads`).

The loop knows nothing about Triton. A caller hands it an :class:`EditRequest` with a
:class:`JobSink`; the loop calls ``progress`` after every step and exactly one of
``finish`` / ``fail``, whatever happens (bad input, queue full, cancellation,
shutdown, a crash inside a step): no request is ever left hanging.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch
from PIL import Image

from .auto_register import AutoRegistrar
from .compute_threads import single_threaded_helper, use_intra_op_threads
from .engine import Engine
from .states import RequestState
from .errors import CacheCorrupt, Cancelled, InstGenIEError, InternalError, InvalidInput, QueueFull, ShuttingDown, UnknownTemplate
from .requests import EditRequest
from .scheduler import FcfsScheduler, Scheduler
from .templates import TemplateRecord, TemplateSpec

log = logging.getLogger(__name__)

ACTIONS = ("edit", "register")

#: A request's phases in the loop, in order: ``prepare`` (from arrival: waiting for a
#: worker, decoding, prompt and VAE encoding), ``admission`` (prepared, waiting to join
#: the batch), ``steps`` (joining to the end of its last step), ``finish`` (waiting for a
#: worker, VAE decode, paste, PNG encoding). A request with nothing to denoise has no
#: ``admission`` and ``steps``.
PHASES = ("prepare", "admission", "steps", "finish")


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job returns."""

    request_id: str
    template_id: str | None
    png: bytes | None  # the edited image; None for a registration
    computed_tokens: int
    num_tokens: int
    total_steps: int
    latents: torch.Tensor | None = None  # [1, N, C] final latents of an edit (None if nothing was denoised)
    timeline: dict[str, float] | None = None  # seconds per phase (:data:`PHASES`) of the request in this loop


class JobSink(Protocol):
    """Where a job's events go (a Triton response sender, a test's recorder...)."""

    def cancelled(self) -> bool: ...

    def progress(self, step: int, total_steps: int) -> None: ...

    def finish(self, outcome: JobOutcome) -> None: ...

    def fail(self, error: InstGenIEError) -> None: ...


@dataclass(frozen=True)
class LoopLoad:
    """A snapshot of the loop's work.

    ``masked_tokens``: row-tokens the next step computes. ``outstanding_token_steps``:
    token-equivalents (the family's :class:`~instgenie.token_grid.StepCost`) times
    remaining steps over active and prepared requests: the remaining work, which a
    router balances.
    """

    active: int = 0
    waiting: int = 0  # accepted, not stepping yet (being prepared, or prepared)
    preparing: int = 0
    finishing: int = 0
    masked_tokens: int = 0
    outstanding_token_steps: float = 0.0


class LoopObserver:
    """Hooks for metrics and logs; every method is optional and must be cheap."""

    def load(self, load: LoopLoad) -> None:
        pass

    def step(self, duration_s: float, batch_size: int, row_tokens: float) -> None:
        """``row_tokens``: the step's token-equivalents (:class:`~instgenie.token_grid.StepCost`)."""

    def joined(self, steps_waited: int) -> None:
        """A prepared request joined the batch after ``steps_waited`` loop steps (0 or 1 unless the batch is full)."""

    def first_step(self, wait_s: float) -> None:
        pass

    def finished(self, latency_s: float) -> None:
        pass

    def timeline(self, phases: dict[str, float]) -> None:
        """The seconds a finished request spent in each of its :data:`PHASES`."""

    def failed(self, reason: str) -> None:
        pass

    def template_lookup(self, hit: bool) -> None:
        pass

    def auto_template(self, hit: bool) -> None:
        """An edit of a raw image found the template it became (or did not)."""

    def auto_registered(self) -> None:
        """A raw image was recorded as a template (:mod:`~instgenie.auto_register`)."""

    def flush(self) -> None:
        """Make what was reported so far visible. The loop calls it just before it answers
        a request, so a client that reads the metrics after its answer finds it counted
        (an observer that batches its updates sends them here)."""


class _Phase(enum.Enum):
    PREPARING = "preparing"
    WAITING = "waiting"
    ACTIVE = "active"
    FINISHING = "finishing"


@dataclass(eq=False)
class _Job:
    request: EditRequest
    sink: JobSink
    arrived: float
    phase: _Phase = _Phase.PREPARING
    state: RequestState | None = None
    ready_at_step: int = 0  # the loop's step count when the job became ready
    first_step_at: float | None = None
    marks: dict[str, float] = field(default_factory=dict)  # when each phase ended (the clock's seconds)
    spec: TemplateSpec | None = None  # a registration decoded already (the loop recording a template again)
    auto_key: str | None = None  # the raw image this recording is of (auto-registration)
    record_after: tuple[str, TemplateSpec] | None = None  # (key, spec) of a recording to queue once this edit settles


@dataclass
class _Queues:
    jobs: set[_Job] = field(default_factory=set)  # every job not yet settled
    ready: list[_Job] = field(default_factory=list)  # prepared, waiting for admission, in arrival order


class StepLoop:
    """The serving loop over one :class:`~instgenie.Engine`.

    ``max_waiting`` bounds requests accepted but not yet stepping (being prepared
    or prepared): beyond it ``submit`` fails the request at once with
    :class:`~instgenie.errors.QueueFull`. The running batch is bounded by the
    scheduler's ``max_active``. ``auto_register``: edits of raw images find (and,
    by its policy, record) templates of those images; ``None``: a raw image is
    always computed in full.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        scheduler: Scheduler | None = None,
        max_waiting: int = 64,
        workers: int = 2,
        observer: LoopObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        auto_register: AutoRegistrar | None = None,
        yield_to_helpers_s: float = 0.0,
    ) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if yield_to_helpers_s < 0:
            raise ValueError("yield_to_helpers_s must be >= 0")
        self.engine = engine
        self.scheduler: Scheduler = scheduler or FcfsScheduler()
        self.max_waiting = max_waiting
        self.observer = observer or LoopObserver()
        self.auto_register = auto_register
        self._clock = clock
        self._torch_threads = torch.get_num_threads()
        self._queues = _Queues()
        self._active: list[_Job] = []  # owned by the loop thread
        self._steps_done = 0  # loop steps so far
        self.yield_to_helpers_s = yield_to_helpers_s
        self._helpers_busy = 0  # worker jobs handed over and not done
        self._helper_jobs_done = 0
        self._cond = threading.Condition()
        self._closing = False  # no new requests
        self._stopping = False  # the loop thread exits
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="instgenie-worker", initializer=self._init_worker)
        self._thread = threading.Thread(target=self._run, name="instgenie-step-loop", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------
    def submit(self, request: EditRequest, sink: JobSink) -> None:
        """Accept a request; its sink hears of it until exactly one ``finish`` / ``fail``."""
        error = self._accept(_Job(request, sink, arrived=self._clock()))
        if error is not None:
            self._notify_refusal(request, sink, error)

    def _accept(self, job: _Job) -> InstGenIEError | None:
        """Queue ``job`` for preparation, or say why it cannot be accepted now."""
        with self._cond:
            waiting = sum(j.phase in (_Phase.PREPARING, _Phase.WAITING) for j in self._queues.jobs)
            if self._closing:
                error: InstGenIEError | None = ShuttingDown("the server is shutting down; send the request elsewhere")
            elif waiting >= self.max_waiting:
                error = QueueFull(f"{waiting} requests are waiting (max_waiting={self.max_waiting}); retry later")
            else:
                error = None
                self._queues.jobs.add(job)
        if error is not None:
            return error
        self._publish_load()
        self._to_helper(job, self._prepare)
        return None

    def _notify_refusal(self, request: EditRequest, sink: JobSink, error: InstGenIEError) -> None:
        self.observer.failed(error.reason)
        self._answer(_Job(request, sink, arrived=self._clock()), "fail", error)

    def load(self) -> LoopLoad:
        with self._cond:
            jobs = list(self._queues.jobs)
        states = [j.state for j in jobs if j.state is not None and j.phase in (_Phase.WAITING, _Phase.ACTIVE)]
        return LoopLoad(
            active=sum(j.phase is _Phase.ACTIVE for j in jobs),
            waiting=sum(j.phase in (_Phase.PREPARING, _Phase.WAITING) for j in jobs),
            preparing=sum(j.phase is _Phase.PREPARING for j in jobs),
            finishing=sum(j.phase is _Phase.FINISHING for j in jobs),
            masked_tokens=sum(j.state.rows * j.state.computed_tokens for j in jobs if j.phase is _Phase.ACTIVE and j.state),
            outstanding_token_steps=sum(s.remaining_token_steps for s in states),
        )

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to ``timeout_s`` for accepted ones to settle."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            while self._queues.jobs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Drain for up to ``drain_timeout_s``, then fail whatever is left with ``ShuttingDown``."""
        self.drain(drain_timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            left = list(self._queues.jobs)
        for job in left:
            self._fail(job, ShuttingDown("the server shut down before the request finished; retry it"))

    # -- worker side -------------------------------------------------------------------
    def _init_worker(self) -> None:
        # torch's intra-op thread count is per thread (see module doc).
        # No lower priority for these threads: one descheduled while holding the GIL
        # would stall the loop (priority inversion); the codec's processes take that role.
        if self.engine.codec.runs_networks_here:
            use_intra_op_threads(self._torch_threads)
        else:
            single_threaded_helper()

    def _to_helper(self, job: _Job, work: Callable[[_Job], None]) -> None:
        # Busy from now, not from when a worker picks it up: the loop decides whether to
        # give a turn right after handing over a finish.
        with self._cond:
            self._helpers_busy += 1
        try:
            self._pool.submit(self._guarded, job, work)
        except RuntimeError:  # the pool is shut down (stop): the job is failed with the rest
            with self._cond:
                self._helpers_busy -= 1

    def _guarded(self, job: _Job, work: Callable[[_Job], None]) -> None:
        try:
            if job.sink.cancelled():
                raise Cancelled("cancelled by the client")
            work(job)
        except InstGenIEError as error:
            self._fail(job, error)
        except Exception as error:  # a bug must fail one request, not the worker
            log.exception("request %s failed", job.request.request_id)
            self._fail(job, InternalError(f"{type(error).__name__}: {error}"))
        finally:
            with self._cond:
                self._helpers_busy -= 1
                self._helper_jobs_done += 1
                self._cond.notify_all()

    def _prepare(self, job: _Job) -> None:
        request, engine = job.request, self.engine
        if request.action == "register":
            if request.image is None and job.spec is None:
                raise InvalidInput("register needs IMAGE (the template picture)")
            spec = job.spec or engine.template_spec(
                request.image,
                request.prompt,
                seed=request.seed,
                steps=request.steps,
                guidance=request.guidance,
                mask=request.mask,
            )
            known = engine.has_template(spec.template_id)
            self.observer.template_lookup(known)
            if job.auto_key is None and self.auto_register is not None:  # a client's: never dropped as an auto one
                self.auto_register.registered(engine.image_key(spec), spec.template_id)
                engine.store.host.mark_expendable(spec.template_id, False)
            if known:  # registration is idempotent: same content and settings, same id
                num_tokens = engine.family.num_tokens(spec.settings)
                self._settle(job, JobOutcome(request.request_id, spec.template_id, None, 0, num_tokens, 0))
                return
            state = engine.start_template(spec, request.request_id)
        elif request.action == "edit":
            if request.mask is None:
                raise InvalidInput("edit needs MASK (white = the region to edit)")
            template, image, found = None, request.image, False
            if request.template_id is not None:
                try:
                    template = engine.template(request.template_id)
                except UnknownTemplate:
                    self.observer.template_lookup(False)
                    raise
                self.observer.template_lookup(True)
            elif request.image is not None and not request.full_compute and self.auto_register is not None:
                template, image = self._auto_template(job)
                found = template is not None  # the raw image's own template
            state = engine.prepare_edit(
                request.mask,
                request.prompt,
                template_id=template,
                image=None if found else image,
                seed=request.seed,
                steps=request.steps,
                guidance=request.guidance,
                full_compute=request.full_compute,
                request_id=request.request_id,
            )
        else:
            raise InvalidInput(f"unknown action {request.action!r}; expected one of {', '.join(ACTIONS)}")
        job.state = state
        if state.done:  # an empty mask: nothing to denoise
            job.marks["prepare"] = self._clock()
            job.phase = _Phase.FINISHING
            self._finish(job)
            return
        job.marks["prepare"] = self._clock()
        with self._cond:
            job.phase = _Phase.WAITING
            job.ready_at_step = self._steps_done
            self._queues.ready.append(job)
            self._cond.notify_all()
        self._publish_load()

    def _auto_template(self, job: _Job) -> tuple[TemplateRecord | None, Image.Image]:
        """The template a raw image's edit may use (:mod:`~instgenie.auto_register`), and the
        image decoded once (a miss edits it); on a miss, the image's recording follows the
        edit when the policy says so."""
        request = job.request
        assert self.auto_register is not None and request.image is not None
        engine = self.engine
        key_spec = engine.template_spec(request.image, "", seed=request.seed, steps=request.steps, guidance=request.guidance)
        key = engine.image_key(key_spec)
        assert key is not None  # no template mask
        candidate = self.auto_register.candidate(key)
        if candidate is not None and engine.has_template(candidate):
            try:
                template = engine.template(candidate)
            except InstGenIEError:  # evicted or corrupt meanwhile: computed in full
                template = None
            if template is not None:
                self.observer.auto_template(True)
                return template, key_spec.image
        self.observer.auto_template(False)
        if self.auto_register.sighted(key):
            spec = key_spec
            if self.auto_register.config.recording_prompt == "edit":
                spec = engine.template_spec(key_spec.image, request.prompt, seed=request.seed, steps=request.steps,
                                            guidance=request.guidance)  # fmt: skip
            # Queued when this edit settles, not now: the edit that triggered it must not
            # share its steps with (and wait for) a recording that no client waits for.
            job.record_after = (key, spec)
        return None, key_spec.image

    def _record_in_background(self, key: str, spec: TemplateSpec) -> None:
        """Queue the recording of a raw image as one more job; no client waits for it."""
        request_id = f"auto-{spec.template_id}"
        sink = _AutoRecordingSink(self, key, request_id)
        busy = self._accept(_Job(EditRequest(request_id, action="register"), sink, self._clock(), spec=spec, auto_key=key))
        if busy is not None:
            log.info("not recording raw image %s now: %s", key, busy)
            assert self.auto_register is not None
            self.auto_register.abandoned(key)

    def _auto_recorded(self, key: str, template_id: str) -> None:
        assert self.auto_register is not None
        self.engine.store.host.mark_expendable(template_id)
        for dropped in self.auto_register.recorded(key, template_id):
            log.info("dropping auto-registered template %s (auto_register_max reached)", dropped)
            self.engine.templates.forget(dropped)
        self.observer.auto_registered()

    def _finish(self, job: _Job) -> None:
        state, engine = job.state, self.engine
        assert state is not None
        if job.request.action == "register":
            record = engine.finish_template(state)
            outcome = JobOutcome(
                job.request.request_id, record.template_id, None, state.computed_tokens, state.num_tokens, state.total_steps
            )
        else:
            result = engine.finish_edit(state)
            outcome = JobOutcome(
                result.request_id,
                result.template_id,
                result.png,
                result.computed_tokens,
                result.num_tokens,
                state.total_steps,
                result.latents,
            )
        self._settle(job, outcome)

    # -- settling --------------------------------------------------------------------------
    def _take(self, job: _Job) -> bool:
        """Remove ``job`` from the books; ``False`` if something settled it already."""
        with self._cond:
            if job not in self._queues.jobs:
                return False
            self._queues.jobs.discard(job)
            if job in self._queues.ready:
                self._queues.ready.remove(job)
            self._cond.notify_all()
        if job.state is not None:
            self.engine.release(job.state)
        return True

    def _settle(self, job: _Job, outcome: JobOutcome) -> None:
        if not self._take(job):
            return
        job.marks["finish"] = self._clock()
        timeline = _timeline(job)
        outcome = replace(outcome, timeline=timeline)
        self.observer.timeline(timeline)
        self.observer.finished(self._clock() - job.arrived)
        self._publish_load()
        self._answer(job, "finish", outcome)
        if job.record_after is not None:
            self._record_in_background(*job.record_after)

    def _fail(self, job: _Job, error: InstGenIEError) -> None:
        if not self._take(job):
            return
        if job.record_after is not None and self.auto_register is not None:
            self.auto_register.abandoned(job.record_after[0])
        log.info("request %s: %s: %s", job.request.request_id, error.reason, error)
        self.observer.failed(error.reason)
        self._publish_load()
        self._answer(job, "fail", error)

    def _answer(self, job: _Job, event: str, *payload: object) -> None:
        """The request's final ``finish`` or ``fail``, after the metrics that count it."""
        self.observer.flush()
        self._notify(job, event, *payload)

    @staticmethod
    def _notify(job: _Job, event: str, *payload: object) -> None:
        try:
            getattr(job.sink, event)(*payload)
        except Exception:  # a broken sink (client gone) must not take the loop down
            log.exception("request %s: sink.%s raised", job.request.request_id, event)

    def _publish_load(self) -> None:
        self.observer.load(self.load())

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        # Pinned here too, not left to torch's lazy per-thread default: the loop's kernels
        # must be the ones a solo run in the caller's thread uses (exactness).
        use_intra_op_threads(self._torch_threads)
        while True:
            with self._cond:
                while not self._active and not self._queues.ready and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                waiting = list(self._queues.ready)
            self._drop_cancelled(waiting)
            with self._cond:
                ready = self._queues.ready
                picks = self.scheduler.admit(_states(self._active), _states(ready))
                joining = [ready[i] for i in picks]
                for job in joining:
                    ready.remove(job)
                    job.phase = _Phase.ACTIVE
                steps_done = self._steps_done
            joined_at = self._clock()
            for job in joining:
                job.marks["admission"] = joined_at
                self.observer.joined(steps_done - job.ready_at_step)
            self._active.extend(joining)
            if self._active:
                self._step()
                self._yield_to_helpers()

    def _yield_to_helpers(self) -> None:
        """Between two steps, wait (at most ``yield_to_helpers_s``) for one busy worker
        job to end.

        On a CPU the loop's threads and the codec's share the cores: a codec at lower
        priority gets almost nothing while the loop steps back to back, so under load
        finished requests wait seconds for their decode and prepared ones for their
        encode; at equal priority the two OpenMP teams oversubscribe the cores and both
        crawl. Taking turns (a step, then one worker job) keeps both moving at full
        speed. An idle loop has no turn to give: unloaded requests never wait here.
        """
        if not self.yield_to_helpers_s or not self._active:
            return
        deadline = self._clock() + self.yield_to_helpers_s
        with self._cond:
            done = self._helper_jobs_done
            while self._helpers_busy and self._helper_jobs_done == done and not self._stopping:
                left = deadline - self._clock()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _drop_cancelled(self, waiting: list[_Job]) -> None:
        for job in [*waiting, *self._active]:
            if job.sink.cancelled():
                if job in self._active:
                    self._active.remove(job)
                self._fail(job, Cancelled("cancelled by the client"))

    def _await_caches(self) -> None:
        """Wait for each active request's cache of this step; a request whose cache
        cannot be read fails alone (and a corrupt template is recorded again)."""
        by_state = {id(job.state): job for job in self._active}
        for state, error in self.engine.wait_for_caches([job.state for job in self._active if job.state is not None]):
            job = by_state[id(state)]
            self._active.remove(job)
            if isinstance(error, CacheCorrupt) and state.template_id is not None:
                error = self._record_again(state.template_id, error)
            self._fail(job, error)

    def _record_again(self, template_id: str, error: CacheCorrupt) -> CacheCorrupt:
        """Record a template whose cache is corrupt again, from its record (same id)."""
        spec = self.engine.forget_template_for_recording(template_id)
        if spec is None:
            return error
        request_id = f"rerecord-{template_id}"
        busy = self._accept(_Job(EditRequest(request_id, action="register"), _LogSink(request_id), self._clock(), spec=spec))
        if busy is not None:
            log.warning("cannot record template %s again now: %s", template_id, busy)
            return CacheCorrupt(f"{error}; register the template again")
        return CacheCorrupt(f"{error}; it is being recorded again under the same id, retry shortly")

    def _step(self) -> None:
        self._await_caches()
        batch = list(self._active)
        if not batch:
            return
        started = self._clock()
        calls = self.scheduler.calls(_states(batch))
        for call in calls:
            self._call([batch[i] for i in call])
        batch = list(self._active)  # without the requests whose state made a call fail
        if not batch:
            return
        now = self._clock()
        with self._cond:
            self._steps_done += 1
        self.observer.step(now - started, len(batch), sum(s.step_work for s in _states(batch)))
        still: list[_Job] = []
        for job in batch:
            state = job.state
            assert state is not None
            if job.first_step_at is None:
                job.first_step_at = now
                self.observer.first_step(now - job.arrived)
            self._notify(job, "progress", state.step_index, state.total_steps)
            if state.done:
                job.marks["steps"] = now
                job.phase = _Phase.FINISHING
                self._to_helper(job, self._finish)
            else:
                still.append(job)
        self._active = still
        self._publish_load()

    def _call(self, jobs: list[_Job]) -> None:
        """One batched transformer call; when it raises, the same step in halves, down to
        single requests, so that only a request whose own state raises fails (with its
        reason) and every other one still takes this step."""
        steps_before = [state.step_index for state in _states(jobs)]
        try:
            self.engine.step(_states(jobs))
            return
        except Exception as error:  # keep serving: find the cause, fail only it
            if len(jobs) == 1:
                job = jobs[0]
                log.exception("request %s: the denoising step failed", job.request.request_id)
                self._active.remove(job)
                self._fail(job, InternalError(f"the denoising step failed: {type(error).__name__}: {error}"))
                return
            log.warning("a call of %d requests failed (%s: %s); stepping them in smaller calls",
                        len(jobs), type(error).__name__, error)  # fmt: skip
        # A call advances all of its states or none; the halves start from the same step.
        left = [job for job, state, before in zip(jobs, _states(jobs), steps_before) if state.step_index == before]
        half = len(left) // 2
        for part in (left[:half], left[half:]) if half else (left,):
            if part:
                self._call(part)


def _timeline(job: _Job) -> dict[str, float]:
    """Seconds per phase: from the previous mark (arrival first) to the phase's own."""
    timeline, since = {}, job.arrived
    for phase in PHASES:
        if phase in job.marks:
            timeline[phase] = job.marks[phase] - since
            since = job.marks[phase]
    return timeline


def _states(jobs: list[_Job]) -> list[RequestState]:
    """The states of prepared jobs (every job past preparation has one)."""
    states = [job.state for job in jobs]
    assert all(state is not None for state in states)
    return states  # type: ignore[return-value]


class _AutoRecordingSink:
    """Sink of an auto-registration's recording: tells the loop how it ended."""

    def __init__(self, loop: StepLoop, key: str, request_id: str) -> None:
        self.loop, self.key, self.request_id = loop, key, request_id

    def cancelled(self) -> bool:
        return False

    def progress(self, step: int, total_steps: int) -> None:
        pass

    def finish(self, outcome: JobOutcome) -> None:
        assert outcome.template_id is not None
        self.loop._auto_recorded(self.key, outcome.template_id)

    def fail(self, error: InstGenIEError) -> None:
        log.warning("%s (recording a raw image) failed: %s", self.request_id, error)
        assert self.loop.auto_register is not None
        self.loop.auto_register.abandoned(self.key)


class _LogSink:
    """Sink of the loop's own requests (recording a corrupt template again): logs only."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def cancelled(self) -> bool:
        return False

    def progress(self, step: int, total_steps: int) -> None:
        pass

    def finish(self, outcome: JobOutcome) -> None:
        log.info("%s: template %s recorded again", self.request_id, outcome.template_id)

    def fail(self, error: InstGenIEError) -> None:
        log.error("%s failed: %s", self.request_id, error)
