"""Raw protocol calls for server tests: one gRPC stream per call, any tensor the test wants.

The client library hides the wire; these tests need it bare (wrong dtypes, wrong
shapes, missing inputs), so they build requests with tritonclient directly.
"""

from __future__ import annotations

import queue
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from instgenie_protocol import INPUTS, ServerError, sample_sum

_NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}


def tensor(name: str, value, datatype: str | None = None, shape: list[int] | None = None) -> grpcclient.InferInput:
    datatype = datatype or INPUTS[name]
    array = np.array(value if isinstance(value, list) else [value], dtype=_NUMPY[datatype])
    if shape is not None:
        array = array.reshape(shape)
    infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


@dataclass
class Call:
    """Everything one request got back, with arrival times (monotonic seconds)."""

    request_id: str
    sent_at: float
    steps: list[tuple[float, int]] = field(default_factory=list)
    outputs: dict[str, np.ndarray] | None = None
    error: ServerError | None = None
    finished_at: float | None = None


class Stream:
    """One gRPC stream: several calls may share it (they then cancel together)."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self._events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self._events.put((time.monotonic(), result, error)))
        self._calls: dict[str, Call] = {}

    def send(self, inputs: list[grpcclient.InferInput] | dict, request_id: str, model: str = "instgenie_edit") -> Call:
        if isinstance(inputs, dict):
            inputs = [tensor(name, value) for name, value in inputs.items()]
        call = self._calls[request_id] = Call(request_id, time.monotonic())
        self.client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        return call

    def wait(self, *calls: Call, timeout: float = 120) -> None:
        """Until every call in ``calls`` has its final response or error."""
        self.pump(lambda: all(c.finished_at is not None for c in calls), timeout)

    def pump(self, until, timeout: float = 120) -> None:
        """Handle responses until ``until()`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no response in time")
            try:
                at, result, error = self._events.get(timeout=min(left, 0.05))
            except queue.Empty:
                continue
            if error is not None:
                parsed = ServerError.parse(str(error))
                call = self._calls.get(parsed.request_id) or next(c for c in self._calls.values() if c.finished_at is None)
                call.error, call.finished_at = parsed, at
                continue
            response = result.get_response()
            call = self._calls[response.id]
            final = response.parameters["triton_final_response"].bool_param
            names = [o.name for o in response.outputs]
            if "STEP" in names and not final:
                call.steps.append((at, int(result.as_numpy("STEP")[0])))
            if final:
                call.outputs = {name: result.as_numpy(name) for name in names}
                call.finished_at = at

    def call(self, inputs, request_id: str, timeout: float = 120) -> Call:
        call = self.send(inputs, request_id)
        self.wait(call, timeout=timeout)
        return call

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def metrics(url: str) -> str:
    """The Prometheus text of a metrics page."""
    return urllib.request.urlopen(url, timeout=10).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of ``name`` over series whose labels include ``labels``."""
    return sample_sum(text, name, **labels)


def baseline_png(http_url: str, fields: dict, request_id: str) -> bytes:
    """The ``diffusers_baseline`` model's PNG for an edit of a raw image, over plain HTTP infer."""
    client = httpclient.InferenceServerClient(http_url)
    try:
        inputs = []
        for name, value in fields.items():
            datatype = INPUTS[name]
            array = np.array([[value]], dtype=_NUMPY[datatype])
            infer_input = httpclient.InferInput(name, [1, 1], datatype)
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        return client.infer("diffusers_baseline", inputs, request_id=request_id).as_numpy("EDITED_IMAGE")[0][0]
    finally:
        client.close()


def register(url: str, image: bytes, prompt: str = "a room", **fields) -> str:
    """Register a template over one gRPC stream; its id."""
    stream = Stream(url)
    try:
        call = stream.call({"ACTION": "register", "IMAGE": image, "PROMPT": prompt, **fields}, f"reg-{time.monotonic_ns()}")
    finally:
        stream.close()
    assert call.error is None, call.error
    return call.outputs["TEMPLATE"][0].decode()


def perf_analyzer_inputs(url: str, out_dir: Path, *, steps: int, entries: int) -> Path:
    """Fetch perf_analyzer and write its input files with ``bench/perf_analyzer/prepare.py``
    against ``url`` (which registers their templates); the binary. Skips the test where
    the perf_analyzer wheel cannot be fetched."""
    import pytest

    modules = {name: _perf_analyzer_module(name) for name in ("fetch", "prepare")}
    try:
        binary = modules["fetch"].fetch()
    except RuntimeError as exc:  # the 2.41.1 wheel comes from PyPI
        pytest.skip(f"perf_analyzer is not available here: {exc}")
    prepared = ["--url", url, "--size", "128", "--steps", str(steps), "--entries", str(entries), "--out-dir", str(out_dir)]
    assert modules["prepare"].main(prepared) == 0
    return binary


def run_perf_analyzer(binary: Path, url: str, out_dir: Path, *, entries: int, concurrency: int) -> str:
    """perf_analyzer over the edit requests of ``out_dir``; its report (asserted to have run)."""
    command = [str(binary), "-m", "instgenie_edit", "-i", "grpc", "--streaming", "-u", url,
               "--input-data", str(out_dir / "edit.json"), "--concurrency-range", str(concurrency),
               "--measurement-mode", "count_windows", "--measurement-request-count", str(entries),
               "--stability-percentage", "500", "--max-trials", "5"]  # fmt: skip
    environment = _perf_analyzer_module("fetch").environment(binary)
    run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Throughput:" in run.stdout and "infer/sec" in run.stdout
    return run.stdout


def _perf_analyzer_module(name: str):  # type: ignore[no-untyped-def]
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "perf_analyzer" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"perf_analyzer_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
