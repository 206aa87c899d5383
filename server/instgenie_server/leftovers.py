"""What a server or launcher killed outright leaves behind, named so it can be found again.

Shared-memory regions and temporary folders carry the launcher's pid in their names, so
a later start removes those of dead launchers (:func:`remove_leftovers`) and never
touches a running server's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

__all__ = [
    "REPOSITORY_PREFIX",
    "SHM_PREFIX",
    "SHM_PREFIX_VARIABLE",
    "WORKDIR_PREFIX",
    "PythonEnvClaim",
    "remove_leftovers",
    "remove_shm_regions",
]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "instgenie_"
#: Tells the stubs the server's shared-memory prefix, so the semaphores their worker
#: pools create carry it and are removed with the server's regions.
SHM_PREFIX_VARIABLE = "INSTGENIESHM_PREFIX"
WORKDIR_PREFIX = "instgenie-triton-"
#: Prefix of the temporary repositories ``serve`` renders (their pid tells a dead owner).
REPOSITORY_PREFIX = "instgenie-repo-"


_PYTHON_ENV_PATTERN = re.compile(r"python_env_[A-Za-z0-9]{6}")
_PYTHON_ENV_RECORD = "python-env"


class PythonEnvClaim:
    """The ``/tmp/python_env_XXXXXX`` folder the Python backend of one server made.

    python_backend 24.10 makes it with ``mkdtemp`` on a fixed ``/tmp`` path (TMPDIR does
    not move it) and removes it only when the server exits cleanly, so each killed
    server would leave one. Its name does not say whose it is: a folder is claimed
    only when it is the one new folder between launch and readiness (with several
    servers starting at once none is claimed and it stays). The claim is recorded in
    the work folder, so :func:`remove_leftovers` removes it for a killed launcher too.
    A live server's folder is never removed: the backend fails its exit without it.
    """

    def __init__(self, workdir: Path) -> None:
        self._record = workdir / _PYTHON_ENV_RECORD
        self._launched_at = time.time()
        self._before = set(_python_env_folders())
        self._record.unlink(missing_ok=True)

    def claim(self) -> None:
        if self._record.exists():
            return
        new = [f for f in set(_python_env_folders()) - self._before if _ctime(f) >= self._launched_at - 1]
        if len(new) == 1:
            self._record.write_text(str(new[0]))

    def remove(self) -> None:
        """Remove the claimed folder; call only once the server is dead."""
        _remove_recorded_python_env(self._record)


def _python_env_folders() -> list[Path]:
    return [f for f in Path("/tmp").glob("python_env_*") if _PYTHON_ENV_PATTERN.fullmatch(f.name)]


def _ctime(path: Path) -> float:
    try:
        return path.stat().st_ctime
    except OSError:
        return 0.0


def _remove_recorded_python_env(record: Path) -> None:
    try:
        folder = Path(record.read_text().strip())
    except OSError:
        return
    if folder.parent == Path("/tmp") and _PYTHON_ENV_PATTERN.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
    record.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    """The launcher pid a leftover's name starts with after ``prefix`` (``None`` if it names none)."""
    digits = name[len(prefix) :].split("_", 1)[0].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


def remove_shm_regions(prefix: str) -> None:
    # Triton's regions start with the prefix; the stubs' multiprocessing semaphores are
    # named "sem.<prefix>..." (see instgenie.codec: INSTGENIESHM_PREFIX).
    for pattern in (f"{prefix}*", f"sem.{prefix}*"):
        for region in SHM_DIR.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                region.unlink()


def remove_leftovers() -> list[Path]:
    """Remove what launchers that died without stopping left: shared-memory regions and
    temporary folders whose owner process is gone. Returns what was removed.

    Their names carry the owning launcher's pid, so a running server's are never touched.
    """
    removed: list[Path] = []
    for shm in [*SHM_DIR.glob(f"{SHM_PREFIX}*"), *SHM_DIR.glob(f"sem.{SHM_PREFIX}*")]:
        owner = _owner_pid(shm.name.removeprefix("sem."), SHM_PREFIX)
        if owner is not None and not _pid_alive(owner):
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
                removed.append(shm)
    temp = Path(tempfile.gettempdir())
    for prefix in (WORKDIR_PREFIX, REPOSITORY_PREFIX):
        for folder in temp.glob(f"{prefix}*"):
            owner = _owner_pid(folder.name, prefix)
            if owner is not None and not _pid_alive(owner) and folder.is_dir() and not folder.is_symlink():
                _remove_recorded_python_env(folder / _PYTHON_ENV_RECORD)
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        logger.info("removed what a killed launcher left: %s", ", ".join(str(p) for p in removed))
    return removed


