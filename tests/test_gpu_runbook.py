"""The GPU run book's dry run: bench/gpu/run.sh --dry-run does every step on the CPU with
tiny sizes, so a GPU session finds a script that works (and CI keeps it working)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_run_book_runs_dry_on_the_cpu_and_writes_its_page(tmp_path: Path) -> None:
    page = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    run = subprocess.run([str(ROOT / "bench/gpu/run.sh"), "--dry-run", "--markdown", str(page)],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    text = page.read_text()
    for heading in ("## 1. CUDA tests", "## 2. Exactness", "## 3. Masked vs full step", "## 4. Cache pipeline", "## 5. NVML"):
        assert heading in text, heading
    # CPU fp32: the invariant is bitwise (the script itself fails otherwise).
    assert "| flux-fill |" in text and "| sd-inpaint |" in text and "| no |" not in text
    assert "| masked-attention | 0.20 |" in text and "| masked-attention | 1.00 |" in text  # the swapped transformer ran
    assert "| 0.10 |" in text  # the cache table
    assert "NVML absent" in text and "skipped" in text  # no GPU here: the CUDA tests skip, NVML says so
    assert not any(tmp_path.glob("instgenie-gpu.*"))  # its scratch folder is gone
