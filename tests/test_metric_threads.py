"""Metrics reported from many threads at once inside a real Triton Python stub.

python_backend 24.10 crashes tritonserver (SIGSEGV in libtriton_python.so) when two
threads update one custom metric at the same time: each update rewrites the metric's
shared-memory message while the server reads the other's. Without the lock in
``instgenie_server.metrics`` the first request of this test killed the server every
time (8 threads x 40 updates of shared series); the edit model's loop thread,
worker threads and ``execute()`` report concurrently in the same way. The same runs
with the updates batched by a ``MetricFlusher`` (the edit model's default), whose
thread then races the reporters for the pending counts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http

from instgenie_protocol import sample_sum
from instgenie_server.launcher import TritonServer

THREADS = 8
CALLS = 40

_CONFIG = """
name: "metric_threads"
backend: "python"
max_batch_size: 0
input [ { name: "ROUND" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "CALLS" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

_MODEL = '''
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from instgenie.step_loop import LoopLoad
from instgenie_server.metric_batching import MetricFlusher
from instgenie_server.metrics import TritonLoopMetrics

THREADS, CALLS, FLUSH_S = {THREADS}, {CALLS}, {FLUSH_S}


class TritonPythonModel:
    def initialize(self, args):
        self.flusher = MetricFlusher(FLUSH_S) if FLUSH_S else None
        labels = {{"model": "metric_threads", "version": "1", "instance": "0"}}
        self.metrics = TritonLoopMetrics(pb_utils, labels, flusher=self.flusher)

    def execute(self, requests):
        responses = []
        for request in requests:
            def report(worker):
                for call in range(CALLS):
                    # one counter and one gauge shared by all threads, and error
                    # series created on first use by whichever thread gets there
                    self.metrics.failed("invalid_input" if call % 2 else f"reason_{{worker % 3}}")
                    self.metrics.step(0.01, 1, 64)
                    self.metrics.load(LoopLoad(active=worker))
            threads = [threading.Thread(target=report, args=(worker,)) for worker in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.metrics.load(LoopLoad())  # idle again: the stop's drain waits for these gauges
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("CALLS", np.array([THREADS * CALLS], dtype=np.int64))]))
        return responses

    def finalize(self):
        if self.flusher is not None:
            self.flusher.close()
'''


@pytest.mark.parametrize("flush_s", [0, 0.05], ids=["each-update", "batched"])
def test_metrics_updated_from_many_threads_keep_the_server_up_and_count_exactly(tmp_path: Path, flush_s: float) -> None:
    model = tmp_path / "models" / "metric_threads"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(_CONFIG)
    (model / "1" / "model.py").write_text(_MODEL.format(THREADS=THREADS, CALLS=CALLS, FLUSH_S=flush_s))
    with TritonServer(tmp_path / "models", log_file=tmp_path / "server.log") as server:
        client = http.InferenceServerClient(server.http_url, network_timeout=120)
        rounds = 2
        for round_ in range(rounds):
            value = http.InferInput("ROUND", [1], "INT64")
            value.set_data_from_numpy(np.array([round_], dtype=np.int64))
            result = client.infer("metric_threads", [value])
            assert int(result.as_numpy("CALLS")[0]) == THREADS * CALLS
        assert server.alive(), server.log_tail()
        total = rounds * THREADS * CALLS
        deadline = time.monotonic() + 10  # batched: the next flush, a fraction of a second away
        while True:
            text = server.read_metrics()
            if sample_sum(text, "instgenie_steps_total") >= total or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # Counters are exact: no update lost or applied twice under contention.
        assert sample_sum(text, "instgenie_steps_total") == total
        assert sample_sum(text, "instgenie_errors_total") == total
        error_series = [line for line in text.splitlines() if line.startswith("instgenie_errors_total{")]
        assert len(error_series) == 4  # invalid_input + reason_0..2, each created once
        assert "lock_exception" not in server.log_tail()
