"""The base-weights checksum, proven at every point where the base could be mutated: a single
element changed (by one ulp) in each kind of base tensor is caught, with the tensor named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import adapters.directions
import adapters.evaluate.sweep
import adapters.run
from adapters import hidden
from adapters.models import BaseModelChanged
from adapters.module import ContrastiveModule
from adapters import pipeline
from conftest import tiny_config


def bump(model, name: str) -> None:
    """Change one element of base tensor ``name`` by one ulp, in place."""
    with torch.no_grad():
        flat = hidden.base_model_of(model).get_parameter(name).view(-1)
        flat[7] = torch.nextafter(flat[7], flat[7] + 1)


def patch_after(monkeypatch, owner, attr, name, model_arg=0, on_call=1):
    orig = getattr(owner, attr)
    calls = []

    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append(1)
        if len(calls) == on_call:
            bump(args[model_arg] if not callable(model_arg) else model_arg(args), name)
        return out

    monkeypatch.setattr(owner, attr, wrapper)


POINTS = {
    # point: (what to patch, base tensor changed there, where it is caught)
    "direction extraction": ("model.embed_tokens.weight", "after computing directions"),
    "training step": ("model.layers.1.self_attn.q_proj.weight", "validation at step"),
    "evaluation": ("model.layers.2.mlp.up_proj.weight", "after evaluation"),
    "save": ("model.layers.0.input_layernorm.weight", "after saving"),
    "load": ("model.norm.weight", "after loading the adapter"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_one_changed_element_is_caught_and_named(point, tiny_dir, tmp_path, monkeypatch):
    tensor, when = POINTS[point]
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["train"].update(steps=4, val_every=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if point == "load":  # a clean run first, then the adapter loading mutates the base
        run = Path(pipeline.main(["--config", str(path)]))
        patch_after(monkeypatch, adapters.run, "load_adapter", tensor)
        with pytest.raises(BaseModelChanged) as err:
            pipeline.load_run(run, device="cpu")
    else:
        if point == "direction extraction":
            patch_after(monkeypatch, adapters.directions, "compute", tensor)
        elif point == "training step":  # after the first optimiser step (in the step, autograd would object)
            patch_after(monkeypatch, ContrastiveModule, "on_train_batch_end", tensor, model_arg=lambda a: a[0].model)
        elif point == "evaluation":
            patch_after(monkeypatch, adapters.evaluate.sweep, "evaluate_run", tensor)
        else:
            patch_after(monkeypatch, adapters.run, "save_adapter", tensor, model_arg=lambda a: a[1].model)
        with pytest.raises(BaseModelChanged) as err:
            pipeline.main(["--config", str(path)])
    msg = str(err.value)
    assert f"changed: {tensor}" in msg and when in msg, msg
