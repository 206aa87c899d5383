"""Fetch perf_analyzer into a folder (default ``out/perf_analyzer``); print its path.

The current tritonclient wheel no longer ships perf_analyzer; 2.41.1's does. This
downloads that wheel (not installed), extracts the binary, and links the two shared
libraries it needs from the installed nvidia-pytriton wheel into ``lib/`` beside it:
run it with ``LD_LIBRARY_PATH=<folder>/lib`` (:func:`environment`). Calling it again
reuses what is there. The README's shell steps, as one command and one function.

    python bench/perf_analyzer/fetch.py [--dest out/perf_analyzer]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "2.41.1"
WHEEL = f"tritonclient-{VERSION}-py3-none-manylinux1_x86_64.whl"
MEMBER = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
# What the binary links against, and the file in nvidia-pytriton's libraries that provides it.
LIBRARIES = {"libcudart.so.12": "libcudart-*.so.12*", "libb64.so.0d": "libb64-*.so.0d"}
DEFAULT_DEST = Path(__file__).resolve().parents[2] / "out" / "perf_analyzer"


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    """The perf_analyzer binary under ``dest``, downloaded and extracted if missing.

    Raises:
        RuntimeError: the wheel cannot be downloaded (no network) or lacks a file.
    """
    binary = dest / "perf_analyzer"
    (dest / "lib").mkdir(parents=True, exist_ok=True)
    if not binary.is_file():
        wheel = dest / WHEEL
        if not wheel.is_file():
            download = [sys.executable, "-m", "pip", "download", f"tritonclient=={VERSION}", "--no-deps", "-d", str(dest)]
            done = subprocess.run(download, capture_output=True, text=True)
            if done.returncode != 0 or not wheel.is_file():
                raise RuntimeError(f"cannot download {WHEEL}: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheel) as archive:
            partial = binary.with_suffix(".partial")
            partial.write_bytes(archive.read(MEMBER))
        partial.chmod(0o755)
        partial.rename(binary)
    libs = _pytriton_libs()
    for name, pattern in LIBRARIES.items():
        link = dest / "lib" / name
        if link.exists():
            continue
        found = sorted(libs.glob(pattern))
        if not found:
            raise RuntimeError(f"no {pattern} in {libs}: is nvidia-pytriton installed?")
        if link.is_symlink():
            link.unlink()
        link.symlink_to(found[0])
    return binary


def environment(binary: Path) -> dict[str, str]:
    """The environment to run ``binary`` with (its libraries on ``LD_LIBRARY_PATH``)."""
    lib = str(binary.parent / "lib")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [lib, os.environ.get("LD_LIBRARY_PATH")]))}


def _pytriton_libs() -> Path:
    from instgenie_server.launcher import triton_libs_dir

    return triton_libs_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    print(fetch(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
