"""Model repositories: find the source one, render a copy with config parameters set.

Behaviour lives in ``config.pbtxt`` parameters (as in Triton's python_backend
examples); ``serve`` sets them per model by editing the protobuf text in a rendered
copy, never the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = ["default_model_repository", "models_with_parameter", "render_repository", "set_config_parameters"]


def default_model_repository() -> Path:
    """``$INSTGENIE_MODEL_REPOSITORY``, else the source tree's ``model_repository/``."""
    override = os.environ.get("INSTGENIE_MODEL_REPOSITORY")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "model_repository"



def _parameter_pattern(key: str) -> re.Pattern[str]:
    """Match ``key: "KEY" value { string_value: "..." }``: group 1 runs up to the value's opening quote."""
    return re.compile(
        r'(\bkey\s*:\s*"' + re.escape(key) + r'"\s*value\s*:?\s*\{\s*string_value\s*:\s*")(?:[^"\\]|\\.)*"'
    )


def _pbtxt_string(value: str) -> str:
    """Escape ``value`` for a double-quoted protobuf text-format string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def set_config_parameters(config: str, parameters: Mapping[str, str]) -> str:
    """Return ``config`` (config.pbtxt text) with each ``parameters`` entry's ``string_value`` set.

    Existing entries are rewritten in place; missing keys are appended as new
    ``parameters`` blocks.
    """
    for key, value in parameters.items():
        pattern = _parameter_pattern(key)
        quoted = _pbtxt_string(value)
        if pattern.search(config):
            # A function replacement, so backslashes in ``quoted`` are not read as group references.
            config = pattern.sub(lambda match, value=quoted: match.group(1) + value + '"', config)
        else:
            config = (
                config.rstrip("\n") + f'\nparameters {{\n  key: "{key}"\n  value: {{ string_value: "{quoted}" }}\n}}\n'
            )
    return config


def models_with_parameter(repository: Path, key: str) -> list[str]:
    """Names of the models in ``repository`` whose config.pbtxt declares the parameter ``key``."""
    pattern = _parameter_pattern(key)
    return sorted(
        config.parent.name for config in repository.glob("*/config.pbtxt") if pattern.search(config.read_text())
    )


def render_repository(src: Path, dest: Path, parameters: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """Copy the model repository ``src`` to ``dest``, setting config parameters per model.

    ``parameters`` maps a model name to ``{key: string_value}``; see
    :func:`set_config_parameters`. ``__pycache__`` folders are not copied. Returns ``dest``.

    Raises:
        FileNotFoundError: ``src`` is not a folder.
        FileExistsError: ``dest`` exists and is not empty (a stale model would be served).
        KeyError: a model named in ``parameters`` has no config.pbtxt in ``src``.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"model repository {src} does not exist")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; render into a new folder")
    parameters = parameters or {}
    missing = [name for name in parameters if not (src / name / "config.pbtxt").is_file()]
    if missing:
        raise KeyError(f"no config.pbtxt for model(s) {missing} in {src}")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for name, values in parameters.items():
        config = dest / name / "config.pbtxt"
        config.write_text(set_config_parameters(config.read_text(), values))
    return dest


