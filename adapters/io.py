"""Run-folder files, written atomically (temp file + rename), never pickled."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: str | Path, folder: bool = False) -> None:
    """mkstemp / mkdtemp create private (0600 / 0700) entries; give them the usual mode."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        _publishable(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: dict) -> None:
    """JSON with the format version first, written atomically."""
    obj = {"format_version": FORMAT_VERSION, **{k: v for k, v in obj.items() if k != "format_version"}}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


class FormatVersionError(ValueError):
    """A file written by an incompatible version of contrastive-adapters."""


def check_version(path: str | Path, version) -> None:
    if version != FORMAT_VERSION:
        raise FormatVersionError(f"{path} has format version {version!r}; this version of contrastive-adapters "
                                 f"reads version {FORMAT_VERSION}. Re-create it with this version (or use the "
                                 "version that wrote it).")


def read_json(path: str | Path) -> dict:
    """A JSON file written by ``write_json``; refuses damaged files and other format versions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object; the file is damaged")
    check_version(path, obj.get("format_version"))
    return obj


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """safetensors with a JSON `meta` (format version added) in the header, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(flat, tmp, metadata={"meta": json.dumps({"format_version": FORMAT_VERSION, **meta})})
        _publishable(tmp)  # after save_file, which recreates the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its header is damaged (the meta field is not JSON)") from None
    check_version(path, meta.get("format_version"))
    return load_file(str(path)), meta


@contextlib.contextmanager
def atomic_folder(dest: str | Path):
    """Yield a temporary folder next to ``dest``; on success it replaces ``dest`` in one rename
    (an old ``dest`` is moved aside first and removed after), on failure it is deleted. A crash
    at any point leaves either the old folder or the new one, never a half-written one.
    One writer per ``dest``: temporary folders of an earlier, killed writer are removed."""
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp.*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp.", dir=dest.parent))
    _publishable(tmp, folder=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
