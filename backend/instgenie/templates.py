"""Registered templates: their records, their ids, and the registry that finds them.

A template's K/V live in the :class:`~instgenie.cache.ActivationStore`; what else an
edit needs (the template run's inputs, final latents, image, mask, settings) is its
:class:`TemplateRecord`, kept in memory and written beside the K/V in the disk tier
(as tensors and strings: :func:`record_meta` / :func:`record_from_meta`), so a
restarted server rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .activations import TemplateActivations
from .cache import ActivationStore
from .cache.entry import KeptTokens
from .errors import UnknownTemplate
from .families import GenerationSettings, LatentInputs
from .template_ids import check_template_id, template_id_from_digest

__all__ = ["TemplateRecord", "TemplateRegistry", "TemplateSpec", "record_from_meta", "record_meta", "template_id"]


@dataclass
class TemplateRecord:
    """A registered template: its full run's inputs and result. Its K/V live in the
    engine's :class:`~instgenie.cache.ActivationStore`; ``activations`` is the
    recording itself on the record :meth:`Engine.finish_template` returns (for
    inspection), ``None`` on records the engine keeps or rebuilds from disk."""

    template_id: str
    model_fingerprint: str
    settings: GenerationSettings
    prompt: str
    image: Image.Image
    pixel_mask: np.ndarray  # [H, W] bool; the template's own edit region (usually empty)
    mask_tokens: torch.Tensor  # int64 [K]
    inputs: LatentInputs  # full grid, before the first step
    final_latents: torch.Tensor  # [1, N, C]
    cache_bytes: int = 0  # the K/V as stored (mode-dependent)
    activations: TemplateActivations | None = None
    # [steps, N, C] input latents of every step: lets an edit recompute a step's
    # first blocks over every token (None for caches written without them).
    step_latents: torch.Tensor | None = None


@dataclass(frozen=True)
class TemplateSpec:
    """A registration decoded and named but not prepared: its id is known before the
    prompt and VAE encodes that a duplicate registration would waste."""

    template_id: str
    prompt: str
    image: Image.Image
    pixel_mask: np.ndarray
    settings: GenerationSettings


def template_id(
    model_fingerprint: str, settings: GenerationSettings, prompt: str, image: Image.Image, pixel_mask: np.ndarray
) -> str:
    """Stable id: a hash of the model, the settings, the prompt, the image and its mask."""
    digest = hashlib.sha256()
    digest.update(model_fingerprint.encode())
    digest.update(repr(settings).encode())
    digest.update(prompt.encode())
    digest.update(np.asarray(image).tobytes())
    digest.update(np.packbits(pixel_mask).tobytes())
    return template_id_from_digest(digest.hexdigest())


class TemplateRegistry:
    """The templates an engine can edit: records in memory, K/V in the store.

    Thread-safe: worker threads look templates up while the loop thread records them.
    """

    def __init__(self, store: ActivationStore, model_fingerprint: str) -> None:
        self.store = store
        self.model_fingerprint = model_fingerprint
        self._templates: dict[str, TemplateRecord] = {}  # metadata of templates the store holds
        self._templates_lock = threading.Lock()

    def get(self, template_id: str) -> TemplateRecord:
        """A registered template; rebuilt from the disk tier if only that holds it.

        Raises ``UnknownTemplate`` for an id not of the template-id form before any lookup.
        """
        check_template_id(template_id)
        with self._templates_lock:
            record = self._templates.get(template_id)
        if record is not None and self.store.has(template_id):
            self.store.touch(template_id)
            return record
        if record is not None:  # its K/V were evicted (host-only store)
            with self._templates_lock:
                self._templates.pop(template_id, None)
            raise UnknownTemplate(f"template {template_id!r} was evicted from the cache; register it again")
        meta, info = self.store.meta(template_id)  # UnknownTemplate / CacheCorrupt
        record = record_from_meta(template_id, meta, info)
        if record.model_fingerprint != self.model_fingerprint:
            raise UnknownTemplate(f"template {template_id!r} was recorded with another model; register it again")
        record.cache_bytes = self.store.nbytes(template_id)
        with self._templates_lock:
            self._templates[template_id] = record
        return record

    def add(self, record: TemplateRecord, recording: TemplateActivations, unmasked: KeptTokens | None = None) -> None:
        """Store ``recording`` as ``record``'s cache (host memory; disk if configured).

        ``unmasked``: per cache site, the tokens outside the template's own edit region
        (what a cache storing only those keeps).

        Requests already running hold their template's cache and are unaffected by
        eviction. Raises ``CacheBudgetExceeded`` / ``CacheWriteFailed``.
        """
        meta, info = record_meta(record)
        record.cache_bytes = self.store.put(record.template_id, recording, meta, info, unmasked)
        with self._templates_lock:
            self._templates[record.template_id] = dataclasses.replace(record, activations=None)

    def has(self, template_id: str) -> bool:
        return self.store.has(template_id)

    def forget(self, template_id: str) -> TemplateRecord | None:
        """Drop the template everywhere; return its record if it was in memory (to record it again)."""
        with self._templates_lock:
            record = self._templates.pop(template_id, None)
        self.store.discard(template_id)
        return record

    def ids(self) -> list[str]:
        return self.store.template_ids()


_INPUT_FIELDS = ("latents", "condition", "image_latents", "noise", "blend_mask", "generator_state")


def record_meta(record: TemplateRecord) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A template record (without K/V) as tensors and strings, for the disk tier."""
    meta = {
        "final_latents": record.final_latents,
        "mask_tokens": record.mask_tokens,
        "pixel_mask": torch.from_numpy(np.ascontiguousarray(record.pixel_mask, dtype=np.uint8)),
        "image": torch.from_numpy(np.array(record.image.convert("RGB"), dtype=np.uint8)),
    }
    if record.step_latents is not None:
        meta["step_latents"] = record.step_latents
    for name in _INPUT_FIELDS:
        value = getattr(record.inputs, name)
        if value is not None:
            meta[f"inputs.{name}"] = value
    info = {
        "template_id": record.template_id,
        "model_fingerprint": record.model_fingerprint,
        "settings": json.dumps(dataclasses.asdict(record.settings)),
        "prompt": record.prompt,
    }
    return {name: tensor.detach().cpu().contiguous() for name, tensor in meta.items()}, info


def record_from_meta(template_id: str, meta: dict[str, torch.Tensor], info: dict[str, str]) -> TemplateRecord:
    inputs = LatentInputs(**{name: meta.get(f"inputs.{name}") for name in _INPUT_FIELDS})  # type: ignore[arg-type]
    return TemplateRecord(
        template_id=template_id,
        model_fingerprint=info["model_fingerprint"],
        settings=GenerationSettings(**json.loads(info["settings"])),
        prompt=info["prompt"],
        image=Image.fromarray(meta["image"].numpy()),
        pixel_mask=meta["pixel_mask"].numpy().astype(bool),
        mask_tokens=meta["mask_tokens"],
        inputs=inputs,
        final_latents=meta["final_latents"],
        step_latents=meta.get("step_latents"),
    )
