"""Triton adapter of the InstGenIE step loop (decoupled): tensors in, loop calls, responses out."""

import logging
import os
import uuid

import triton_python_backend_utils as pb_utils

from instgenie import Engine
from instgenie.codec import ProcessCodec
from instgenie.compute_threads import on_passing_thread
from instgenie.errors import InstGenIEError
from instgenie.lifetime import exit_with_parent
from instgenie.scheduler import FcfsScheduler
from instgenie.auto_register import AutoRegistrar
from instgenie.step_loop import StepLoop
from instgenie_protocol import parse_request
from instgenie_server.config import ModelParameters
from instgenie_server.leftovers import SHM_PREFIX_VARIABLE
from instgenie_server.metric_batching import MetricFlusher
from instgenie_server.metrics import CacheMetrics, GpuMetrics, TritonLoopMetrics
from instgenie_server.outbox import Outbox
from instgenie_server.responses import TritonJobSink
from instgenie_server.supervisor import RESTARTS_VARIABLE
from instgenie_server.tensors import template_list_outputs

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class TritonPythonModel:
    def initialize(self, args):
        # A tritonserver killed outright leaves this stub waiting at exit for its codec
        # workers, which wait for it: it leaves with the server instead.
        exit_with_parent()
        self.params = ModelParameters.from_args(args)
        # Loaded on a thread that exits: the step loop's OpenMP team must be the
        # stub's only one (see instgenie.compute_threads).
        self.engine = on_passing_thread(
            Engine.from_pretrained,
            self.params.model_dir,
            device=self.params.device,
            dtype=self.params.torch_dtype,
            max_sequence_length=self.params.max_sequence_length,
            limits=self.params.limits,
            cache=self.params.cache,
            costs=self.params.costs,
            family_options=self.params.family_options,
        )
        if self.params.codec_workers:
            self.engine.use_codec(
                ProcessCodec(
                    self.engine.family,
                    self.params.model_dir,
                    workers=self.params.codec_workers,
                    nice=self.params.codec_nice,
                    device=self.params.device,
                    dtype=self.params.torch_dtype,
                    semaphore_prefix=os.environ.get(SHM_PREFIX_VARIABLE),
                )
            )
        # Responses and cancellation queries off the loop's thread (GPU); metric updates
        # batched off it (both: every one is a round trip to the server).
        self.outbox = Outbox() if self.params.use_outbox else None
        self.metric_flusher = MetricFlusher(self.params.metrics_flush_s) if self.params.metrics_flush_s else None
        labels = {"model": args["model_name"], "version": args["model_version"], "instance": args["model_instance_name"]}
        self.metrics = TritonLoopMetrics(
            pb_utils,
            labels,
            text_tokens=self.engine.family.text_tokens(self.params.max_sequence_length),
            pixels_per_token=self.engine.family.pixels_per_token,
            restarts=int(os.environ.get(RESTARTS_VARIABLE, "0")),
            step_cost=self.engine.family.step_cost,
            flusher=self.metric_flusher,
        )
        self.cache_metrics = CacheMetrics(pb_utils, labels, self.engine.store)
        self.gpu_metrics = GpuMetrics(pb_utils, labels, self.engine.device.index or 0) if self.engine.device.type == "cuda" else None
        self.loop = StepLoop(
            self.engine,
            scheduler=FcfsScheduler(self.params.scheduler),
            max_waiting=self.params.max_waiting,
            workers=self.params.workers,
            observer=self.metrics,
            yield_to_helpers_s=self.params.helper_turn_s,
            auto_register=AutoRegistrar(self.params.auto_register_config),
        )

    def execute(self, requests):
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex
            sink = None
            try:
                parsed = parse_request(lambda name: _input(request, name), request_id)
                sink = TritonJobSink(
                    pb_utils,
                    request,
                    request_id,
                    progress=parsed.progress,
                    base64_output=parsed.base64_output,
                    outbox=self.outbox,
                    cancel_poll_s=self.params.cancel_poll_s,
                )
                if parsed.action == "list":
                    sink.send_outputs(template_list_outputs(request_id, self.engine.template_ids()))
                else:
                    self.loop.submit(parsed.request, sink)
            except InstGenIEError as error:
                self.metrics.failed(error.reason)
                sender = sink or TritonJobSink(pb_utils, request, request_id, progress=False, base64_output=False, outbox=self.outbox)
                sender.fail(error)
        return None

    def finalize(self):
        self.loop.stop(drain_timeout_s=self.params.drain_timeout_s)
        if self.outbox is not None:
            self.outbox.close(timeout_s=10.0)
        if self.metric_flusher is not None:
            self.metric_flusher.close()
        self.engine.codec.close()
        self.engine.store.close()
        self.cache_metrics.close()
        if self.gpu_metrics is not None:
            self.gpu_metrics.close()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
