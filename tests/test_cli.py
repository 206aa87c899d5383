"""The console script, run as a user would: build a model, edit, read the PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import png, rect_mask, template_image

INSTGENIE = str(Path(sys.executable).with_name("instgenie"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([INSTGENIE, *args], capture_output=True, text=True, timeout=300)


def test_make_model_writes_a_loadable_pipeline_folder(tmp_path: Path) -> None:
    result = run("make-model", "--family", "sd3-inpaint", "--size", "tiny", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3InpaintPipeline"
    assert list((tmp_path / "m" / "transformer").glob("*.safetensors"))


def test_edit_local_writes_an_edited_png(model_dirs: dict, tmp_path: Path) -> None:
    template, mask = template_image(11), rect_mask(0.25, seed=11)
    (tmp_path / "t.png").write_bytes(png(template))
    (tmp_path / "m.png").write_bytes(png(mask))

    result = run(
        "edit-local", "--model", str(model_dirs["flux-fill"]), "--template", str(tmp_path / "t.png"),
        "--mask", str(tmp_path / "m.png"), "--prompt", "a red hat", "--steps", "2",
        "--max-sequence-length", "32", "--out", str(tmp_path / "o.png"),
    )

    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stdout
    edited = np.asarray(Image.open(tmp_path / "o.png"))
    keep = np.asarray(mask) < 128
    assert edited.shape == (128, 128, 3)
    assert np.array_equal(edited[keep], np.asarray(template)[keep])


def test_edit_local_reports_bad_input_with_nonzero_exit(model_dirs: dict, tmp_path: Path) -> None:
    (tmp_path / "t.png").write_bytes(png(template_image(12)))
    (tmp_path / "m.png").write_bytes(png(rect_mask(0.25, size=64)))

    result = run(
        "edit-local", "--model", str(model_dirs["flux-fill"]), "--template", str(tmp_path / "t.png"),
        "--mask", str(tmp_path / "m.png"), "--prompt", "x", "--steps", "2", "--max-sequence-length", "32",
        "--out", str(tmp_path / "o.png"),
    )

    assert result.returncode == 2
    assert "invalid_mask" in result.stderr and "64x64" in result.stderr
    assert not (tmp_path / "o.png").exists()
