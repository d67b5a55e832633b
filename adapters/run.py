"""Run folders: save an adapter with its base model's fingerprint, and load a run back.

    runs/<name>/
      config.yaml                  resolved config (reloads to the same Config)
      directions.safetensors/.json reference directions, scales, stats, selected loss layers
      adapter.safetensors          adapter tensors; header: kind, adapter config, fingerprint, base-weight digests, content hash
      completions.jsonl            the behaviour targets' completions
      report.md/.csv/.json/.png    evaluation (report_rows.csv: one row per item), timing.json
      eval/                        reports of `python -m adapters eval`
      wandb/                       the wandb run (offline by default: `wandb sync` it later)
      checkpoint/                  while training (removed once adapter.safetensors is saved)

A run folder belongs to one process at a time (``RunLock``), and a new run never writes into
a folder that holds another run's files unless told to (``train.py --overwrite``, which
clears them first: ``clear_run``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from .config import AdditiveOptions, adapter_from_saved
from .errors import UserError
from .io import load_tensors, save_tensors, tensors_digest
from .models import base_fingerprint, base_weights, weights_differ
from .tuners import attach


class RunError(UserError):
    pass


# everything train.py and `eval` write into a run folder; the adapter first, so that a kill while
# clearing never leaves a folder that looks finished
RUN_FILES = ("adapter.safetensors", "config.yaml", "directions.safetensors", "directions.json", "completions.jsonl",
             "report.md", "report.csv", "report_rows.csv", "report.json", "report.png", "timing.json", "README.md")
RUN_FOLDERS = ("checkpoint", "eval", "wandb")


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
"""A Hugging Face Hub model repo id, optionally at a revision: ``user/name`` or ``user/name@rev``."""


def resolve(source: str | Path) -> Path:
    """The run folder at ``source``: a folder on disk, or a Hub repo id (``user/name[@revision]``, a
    string whose first part is no folder here), which ``huggingface_hub.snapshot_download``
    brings into the Hugging Face cache (with ``HF_HUB_OFFLINE=1`` from that cache alone)."""
    path = Path(source).expanduser()
    if path.exists() or not isinstance(source, str) or not HUB_REPO.fullmatch(source) or Path(path.parts[0]).is_dir():
        return path  # on disk, or meant to be (runs/<name> where runs/ is here): never sent to the Hub
    from huggingface_hub import snapshot_download

    repo, _, revision = str(source).partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, repo_type="model"))
    except Exception as e:  # offline and not cached, no such repo, no access, no network: all the user's to fix
        raise RunError(f"{source} is neither a folder here nor a Hub repo that can be fetched "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def is_finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run (its config and saved adapter)."""
    return (folder / "config.yaml").is_file() and (folder / "adapter.safetensors").is_file()


def run_files(folder: str | Path) -> list[Path]:
    """The run files (and folders) present in ``folder``, hidden checkpoint leftovers included."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    named = [folder / n for n in RUN_FILES + RUN_FOLDERS if (folder / n).exists()]
    return named + sorted(p for p in folder.glob(".checkpoint.*"))


def clear_run(folder: str | Path) -> list[Path]:
    """Delete a run's own files from ``folder`` (the adapter first); anything else in it stays."""
    import shutil

    gone = run_files(folder)
    for p in gone:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return gone


class RunLock:
    """An exclusive lock on a run folder for the life of a process (``with RunLock(folder):``).

    The lock file sits beside the folder (``runs/.<name>.lock``, holding the owner's PID), so a
    start that fails before writing anything leaves no run folder. A second process that asks
    for the same folder fails at once with RunError; the lock dies with its process (flock)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder.with_name(f".{self.folder.name}.lock")
        self.fd: int | None = None
        self.made: list[Path] = []

    def __enter__(self) -> "RunLock":
        import fcntl
        import os

        if not self.folder.name or self.folder.name in (".", ".."):
            raise RunError(f"{self.folder} cannot be a run folder; name it (log.name)")
        self.made = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create the runs folder {self.path.parent}: {e.strerror} "
                           "(log.runs_dir must be a writable folder)") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunError(f"cannot lock {self.folder} ({self.path}: {e.strerror}); "
                               "log.runs_dir must be a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunError(f"{self.folder} is in use by another process (pid {owner}, lock {self.path}); "
                               "wait for it to finish, or choose another log.name") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous owner removed the file as we opened it: take the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            for folder in self.made:  # a start that wrote nothing leaves no runs folder behind
                try:
                    folder.rmdir()
                except OSError:  # not empty (the run wrote into it) or gone: keep it
                    break


def save_adapter(folder: str | Path, adapter, fingerprint: str) -> Path:
    path = Path(folder) / "adapter.safetensors"
    tensors = adapter.state_tensors()
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RunError(f"the adapter has non-finite values in {bad[:3]}; it is not saved")
    meta = {"kind": adapter.kind, "adapter": dataclasses.asdict(adapter.config), "fingerprint": fingerprint,
            "base_weights": base_weights(adapter.model), "sha256": tensors_digest(tensors)}
    save_tensors(path, tensors, meta)
    return path


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(tensors, meta) of a saved adapter, its content hash and finiteness checked."""
    tensors, meta = load_tensors(path)
    want = meta.get("sha256")
    if want is not None and tensors_digest(tensors) != want:  # files from before the hash have none
        raise RunError(f"{path} is damaged: its tensors do not match the content hash saved with them; "
                       "restore the file or train the run again")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RunError(f"{path} holds non-finite values (in {', '.join(bad[:3])}); the file is damaged")
    return tensors, meta


def load_adapter(model, path: str | Path, directions=None):
    """Attach the adapter saved at ``path`` to ``model``; refuse a different base model."""
    tensors, meta = read_adapter(path)
    have = base_fingerprint(model)
    if meta.get("fingerprint") != have:
        raise RunError(f"{path} was trained on a different base model (fingerprint {meta.get('fingerprint')}, "
                       f"this model {have}); load it onto the base model named in its run's config.yaml")
    saved = meta.get("base_weights")  # files from before the full digest have none
    differ = weights_differ(saved, base_weights(model)) if isinstance(saved, dict) else None
    if differ:
        raise RunError(f"{path} was trained on other base weights: {len(differ)} base tensors differ "
                       f"({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}) though the model's "
                       "config, embeddings and norms match (a fine-tune of the same model?); load it onto "
                       "the exact base model named in its run's config.yaml")
    try:
        adapter_cfg = adapter_from_saved(meta["adapter"])
    except Exception as e:  # a header edited by hand: missing, unknown or invalid adapter settings
        raise RunError(f"{path}: the adapter settings in its header are damaged ({e})") from None
    # the saved tensors replace whatever attach initialises, so loading never needs the
    # directions (an additive adapter trained with init=directions is attached with zeros)
    model, adapter = attach(model, dataclasses.replace(adapter_cfg, additive=AdditiveOptions("zeros")), directions)
    adapter.config = adapter_cfg
    adapter.load_state_tensors(tensors)
    return model, adapter
