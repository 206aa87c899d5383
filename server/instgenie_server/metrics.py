"""Prometheus metrics of the step loop, as Triton custom metrics.

Triton's own metrics time only ``execute()`` of a decoupled model (which merely
enqueues), so end-to-end, step and queue figures are ours. Every series carries
``model``, ``version`` and ``instance`` labels. ``pb_utils`` is passed in: it exists
only inside the Python backend stub.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from instgenie.step_loop import PHASES, LoopLoad, LoopObserver
from instgenie.token_grid import StepCost
from instgenie_protocol import PIXELS_PER_TOKEN_METRIC, STEP_COST_DENSE_METRIC, STEP_COST_WEIGHT_METRIC

from .metric_batching import BatchedMetric, MetricFlusher

log = logging.getLogger(__name__)

# python_backend 24.10's metrics are not thread-safe: ``Metric.increment``/``observe``
# release the GIL, then rewrite the metric's one shared-memory message (freeing the
# previous one) while the server may still be reading it. Two threads on one metric
# crash tritonserver (SIGSEGV in libtriton_python.so, ProcessMetricRequest ->
# PbString::LoadFromSharedMemory) or raise ``boost::interprocess::lock_exception``;
# ``MetricFamily.Metric`` edits an unguarded map. The loop thread, the worker threads,
# ``execute()`` and the pollers all report, so every call into pb_utils metrics in this
# process holds this lock (each is one short IPC round trip).
_METRIC_LOCK = threading.Lock()


class LockedMetric:
    """A pb_utils ``Metric`` whose calls hold :data:`_METRIC_LOCK`; a gauge set to the
    value it was last set to costs nothing."""

    def __init__(self, family: Any, labels: dict[str, str], buckets: list[float] | None = None) -> None:
        with _METRIC_LOCK:
            if buckets is None:
                self._metric = family.Metric(labels=labels)
            else:
                self._metric = family.Metric(labels=labels, buckets=buckets)
        self._last_set: float | None = None

    def set(self, value: float) -> None:
        if value == self._last_set:
            return
        self._last_set = value
        self._update("set", value)

    def increment(self, value: float) -> None:
        self._update("increment", value)

    def observe(self, value: float) -> None:
        self._update("observe", value)

    def _update(self, method: str, value: float) -> None:
        with _METRIC_LOCK:
            getattr(self._metric, method)(value)


def metric_family(pb_utils: Any, name: str, description: str, kind: Any) -> Any:
    with _METRIC_LOCK:
        return pb_utils.MetricFamily(name=name, description=description, kind=kind)

STEP_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
JOIN_BUCKETS_STEPS = [0, 1, 2, 4, 8, 16, 32, 64]
REQUEST_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0]

_GAUGES = {
    "active": ("instgenie_active_requests", "Requests in the running batch"),
    "waiting": ("instgenie_waiting_requests", "Requests accepted but not stepping yet (preparing or queued)"),
    "finishing": ("instgenie_finishing_requests", "Requests past their last step: decoding, encoding and answering"),
    "masked_tokens": ("instgenie_masked_tokens", "Row-tokens computed by the next step (tokens in flight)"),
    "outstanding_token_steps": (
        "instgenie_outstanding_token_steps",
        "Row-tokens x remaining steps of active and queued requests: the router's load signal",
    ),
}
#: Gauges that say whether there is work at all: sent at once, never batched. They change
#: only when a request arrives, joins or leaves, and the launcher tells a wedged loop
#: from an idle one by them: a loop that stops right after a request joined must not
#: look idle because the batch with that news never left the stopped process.
_IMMEDIATE_GAUGES = frozenset({"active", "waiting", "finishing"})


class TritonLoopMetrics(LoopObserver):
    """A :class:`~instgenie.step_loop.LoopObserver` writing Triton custom metrics."""

    def __init__(
        self,
        pb_utils: Any,
        labels: dict[str, str],
        text_tokens: int | None = None,
        pixels_per_token: int | None = None,
        restarts: int = 0,
        step_cost: StepCost | None = None,
        flusher: MetricFlusher | None = None,
    ) -> None:
        self._pb = pb_utils
        self._labels = dict(labels)
        self._flusher = flusher  # batches the updates off the reporting thread (the step loop's)
        self._families: list[Any] = []  # a Metric dies with its MetricFamily: keep them alive
        kinds = pb_utils.MetricFamily
        self._gauges = {
            field: self._metric(name, text, kinds.GAUGE, batched=field not in _IMMEDIATE_GAUGES)
            for field, (name, text) in _GAUGES.items()
        }
        self._step_seconds = self._histogram("instgenie_step_duration_seconds", "Duration of one batched denoising step", STEP_BUCKETS_S)
        self._request_seconds = self._histogram(
            "instgenie_request_duration_seconds", "Arrival to final response of requests that finished", REQUEST_BUCKETS_S
        )
        self._first_step_seconds = self._histogram(
            "instgenie_time_to_first_step_seconds", "Arrival to the end of a request's first step", REQUEST_BUCKETS_S
        )
        phases = self._family(
            "instgenie_request_phase_seconds",
            "Seconds a finished request spent in each phase of the step loop (prepare, admission, steps, finish)",
            self._pb.MetricFamily.HISTOGRAM,
        )
        self._phase_seconds = {
            phase: self._locked(phases, {**self._labels, "phase": phase}, REQUEST_BUCKETS_S) for phase in PHASES
        }
        self._join_wait_steps = self._histogram(
            "instgenie_join_wait_steps",
            "Loop steps a prepared request waited before joining the batch (0-1 unless the batch is full)",
            JOIN_BUCKETS_STEPS,
        )
        self._steps = self._metric("instgenie_steps_total", "Batched denoising steps run", kinds.COUNTER)
        if text_tokens is not None:  # a constant, for the router's per-request cost
            self._text_tokens = self._metric(
                "instgenie_text_tokens", "Text tokens each request row computes besides its masked image tokens", kinds.GAUGE
            )
            self._text_tokens.set(float(text_tokens))
        if pixels_per_token is not None:  # the token grid, so the router counts a mask's tokens as we do
            self._pixels_per_token = self._metric(
                PIXELS_PER_TOKEN_METRIC, "Pixels along one side of a latent token's square (the token grid)", kinds.GAUGE
            )
            self._pixels_per_token.set(float(pixels_per_token))
        if step_cost is not None:  # the family's cost function, so the router predicts work as we count it
            self._step_cost_dense = self._metric(
                STEP_COST_DENSE_METRIC, "Token-equivalents per token of the whole grid a row-step computes whatever the mask", kinds.GAUGE
            )
            self._step_cost_dense.set(step_cost.dense)
            weights = self._family(
                STEP_COST_WEIGHT_METRIC, "Token-equivalents per computed token of the mask pooled to each depth", kinds.GAUGE
            )
            self._step_cost_weights = [self._locked(weights, {**self._labels, "depth": str(d)}) for d, _ in step_cost.levels]
            for metric, (_, weight) in zip(self._step_cost_weights, step_cost.levels):
                metric.set(weight)
        self._row_tokens = self._metric(
            "instgenie_computed_row_tokens_total",
            "Row-token equivalents (the published step cost of each row's tokens) computed by all steps",
            kinds.COUNTER,
        )
        self._request_steps = self._metric(
            "instgenie_request_steps_total", "Requests stepped, summed over steps (batch sizes)", kinds.COUNTER
        )
        self._completed = self._metric("instgenie_requests_completed_total", "Requests that finished with a result", kinds.COUNTER)
        self._cancellations = self._metric("instgenie_cancellations_total", "Requests cancelled by their client", kinds.COUNTER)
        lookups = self._family(
            "instgenie_template_cache_lookups_total", "Template cache lookups by result (hit, miss)", kinds.COUNTER
        )
        self._lookups = {result: self._locked(lookups, {**self._labels, "result": result}) for result in ("hit", "miss")}
        raw = self._family(
            "instgenie_raw_image_lookups_total",
            "Edits of a raw image (no template id) by whether they found the template it became (hit, miss)",
            kinds.COUNTER,
        )
        self._raw_lookups = {result: self._locked(raw, {**self._labels, "result": result}) for result in ("hit", "miss")}
        self._auto_registrations = self._metric(
            "instgenie_auto_registrations_total", "Raw images recorded as templates (auto_register)", kinds.COUNTER
        )
        self._errors_family = self._family(
            "instgenie_errors_total", "Requests that ended with an error, by reason", kinds.COUNTER
        )
        self._errors: dict[str, Any] = {}
        self._errors_lock = threading.Lock()
        # The launcher's count of recoveries (a restart resets every other counter).
        self._restarts = self._metric(
            "instgenie_server_restarts_total", "Times the launcher restarted this server after a fault", kinds.COUNTER
        )
        if restarts:
            self._restarts.increment(float(restarts))
        # On the page before the model reports ready: the router prices requests with the
        # constants above, and the launcher's restart count is read as soon as it is ready.
        self.flush()

    def _family(self, name: str, description: str, kind: Any) -> Any:
        family = metric_family(self._pb, name, description, kind)
        self._families.append(family)
        return family

    def _locked(
        self, family: Any, labels: dict[str, str], buckets: list[float] | None = None, batched: bool = True
    ) -> LockedMetric | BatchedMetric:
        metric = LockedMetric(family, labels, buckets)
        return metric if self._flusher is None or not batched else self._flusher.batched(metric)

    def _metric(self, name: str, description: str, kind: Any, batched: bool = True) -> LockedMetric | BatchedMetric:
        return self._locked(self._family(name, description, kind), self._labels, batched=batched)

    def _histogram(self, name: str, description: str, buckets: list[float]) -> LockedMetric | BatchedMetric:
        return self._locked(self._family(name, description, self._pb.MetricFamily.HISTOGRAM), self._labels, buckets)

    # -- LoopObserver ---------------------------------------------------------------
    def load(self, load: LoopLoad) -> None:
        for field, gauge in self._gauges.items():
            gauge.set(float(getattr(load, field)))

    def step(self, duration_s: float, batch_size: int, row_tokens: float) -> None:
        self._step_seconds.observe(duration_s)
        self._steps.increment(1)
        self._row_tokens.increment(float(row_tokens))
        self._request_steps.increment(float(batch_size))

    def joined(self, steps_waited: int) -> None:
        self._join_wait_steps.observe(float(steps_waited))

    def timeline(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self._phase_seconds[phase].observe(seconds)

    def first_step(self, wait_s: float) -> None:
        self._first_step_seconds.observe(wait_s)

    def finished(self, latency_s: float) -> None:
        self._request_seconds.observe(latency_s)
        self._completed.increment(1)

    def failed(self, reason: str) -> None:
        if reason == "cancelled":  # a client's choice, not an error: kept out of the error rate
            self._cancellations.increment(1)
            return
        with self._errors_lock:
            counter = self._errors.get(reason)
            if counter is None:
                counter = self._errors[reason] = self._locked(self._errors_family, {**self._labels, "reason": reason})
        counter.increment(1)

    def template_lookup(self, hit: bool) -> None:
        self._lookups["hit" if hit else "miss"].increment(1)

    def auto_template(self, hit: bool) -> None:
        self._raw_lookups["hit" if hit else "miss"].increment(1)

    def auto_registered(self) -> None:
        self._auto_registrations.increment(1)

    def flush(self) -> None:
        if self._flusher is not None:
            self._flusher.flush()


class GpuMetrics:
    """GPU utilisation and memory from NVML, polled on a thread; absent (not failing) without a GPU."""

    def __init__(self, pb_utils: Any, labels: dict[str, str], device_index: int, interval_s: float = 1.0) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as exc:  # no driver, no GPU, no nvidia-ml-py: CPU serving
            log.info("no GPU metrics: %s", exc)
            self._handle = None
            return
        self._nvml = pynvml
        gauge = pb_utils.MetricFamily.GAUGE
        labels = {**labels, "gpu": str(device_index)}
        self._families = [
            metric_family(pb_utils, "instgenie_gpu_utilization_ratio", "GPU busy fraction (NVML)", gauge),
            metric_family(pb_utils, "instgenie_gpu_memory_used_bytes", "GPU memory in use (NVML)", gauge),
        ]
        self._utilization, self._memory = (LockedMetric(family, labels) for family in self._families)
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._poll, name="instgenie-nvml", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._handle is not None

    def _poll(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._utilization.set(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0)
                self._memory.set(float(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used))
            except Exception:
                log.warning("NVML poll failed", exc_info=True)

    def close(self) -> None:
        if self._handle is not None:
            self._stop.set()
            self._thread.join()


# CacheStats field -> (metric name, description, kind); kind "c" counter, "g" gauge.
_CACHE_SERIES = {
    "host_hits": ("instgenie_cache_step_hits_total", "Template cache steps found in host memory when a request needed them", "c"),
    "disk_loads": ("instgenie_cache_disk_loads_total", "Template cache steps read from the disk tier (host misses)", "c"),
    "disk_bytes": ("instgenie_cache_loaded_bytes_total", "Bytes of template cache read from disk", "c"),
    "disk_seconds": ("instgenie_cache_disk_load_seconds_total", "Time spent reading template cache steps from disk", "c"),
    "stalls": ("instgenie_cache_load_stalls_total", "Steps whose compute waited for their cache to load", "c"),
    "stall_seconds": ("instgenie_cache_load_stall_seconds_total", "Time compute waited for cache loads", "c"),
    "prefetched": ("instgenie_cache_prefetched_steps_total", "Cache steps loaded from disk before their compute needed them", "c"),
    "prefetch_lead_seconds": (
        "instgenie_cache_prefetch_lead_seconds_total", "Summed time prefetched steps were ready before their use", "c"
    ),
    "evictions": ("instgenie_cache_evictions_total", "Cache steps evicted from host memory", "c"),
    "evicted_bytes": ("instgenie_cache_evicted_bytes_total", "Bytes evicted from host memory", "c"),
    "corrupt": ("instgenie_cache_corrupt_total", "Template caches found corrupt on disk (discarded, recorded again)", "c"),
    "written_bytes": ("instgenie_cache_written_bytes_total", "Bytes of template cache written to disk", "c"),
    "host_bytes": ("instgenie_cache_host_bytes", "Template cache bytes held in host memory", "g"),
}


class CacheMetrics:
    """The activation store's :class:`~instgenie.cache.CacheStats`, polled on a thread.

    Loads happen on prefetch threads and between steps, so the store keeps plain
    counters and this mirrors their increments into Triton metrics.
    """

    def __init__(self, pb_utils: Any, labels: dict[str, str], store: Any, interval_s: float = 1.0) -> None:
        kinds = pb_utils.MetricFamily
        self._store = store
        self._families = []
        self._series = {}
        for field, (name, text, kind) in _CACHE_SERIES.items():
            family = metric_family(pb_utils, name, text, kinds.COUNTER if kind == "c" else kinds.GAUGE)
            self._families.append(family)
            self._series[field] = (LockedMetric(family, labels), kind)
        self._last = store.stats().as_dict()
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._poll, name="instgenie-cache-metrics", daemon=True)
        self._thread.start()

    def sync(self) -> None:
        now = self._store.stats().as_dict()
        for field, (metric, kind) in self._series.items():
            if kind == "g":
                metric.set(float(now[field]))
            elif now[field] > self._last[field]:
                metric.increment(float(now[field] - self._last[field]))
        self._last = now

    def _poll(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sync()
            except Exception:
                log.warning("cache metrics update failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
