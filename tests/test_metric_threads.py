"""Metrics reported from many threads at once inside a real Triton Python stub.

python_backend 24.10 crashes tritonserver (SIGSEGV in libtriton_python.so) when two
threads update one custom metric at the same time: each update rewrites the metric's
shared-memory message while the server reads the other's. Without the lock in
``instgenie_server.metrics`` the first request of this test killed the server every
time (8 threads x 40 updates of shared series); the edit model's loop thread,
worker threads and ``execute()`` report concurrently in the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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

_MODEL = f'''
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from instgenie.step_loop import LoopLoad
from instgenie_server.metrics import TritonLoopMetrics

THREADS, CALLS = {THREADS}, {CALLS}


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = TritonLoopMetrics(pb_utils, {{"model": "metric_threads", "version": "1", "instance": "0"}})

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
'''


def test_metrics_updated_from_many_threads_keep_the_server_up_and_count_exactly(tmp_path: Path) -> None:
    model = tmp_path / "models" / "metric_threads"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(_CONFIG)
    (model / "1" / "model.py").write_text(_MODEL)
    with TritonServer(tmp_path / "models", log_file=tmp_path / "server.log") as server:
        client = http.InferenceServerClient(server.http_url, network_timeout=120)
        rounds = 2
        for round_ in range(rounds):
            value = http.InferInput("ROUND", [1], "INT64")
            value.set_data_from_numpy(np.array([round_], dtype=np.int64))
            result = client.infer("metric_threads", [value])
            assert int(result.as_numpy("CALLS")[0]) == THREADS * CALLS
        assert server.alive(), server.log_tail()
        text = server.read_metrics()
        total = rounds * THREADS * CALLS
        # Counters are exact: no update lost or applied twice under contention.
        assert sample_sum(text, "instgenie_steps_total") == total
        assert sample_sum(text, "instgenie_errors_total") == total
        error_series = [line for line in text.splitlines() if line.startswith("instgenie_errors_total{")]
        assert len(error_series) == 4  # invalid_input + reason_0..2, each created once
        assert "lock_exception" not in server.log_tail()
