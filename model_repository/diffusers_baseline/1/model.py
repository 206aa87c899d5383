"""Triton adapter of the diffusers baseline: a dynamic batch of requests -> one pipeline call per group."""

import logging
import uuid

import triton_python_backend_utils as pb_utils

from instgenie.baseline import BaselinePipeline
from instgenie.errors import InstGenIEError, InvalidInput
from instgenie_protocol import parse_request
from instgenie_server.config import ModelParameters
from instgenie_server.responses import response, triton_error
from instgenie_server.tensors import outcome_outputs

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class TritonPythonModel:
    def initialize(self, args):
        params = ModelParameters.from_args(args)
        self.pipeline = BaselinePipeline.from_pretrained(
            params.model_dir,
            device=params.device,
            dtype=params.torch_dtype,
            max_sequence_length=params.max_sequence_length,
            limits=params.limits,
        )

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted = []  # (slot, request id, parsed request)
        for slot, request in enumerate(requests):
            request_id = request.request_id() or uuid.uuid4().hex
            try:
                parsed = parse_request(lambda name: _input(request, name), request_id)
                if parsed.action != "edit":
                    raise InvalidInput(f"{parsed.action} is not served by the baseline; it only edits")
                accepted.append((slot, parsed))
            except InstGenIEError as error:
                responses[slot] = pb_utils.InferenceResponse(error=triton_error(pb_utils, request_id, error))
        results = self.pipeline.run([parsed.request for _, parsed in accepted])
        for (slot, parsed), result in zip(accepted, results):
            if isinstance(result, InstGenIEError):
                responses[slot] = pb_utils.InferenceResponse(error=triton_error(pb_utils, parsed.request.request_id, result))
            else:
                outputs = outcome_outputs(result, parsed.base64_output)
                responses[slot] = response(pb_utils, {name: value[None] for name, value in outputs.items()})
        return responses


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
