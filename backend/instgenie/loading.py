"""Loading a diffusers pipeline folder and choosing its family adapter.

Any folder ``DiffusionPipeline.from_pretrained`` accepts works: the tiny models of
:mod:`instgenie.tiny` and a real FLUX.1-Fill-dev or SD3 checkpoint take the same path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UnsupportedModel
from .families import FAMILIES, Family

logger = logging.getLogger(__name__)

# Bytes sampled from each weight file for the fingerprint: hashing all of a 24 GB
# checkpoint at every start would take minutes; header + size + samples changes
# whenever the weights do in practice (re-trained, re-quantised, different seed).
_SAMPLE_BYTES = 1 << 20


def pipeline_class_name(model_dir: Path) -> str:
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise UnsupportedModel(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    try:
        content = json.loads(index.read_text())
    except ValueError as exc:
        raise UnsupportedModel(f"{index} is not valid JSON: {exc}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("_class_name"), str):
        raise UnsupportedModel(f"{index} has no pipeline _class_name")
    return content["_class_name"]


def family_class(class_name: str) -> type[Family]:
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    supported = sorted(name for family in FAMILIES for name in family.pipeline_classes)
    raise UnsupportedModel(f"pipeline class {class_name!r} is not supported; supported: {', '.join(supported)}")


def fingerprint(model_dir: Path) -> str:
    """A short hash of a model folder's configs and weights (sampled); see ``_SAMPLE_BYTES``."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(model_dir).as_posix()
        digest.update(rel.encode())
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with path.open("rb") as f:
            if path.suffix in {".json", ".txt", ".model"} or size <= 3 * _SAMPLE_BYTES:
                digest.update(f.read())
                continue
            for offset in (0, size // 2, size - _SAMPLE_BYTES):
                f.seek(offset)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def load_pipeline(model_dir: str | os.PathLike, device: str | torch.device, dtype: torch.dtype) -> tuple[Any, type[Family], str]:
    """Load ``model_dir``; return the pipeline, its family class and the model fingerprint."""
    from diffusers import DiffusionPipeline

    path = Path(model_dir)
    family = family_class(pipeline_class_name(path))
    logger.info("loading %s from %s on %s (%s)", family.__name__, path, device, dtype)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, fingerprint(path)
