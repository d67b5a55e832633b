"""Resumable training: checkpoints of the adapter, optimiser and data position.

    runs/<name>/checkpoint/
      adapter.safetensors     adapter tensors (header: kind, step, base fingerprint, format version)
      optimizer.safetensors   AdamW state tensors; header: step, param-group settings
      base_cache.safetensors  the base model's per-pair reference computed so far (module.BaseCache)
      state.json              step, epoch, batch in epoch, seed

Written every ``train.checkpoint_every`` steps into a temporary folder that replaces the
previous checkpoint in one rename, so a kill at any moment leaves the last complete
checkpoint. No pickle: safetensors + JSON. ``python train.py --resume runs/<name>`` reloads the
run's config and directions, then this checkpoint, and continues from the same step with
the same data order (``ResumableSampler``) and learning-rate schedule; on CPU the resumed run
ends at the same adapter as an uninterrupted one (tested bit for bit).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from .errors import UserError
from .io import atomic_folder, load_tensors, read_json, recover_folder, save_tensors, write_json

FOLDER = "checkpoint"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed; the message says why."""


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled indices, one seeded permutation per epoch, starting at any (epoch, offset).

    The order depends only on (seed, epoch), so a run resumed at step k sees exactly the
    batches an uninterrupted run sees from step k on. With ``world > 1`` (data-parallel
    training) the epoch's order is cut to whole global batches of ``batch`` samples and rank
    r takes every world-th sample from r: its per-rank batches of batch / world samples
    together make exactly the global batch a single process would see.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0, rank: int = 0, world: int = 1,
                 batch: int = 1):
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self.rank, self.world, self.batch = rank, world, batch

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.offset:].tolist()
        if self.world > 1:
            order = order[: len(order) // self.batch * self.batch][self.rank::self.world]
        return order

    def __len__(self) -> int:
        """A whole epoch's length, whatever the offset: Lightning reads it once as the number of
        batches per epoch (a resumed first epoch just ends early)."""
        return self.n if self.world == 1 else self.n // self.batch * self.batch // self.world

    def __iter__(self):
        order = self._order()
        self.epoch, self.offset = self.epoch + 1, 0
        return iter(order)

    @staticmethod
    def position(step: int, n: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
        """(epoch, sample offset) after ``step`` batches."""
        per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        epoch, batch = divmod(step, max(per_epoch, 1))
        return epoch, batch * batch_size


def save_checkpoint(run_dir: str | Path, step: int, adapter, optimizer, fingerprint: str, seed: int,
                    base_cache: dict[str, torch.Tensor] | None = None) -> Path:
    sd = optimizer.state_dict()  # AdamW: every state value is a tensor (step included)
    tensors = {f"state.{idx}.{key}": torch.as_tensor(val) for idx, st in sd["state"].items() for key, val in st.items()}
    dest = Path(run_dir) / FOLDER
    with atomic_folder(dest) as tmp:
        save_tensors(tmp / "adapter.safetensors", adapter.state_tensors(),
                     {"kind": adapter.kind, "step": step, "fingerprint": fingerprint})
        save_tensors(tmp / "optimizer.safetensors", tensors,
                     {"step": step, "param_groups": sd["param_groups"]})
        save_tensors(tmp / "base_cache.safetensors", base_cache or {}, {"step": step, "fingerprint": fingerprint})
        write_json(tmp / "state.json", {"step": step, "seed": seed,
                                        "kind": adapter.kind, "fingerprint": fingerprint})
    return dest


def interrupted(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume (a checkpoint swap cut short by a kill is
    finished first: the newest complete checkpoint is put in place)."""
    return recover_folder(Path(run_dir) / FOLDER)


def load_checkpoint(run_dir: str | Path, adapter, fingerprint: str) -> tuple[int, dict, dict]:
    """Load the adapter tensors into ``adapter``; return (step, optimizer state_dict 'state',
    base-cache tensors)."""
    folder = Path(run_dir) / FOLDER
    recover_folder(folder)
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{folder} holds no checkpoint (state.json missing): the run stopped before its "
                              "first checkpoint; start it again (train.checkpoint_every sets the interval)")
    state = read_json(folder / "state.json")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{folder} belongs to a different base model (fingerprint {state.get('fingerprint')}, "
                              f"this model {fingerprint})")
    if state.get("kind") != adapter.kind:
        raise CheckpointError(f"{folder} holds a {state.get('kind')!r} adapter, the run's config a {adapter.kind!r}")
    tensors, _ = load_tensors(folder / "adapter.safetensors")
    opt_state: dict[int, dict] = {}
    for key, t in load_tensors(folder / "optimizer.safetensors")[0].items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = t
    cache = load_tensors(folder / "base_cache.safetensors")[0] if (folder / "base_cache.safetensors").is_file() else {}
    for what, group in (("adapter", tensors), ("optimizer state", {f"{i}.{k}": t for i, st in opt_state.items()
                                                                   for k, t in st.items()}), ("base cache", cache)):
        bad = [k for k, t in group.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"{folder}: its {what} holds non-finite values ({', '.join(bad[:3])}); the "
                                  "checkpoint is damaged: start the run again with --overwrite")
    adapter.load_state_tensors(tensors)  # only once everything is known to be finite
    return int(state["step"]), opt_state, cache


class CheckpointCallback(L.Callback):
    """Every ``every`` optimiser steps (counted from the run's start, resumed runs included)."""

    def __init__(self, run_dir: Path, every: int, total: int, fingerprint: str, seed: int):
        self.run_dir, self.every, self.total = Path(run_dir), every, total
        self.fingerprint, self.seed = fingerprint, seed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.start_step + trainer.global_step
        if trainer.is_global_zero and self.every and step % self.every == 0 and 0 < step <= self.total:
            save_checkpoint(self.run_dir, step, pl_module.adapter, trainer.optimizers[0], self.fingerprint, self.seed,
                            pl_module.base_cache.state_tensors())


__all__ = ["CheckpointCallback", "CheckpointError", "ResumableSampler", "interrupted", "load_checkpoint",
           "save_checkpoint"]
