"""Where the ``tritonserver`` to run comes from, and the environment it runs in.

Only the files of the installed ``nvidia-pytriton`` wheel are used (server binary,
Python backend, backend stubs, shared libraries), never PyTriton's Python API. Where
Triton is installed already (the NGC ``tritonserver`` images: ``/opt/tritonserver``),
``$INSTGENIE_TRITON_HOME`` points at that tree and the wheel is not needed at all
(:func:`system_triton_home`). Imports neither Triton's Python packages nor torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "backend_directory",
    "pytriton_dir",
    "server_environment",
    "system_triton_home",
    "triton_dir",
    "triton_libs_dir",
]


@functools.cache
def pytriton_dir() -> Path:
    """Folder of the installed ``pytriton`` package, found without importing it.

    Importing ``pytriton`` would pull in tritonclient, gRPC and numpy; we only need its files.

    Raises:
        FileNotFoundError: ``nvidia-pytriton`` is not installed (``pip install .[server]``).
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed; install the 'server' extra")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def system_triton_home() -> Path | None:
    """``$INSTGENIE_TRITON_HOME``: a Triton install tree to run instead of the wheel's; ``None`` if unset.

    The tree holds ``bin/tritonserver`` and ``backends/python/`` (with a stub built for
    its own Python), as ``/opt/tritonserver`` in ``nvcr.io/nvidia/tritonserver:<tag>-py3``.

    Raises:
        FileNotFoundError: the variable is set but ``bin/tritonserver`` is not in that folder.
    """
    home = os.environ.get("INSTGENIE_TRITON_HOME")
    if not home:
        return None
    if not (Path(home) / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"INSTGENIE_TRITON_HOME={home} has no bin/tritonserver")
    return Path(home)


def triton_dir() -> Path:
    """The wheel's Triton tree: ``bin/tritonserver``, ``backends/python``, ``python_backend_stubs``."""
    return pytriton_dir() / "tritonserver"


def triton_libs_dir() -> Path:
    """The wheel's bundled shared libraries, which live beside the package (auditwheel layout)."""
    return pytriton_dir().parent / "nvidia_pytriton.libs"


def backend_directory(dest: Path) -> Path:
    """Assemble a Triton backend directory with the Python backend at ``dest/python``.

    The stub matches the running interpreter's version, so models run with this Python.
    Files are symlinked into the wheel (they are already executable there); calling it
    again on the same ``dest`` is a no-op. Returns ``dest`` (pass it as
    ``--backend-directory``).

    Raises:
        FileNotFoundError: the wheel has no stub for this Python version.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": triton_dir() / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": triton_dir() / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": triton_dir() / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing from nvidia-pytriton (Python {version} unsupported?)")
        link = python_dir / name
        if link.is_symlink() and link.readlink() == source:
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(source)
    return dest


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver``: ``base`` (default ``os.environ``) plus library and binary paths.

    ``LIBDIR`` follows the wheel's libraries because without it the stub can load a
    different libpython than this interpreter's; the interpreter's folder leads ``PATH``
    so the stub runs models with this venv's packages without activating it. With
    :func:`system_triton_home` set only ``PATH`` changes.
    """
    env = dict(os.environ if base is None else base)
    # A system install's stub links the image's own libpython, and its LD_LIBRARY_PATH
    # (CUDA compat libraries first) must stay as the image set it.
    if system_triton_home() is None:
        library_dirs = [str(triton_libs_dir()), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = _join_path(library_dirs, env.get("LD_LIBRARY_PATH", ""))
    # dirname of sys.executable, not its resolved target: the venv's bin, not the base Python's.
    env["PATH"] = _join_path([os.path.dirname(sys.executable)], env.get("PATH", ""))
    env.setdefault("GLIBC_TUNABLES", STUB_MALLOC_TUNABLES)
    return env


#: glibc malloc settings of the server and its stubs (unless ``GLIBC_TUNABLES`` is set).
#: The models compute on threads other than the stub's main one, so in glibc arenas
#: that give freed memory back to the system (heap trimming, a dynamic mmap threshold):
#: every denoising step faulted its activations in again, ~240k page faults and 15% of
#: a 512x512 flux-fill edit on CPU, against ~3k with these (docs/benchmarks/serving.md).
#: Memory a step frees stays with the process for the next one; blocks over 32 MiB
#: (the largest threshold glibc allows) are still mapped per allocation.
STUB_MALLOC_TUNABLES = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"


def _join_path(front: Sequence[str], existing: str) -> str:
    return os.pathsep.join([part for part in front if part] + ([existing] if existing else []))


