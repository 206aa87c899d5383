"""The disk tier: every recorded template, one folder per template, safetensors files.

Layout under ``root/<mode>/<template_id>/``: ``meta.safetensors`` (what the engine
needs to rebuild the template without its K/V), ``step-NNNN.safetensors`` (one per
denoising step) and ``manifest.json`` (format, model fingerprint, byte size and
CRC-32 of every file). Writes are atomic: a template is written into a
``.partial-*`` folder that is renamed into place only after every file and the
manifest are on disk, so a crash mid-write leaves nothing that loads. Reads
memory-map the file, check its size and checksum before parsing, and raise
:class:`~instgenie.errors.CacheCorrupt` on any mismatch: a bad file is never used.

Confinement: a template id reaches this tier from clients, so every path is built
by :meth:`DiskTier.template_dir`, which takes only the template-id form and refuses
a folder that is a symbolic link or resolves outside the tier's folder; files are
opened without following links. Nothing outside the folder is read or deleted, and
error messages name templates and files, never server paths (those go to the log).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import uuid
import zlib
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import CacheCorrupt, CacheWriteFailed, UnknownTemplate
from ..template_ids import check_template_id, is_template_id

log = logging.getLogger(__name__)

__all__ = ["DiskTier"]

FORMAT = 1
MANIFEST = "manifest.json"
META = "meta.safetensors"

_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def step_file(step: int) -> str:
    return f"step-{step:04d}.safetensors"


def _read_no_follow(path: Path) -> str:
    """A small text file's contents; a symbolic link is refused (``OSError`` ELOOP)."""
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
        return handle.read().decode()


def _parse_safetensors(buffer: memoryview, path: str, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors image; the tensors view ``buffer`` unless ``copy``."""
    try:
        (header_len,) = struct.unpack("<Q", buffer[:8])
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
        metadata = header.pop("__metadata__", {}) or {}
        base = 8 + header_len
        tensors = {}
        for name, spec in header.items():
            start, end = spec["data_offsets"]
            dtype = _DTYPES[spec["dtype"]]
            shape = spec["shape"]
            if base + end > len(buffer):
                raise ValueError("tensor data past the end of the file")
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            if count:
                flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + start)
            else:
                flat = torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape).clone() if copy else flat.reshape(shape)
        return tensors, metadata
    except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as exc:
        raise CacheCorrupt(f"cache file {path} is malformed: {exc}") from exc


class DiskTier:
    """Template caches of one storage mode under ``root``, for one model."""

    def __init__(self, root: str | Path, mode_name: str, model_fingerprint: str) -> None:
        self.model_fingerprint = model_fingerprint
        try:
            (Path(root) / mode_name).mkdir(parents=True, exist_ok=True)
            # Resolved once: the confinement checks compare against the real folder.
            self.folder = (Path(root) / mode_name).resolve(strict=True)
        except OSError as exc:
            log.error("cannot create the cache folder %s: %s", Path(root) / mode_name, exc)
            raise CacheWriteFailed(f"cannot create the cache folder ({exc.strerror})") from exc
        for partial in self.folder.glob(".partial-*"):  # left by a crash mid-write
            shutil.rmtree(partial, ignore_errors=True)

    def template_dir(self, template_id: str) -> Path:
        """The folder of ``template_id`` (which need not exist), confined to this tier.

        Raises:
            UnknownTemplate: ``template_id`` is not of the template-id form.
            CacheCorrupt: the folder is a symbolic link or resolves outside the tier
                (planted by someone with access to the cache folder); it is left alone.
        """
        path = self.folder / check_template_id(template_id)
        if path.is_symlink() or (path.exists() and path.resolve().parent != self.folder):
            log.error("refusing %s: a link or a folder outside the cache folder %s", path, self.folder)
            raise CacheCorrupt(f"the cache of template {template_id} is not a folder of the cache; it is not used")
        return path

    # -- writing -----------------------------------------------------------------------
    def write(
        self,
        template_id: str,
        meta: dict[str, torch.Tensor],
        info: dict[str, str],
        steps: Iterable[tuple[int, dict[str, torch.Tensor]]],
    ) -> int:
        """Write a template atomically; return the bytes written."""
        final = self.template_dir(template_id)
        partial = self.folder / f".partial-{template_id}-{uuid.uuid4().hex[:8]}"
        files: dict[str, dict[str, int]] = {}
        try:
            partial.mkdir()
            files[META] = self._write_file(partial / META, meta, info)
            count = 0
            for step, tensors in steps:
                files[step_file(step)] = self._write_file(partial / step_file(step), tensors, None)
                count += 1
            manifest = {
                "format": FORMAT,
                "template_id": template_id,
                "model": self.model_fingerprint,
                "steps": count,
                "files": files,
            }
            self._write_bytes(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
            self._fsync_dir(partial)
            if final.exists():  # re-recorded (after corruption): swap, then drop the old one
                old = self.folder / f".partial-old-{template_id}-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                partial.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                partial.rename(final)
            self._fsync_dir(self.folder)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            log.error("cannot write the cache of template %s to %s: %s", template_id, self.folder, exc)
            raise CacheWriteFailed(f"cannot write the cache of template {template_id}: {exc.strerror}") from exc
        return sum(f["bytes"] for f in files.values())

    def _write_file(self, path: Path, tensors: dict[str, torch.Tensor], info: dict[str, str] | None) -> dict[str, int]:
        data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=info)
        self._write_bytes(path, data)
        return {"bytes": len(data), "crc32": zlib.crc32(data)}

    @staticmethod
    def _write_bytes(path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------------
    def has(self, template_id: str) -> bool:
        if not is_template_id(template_id):
            return False
        path = self.folder / template_id
        return not path.is_symlink() and (path / MANIFEST).is_file() and not (path / MANIFEST).is_symlink()

    def template_ids(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if is_template_id(p.name) and self.has(p.name))

    def manifest(self, template_id: str) -> dict:
        path = self.template_dir(template_id) / MANIFEST
        try:
            manifest = json.loads(_read_no_follow(path))
        except FileNotFoundError:
            raise CacheCorrupt(f"the cache of template {template_id} is gone") from None
        except (OSError, ValueError) as exc:
            log.error("cache manifest %s is unreadable: %s", path, exc)
            raise CacheCorrupt(f"the cache manifest of template {template_id} is unreadable") from exc
        if manifest.get("format") != FORMAT or manifest.get("model") != self.model_fingerprint:
            raise CacheCorrupt(f"the cache of template {template_id} was written for another model or format")
        return manifest

    def read_meta(self, template_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self._read(template_id, META, copy=True)

    def read_step(self, template_id: str, step: int) -> dict[str, torch.Tensor]:
        """The step's tensors, mapped from the file (no copy: the checksum pass has just
        faulted every page in, so the compute reads them without touching the disk)."""
        return self._read(template_id, step_file(step), copy=False)[0]

    def _read(self, template_id: str, name: str, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        expected = self.manifest(template_id)["files"].get(name)
        path = self.template_dir(template_id) / name
        where = f"{template_id}/{name}"  # what a client may be told
        if expected is None:
            raise CacheCorrupt(f"the cache manifest of template {template_id} lists no {name}")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with open(fd, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != expected["bytes"]:
                    raise CacheCorrupt(f"cache file {where} has {size} bytes, expected {expected['bytes']} (truncated?)")
                if size == 0:
                    raise CacheCorrupt(f"cache file {where} is empty")
                # Copy-on-write: tensors viewing the map may be written to without touching the file.
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise CacheCorrupt(f"cache file {where} is missing") from None
        except OSError as exc:  # ELOOP: a planted link
            log.error("cache file %s cannot be read: %s", path, exc)
            raise CacheCorrupt(f"cache file {where} cannot be read ({exc.strerror})") from exc
        view = memoryview(mapped)
        try:
            if zlib.crc32(view) != expected["crc32"]:
                raise CacheCorrupt(f"cache file {where} fails its checksum")
            tensors, metadata = _parse_safetensors(view, where, copy)
        except CacheCorrupt:
            view.release()
            mapped.close()
            raise
        if copy:
            view.release()
            mapped.close()
        # Otherwise the tensors hold the view, which holds the map, until they are dropped.
        return tensors, metadata

    def delete(self, template_id: str) -> None:
        """Remove a template's folder; anything that is not a folder of this tier is left alone."""
        try:
            target = self.template_dir(template_id)
        except (UnknownTemplate, CacheCorrupt):
            return
        if target.is_dir():
            trash = self.folder / f".partial-del-{template_id}-{uuid.uuid4().hex[:8]}"
            try:
                target.rename(trash)
            except OSError:
                return
            shutil.rmtree(trash, ignore_errors=True)

    def nbytes(self, template_id: str) -> int:
        return sum(f["bytes"] for f in self.manifest(template_id)["files"].values())
