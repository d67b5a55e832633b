"""Run folders: save an adapter with its base model's fingerprint, and load a run back.

    runs/<name>/
      config.yaml                  resolved config (reloads to the same Config)
      directions.safetensors/.json reference directions, scales, stats, selected loss layers
      adapter.safetensors          adapter tensors; header: kind, adapter config, fingerprint
      report.md/.csv/.json/.png    evaluation
      wandb/                       the wandb run (offline by default: `wandb sync` it later)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import AdapterConfig, Config, load_config
from .io import load_tensors, save_tensors
from .models import BaseChecksum, base_fingerprint, load_base
from .tuners import attach


class RunError(ValueError):
    pass


def save_adapter(folder: str | Path, adapter, fingerprint: str) -> Path:
    path = Path(folder) / "adapter.safetensors"
    meta = {"kind": adapter.kind, "adapter": dataclasses.asdict(adapter.cfg), "fingerprint": fingerprint}
    save_tensors(path, adapter.state_tensors(), meta)
    return path


def load_adapter(model, path: str | Path, directions=None):
    """Attach the adapter saved at ``path`` to ``model``; refuse a different base model."""
    tensors, meta = load_tensors(path)
    have = base_fingerprint(model)
    if meta.get("fingerprint") != have:
        raise RunError(f"{path} was trained on a different base model (fingerprint {meta.get('fingerprint')}, "
                       f"this model {have}); load it onto the base model named in its run's config.yaml")
    cfg = AdapterConfig(**meta["adapter"])
    # the saved tensors replace whatever attach initialises, so loading never needs the
    # directions (init=directions used to make load_run fail for such additive adapters)
    model, adapter = attach(model, dataclasses.replace(cfg, init="zeros"), directions)
    adapter.cfg = cfg
    adapter.load_state_tensors(tensors)
    return model, adapter


def load_run(folder: str | Path, device: str = "auto", dtype: str | None = None):
    """(model, tokenizer) = base model + the run's adapter, fingerprint checked.

        model, tokenizer = load_run("runs/honesty")
        with steer(model, -1.0):
            model.generate(...)
    """
    folder = Path(folder)
    if not (folder / "config.yaml").is_file() or not (folder / "adapter.safetensors").is_file():
        raise RunError(f"{folder} is not a finished run folder (needs config.yaml and adapter.safetensors)")
    cfg: Config = load_config(folder / "config.yaml")
    model, tok = load_base(cfg.model.name, dtype or cfg.model.dtype, device, cfg.model.quantization)
    checksum = BaseChecksum(model)
    model, adapter = load_adapter(model, folder / "adapter.safetensors")
    checksum.verify(model, "after loading the adapter")
    model.__dict__["_base_checksum"] = checksum
    return model, tok
