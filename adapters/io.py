"""Run-folder files, written atomically (temp file + rename), never pickled."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: str | Path, folder: bool = False) -> None:
    """mkstemp / mkdtemp create private (0600 / 0700) entries; give them the usual mode."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in folder ``path`` durable (no-op where folders cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: dict) -> None:
    """JSON with the format version first, written atomically."""
    obj = {"format_version": FORMAT_VERSION, **{k: v for k, v in obj.items() if k != "format_version"}}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


class DamagedFileError(UserError):
    """A file of ours that cannot be read back (not JSON, not safetensors, a damaged header)."""


class FormatVersionError(UserError):
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
        raise DamagedFileError(f"{path} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path}: expected a JSON object; the file is damaged")
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
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error type: truncated, garbled or not safetensors at all
        raise DamagedFileError(f"{path} is damaged or not a safetensors file ({e}); restore it or re-create it") from None
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise DamagedFileError(f"{path}: its header is damaged (the meta field is not JSON)") from None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path}: its header is damaged (the meta field is not a JSON object)")
    check_version(path, meta.get("format_version"))
    return tensors, meta


COMPLETE = ".complete"
"""Marker written last into a finished temporary folder: a swap cut short can be finished from it."""


def recover_folder(dest: str | Path) -> bool:
    """Finish a folder swap of ``atomic_folder`` that a kill interrupted, and remove its leftovers.

    A kill between the swap's two renames leaves no ``dest`` but the old folder (``.dest.old``)
    and the new, complete one (``.dest.tmp.*`` holding the ``.complete`` marker): the newest
    complete folder becomes ``dest`` (else the old one). Temporary folders without the marker
    are half-written and removed. Returns whether ``dest`` exists afterwards."""
    import shutil

    dest = Path(dest)
    tmps = [p for p in dest.parent.glob(f".{dest.name}.tmp.*") if p.is_dir()]
    old = dest.with_name(f".{dest.name}.old")
    if not dest.exists():
        done = sorted((p for p in tmps if (p / COMPLETE).is_file()), key=lambda p: p.stat().st_mtime)
        if done:
            os.rename(done[-1], dest)
            tmps.remove(done[-1])
        elif old.is_dir():
            os.rename(old, dest)
        fsync_dir(dest.parent)
    if dest.is_dir():
        (dest / COMPLETE).unlink(missing_ok=True)
    for stale in tmps:
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return dest.exists()


@contextlib.contextmanager
def atomic_folder(dest: str | Path):
    """Yield a temporary folder next to ``dest``; on success it replaces ``dest`` (an old
    ``dest`` is moved aside first and removed after), on failure it is deleted. A kill at any
    point leaves the old folder or the new one, never a half-written one: between the two
    renames both are complete, and ``recover_folder`` (run here first, and by readers such as
    the checkpoint loader) puts the new one in place. One writer per ``dest``."""
    import shutil

    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is a file, not a folder; give a folder path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp.", dir=dest.parent))
    _publishable(tmp, folder=True)
    try:
        yield tmp
        (tmp / COMPLETE).write_bytes(b"")
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    (dest / COMPLETE).unlink()
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- user tables

TABLE_TYPES = (".jsonl", ".csv")


class RowsError(UserError):
    """A user's .jsonl / .csv file that cannot be read as rows; the message names file:line."""


def read_rows(path: str | Path, what: str = "file", columns: tuple[str, ...] = ()) -> list[tuple[str, dict, str]]:
    """[(where, row, shown)] from a user's .jsonl or .csv file: where = 'file:line' for error
    messages, shown = the raw line / row. A .csv (UTF-8, with or without a byte-order mark as
    spreadsheet programs write it) must have every name in ``columns`` in its header; its empty
    cells are left out of the row (an empty cell = a missing field). No rows is not an error
    here: the caller says what an empty file means."""
    import csv
    import io as _io

    path = Path(path)
    kind = path.suffix.lower()
    if path.is_dir():
        raise RowsError(f"{what} {path} is a folder; give a .jsonl or .csv file")
    if not path.is_file():
        raise RowsError(f"{what} {path} does not exist")
    if kind not in TABLE_TYPES:
        raise RowsError(f"{what} {path}: unsupported file type {path.suffix or '(no extension)'!r}; use one of "
                        f"{list(TABLE_TYPES)} (same field names in both)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RowsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    fields = f" with the fields {list(columns)}" if columns else ""
    rows = []
    if kind == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise RowsError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')}); each "
                                f"line must be one JSON object{fields}") from None
            if not isinstance(row, dict):
                raise RowsError(f"{path}:{i}: expected a JSON object{fields}, got {line[:80]!r}")
            rows.append((f"{path}:{i}", row, line))
        return rows
    reader = csv.DictReader(_io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
        if header is None:
            raise RowsError(f"{path}: empty CSV file; the first line must be a header with the columns "
                            f"{list(columns) or 'of your fields'}")
        reader.fieldnames = header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise RowsError(f"{path}:1: the header has no {missing} column(s) (columns: {header}); "
                            f"it needs {list(columns)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise RowsError(f"{where}: more values than header columns {header}")
            rows.append((where, {k: v for k, v in row.items() if v not in (None, "")}, str(row)))
    except csv.Error as e:
        raise RowsError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows
