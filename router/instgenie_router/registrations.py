"""Template registrations the router has seen, kept to replay on instances that join.

An instance that joins after a template was registered (a new pod, or one that
restarted with an empty cache) cannot serve edits of it. The router keeps the last
``capacity`` registration requests (a template's image and prompt: kilobytes to a
few MB each) and, when an instance becomes healthy, asks it which templates it holds
(``ACTION=list``) and registers the missing ones there. The protobuf helpers to read
a template id from a response live here too.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from typing import Any

from tritonclient.grpc import service_pb2 as pb

__all__ = ["Registrations", "list_request", "bytes_output"]


class Registrations:
    """Registration requests by template id, the most recent ``capacity`` of them."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._requests: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, template_id: str, request: Any, token_steps: float) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._requests[template_id] = (request, token_steps)
            self._requests.move_to_end(template_id)
            while len(self._requests) > self.capacity:
                self._requests.popitem(last=False)

    def record_token_steps(self, template_id: str | None) -> float | None:
        """What recording ``template_id`` costs, if the router can replay its registration."""
        with self._lock:
            entry = self._requests.get(template_id) if template_id else None
        return None if entry is None else entry[1]

    def missing(self, held: set[str]) -> list[tuple[str, Any, float]]:
        """``(template id, request, token-steps)`` of each remembered template not in ``held``."""
        with self._lock:
            return [(t, request, cost) for t, (request, cost) in self._requests.items() if t not in held]

    def template_ids(self) -> list[str]:
        """The remembered templates, most recently registered last."""
        with self._lock:
            return list(self._requests)

    def request(self, template_id: str) -> Any | None:
        """The registration request of ``template_id`` (its inputs hold the template image), if remembered."""
        with self._lock:
            entry = self._requests.get(template_id)
        return None if entry is None else entry[0]

    def __len__(self) -> int:
        return len(self._requests)


def list_request(model_name: str, request_id: str) -> Any:
    """An ``ACTION=list`` request to the edit model (what ``InstGenIEClient.list_templates`` sends)."""
    action = b"list"
    return pb.ModelInferRequest(
        model_name=model_name,
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="ACTION", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(action)) + action],
    )


def bytes_output(response: Any, name: str) -> list[bytes] | None:
    """The elements of BYTES output ``name`` of a ``ModelStreamInferResponse``, or None."""
    infer = response.infer_response
    for index, output in enumerate(infer.outputs):
        if output.name != name:
            continue
        if index < len(infer.raw_output_contents):
            data, offset, elements = infer.raw_output_contents[index], 0, []
            while offset + 4 <= len(data):
                (length,) = struct.unpack_from("<I", data, offset)
                elements.append(bytes(data[offset + 4 : offset + 4 + length]))
                offset += 4 + length
            return elements
        return list(output.contents.bytes_contents)
    return None
