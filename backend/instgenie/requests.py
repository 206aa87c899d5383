"""A decoded client request, as the step loop takes it (no torch: the protocol layer builds it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EditRequest"]


@dataclass(frozen=True)
class EditRequest:
    """A decoded client request: an edit, or the registration of a template."""

    request_id: str
    action: str = "edit"
    prompt: str = ""
    mask: bytes | None = None  # edit region (register: the template's own region, optional)
    image: bytes | None = None  # template image to register, or a raw image to edit
    template_id: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    full_compute: bool = False
