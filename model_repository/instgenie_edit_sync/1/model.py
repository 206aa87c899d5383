"""Plain request/response front of the decoupled edit model (BLS with async execute)."""

import asyncio
import json

import triton_python_backend_utils as pb_utils

from instgenie_protocol import OUTPUTS, ServerError
from instgenie_server.responses import triton_error_from_text


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.edit_model = config["parameters"]["edit_model"]["string_value"]
        self.input_names = [entry["name"] for entry in config["input"]]

    async def execute(self, requests):
        return await asyncio.gather(*(self._forward(request) for request in requests))

    async def _forward(self, request):
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in self.input_names) if t is not None]
        forwarded = pb_utils.InferenceRequest(
            model_name=self.edit_model,
            inputs=inputs,
            requested_output_names=list(OUTPUTS),
            request_id=request.request_id(),
        )
        responses = await forwarded.async_exec(decoupled=True)
        # Iterating the decoupled responses blocks; keep the event loop free for other requests.
        final = await asyncio.get_running_loop().run_in_executor(None, _last_response, responses)
        if final is None:
            text = f"[request {request.request_id()}] internal: {self.edit_model} sent no response"
            return pb_utils.InferenceResponse(error=triton_error_from_text(pb_utils, text, "internal"))
        if final.has_error():
            # The status did not survive the BLS hop (Triton 2.51 answered a mask of the
            # wrong size with HTTP 500), so it is derived again from the message's reason.
            text = final.error().message()
            return pb_utils.InferenceResponse(error=triton_error_from_text(pb_utils, text, ServerError.parse(text).reason))
        return pb_utils.InferenceResponse(output_tensors=final.output_tensors())


def _last_response(responses):
    last = None
    for response in responses:
        if response.has_error() or response.output_tensors():
            last = response
    return last
