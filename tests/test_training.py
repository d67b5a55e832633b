"""Lightning training on the tiny model: only adapter parameters change, base weights stay
bit-identical, and a write to a base weight during fit is caught and named."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from adapters import hidden
from adapters.config import LossConfig, TrainConfig
from adapters.data import PairCollator, encode_pairs
from adapters.models import BaseChecksum, BaseModelChanged
from adapters.module import ContrastiveModule
from adapters.tuners import KINDS, attach
from conftest import base_clone, make_pairs, tiny_adapter_cfg

ALL_KINDS = pytest.mark.parametrize("kind", sorted(KINDS))


def setup_system(tiny, directions, kind, **train_kw):
    model, tok = tiny
    checksum = BaseChecksum(model)
    # adapters only up to the last loss layer (layer 2 of 4): one after it gets no gradient from the
    # projection terms, and none from the NLL barrier while the barrier is inside its margin
    model, adapter = attach(model, tiny_adapter_cfg(kind, depth=[0.0, 0.75]), directions)
    train_cfg = TrainConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 0, **train_kw})
    system = ContrastiveModule(model, adapter, directions, LossConfig(w_contrast=0.5), train_cfg, checksum)
    collate = PairCollator(tok.pad_token_id)
    train = DataLoader(encode_pairs(tok, make_pairs(16), 96), batch_size=4, shuffle=True, collate_fn=collate)
    val = DataLoader(encode_pairs(tok, make_pairs(4, start=16), 96), batch_size=4, collate_fn=collate)
    return model, adapter, system, train, val


def trainer(**kw):
    kw = {"max_steps": 3, "logger": False, "enable_checkpointing": False, "accelerator": "cpu", "devices": 1,
          "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(**kw)


@ALL_KINDS
def test_only_adapter_parameters_change(tiny, tiny_directions, kind):
    model, adapter, system, train, _ = setup_system(tiny, tiny_directions, kind)
    base_before = base_clone(model)
    adapter_before = [p.detach().clone() for p in adapter.trainable_parameters()]
    assert adapter_before

    opt = system.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in adapter.trainable_parameters()}

    t = trainer()
    t.fit(system, train)
    assert t.global_step == 3

    base_after = base_clone(model)
    assert base_after.keys() == base_before.keys()
    for name, before in base_before.items():
        assert torch.equal(base_after[name], before), f"base tensor {name} changed during training"
    for p, before in zip(adapter.trainable_parameters(), adapter_before):
        assert not torch.equal(p.detach(), before), "an adapter parameter did not train"
        assert torch.isfinite(p).all()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert any(p is q for q in adapter.trainable_parameters()), f"{name} is trainable"


@ALL_KINDS
def test_step_terms_are_finite_and_named(tiny, tiny_directions, kind):
    model, adapter, system, train, _ = setup_system(tiny, tiny_directions, kind)
    terms = system.step_terms(next(iter(train)))
    for name, value in terms.items():
        assert torch.isfinite(value).all(), name
    for term in ("contrast", "shift", "nll_barrier"):  # each loss term is reported on its own
        assert any(term in key for key in terms), f"no {term} term among {sorted(terms)}"
    assert terms["loss"].requires_grad
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.trainable_parameters())


class PlantBaseChange(L.Callback):
    """Writes to a frozen base weight after the first training batch."""

    def __init__(self, model):
        self.weight = hidden.get_module(model, "model.layers.1.mlp.up_proj").weight
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.batches == 1:
            with torch.no_grad():
                self.weight[3, 5] += 1e-3


@ALL_KINDS
def test_base_change_during_fit_is_caught(tiny, tiny_directions, kind):
    model, adapter, system, train, _ = setup_system(tiny, tiny_directions, kind)
    plant = PlantBaseChange(model)
    with pytest.raises(BaseModelChanged, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        trainer(callbacks=[plant]).fit(system, train)


def test_base_change_caught_at_the_next_validation(tiny, tiny_directions):
    model, adapter, system, train, val = setup_system(tiny, tiny_directions, "lora")
    plant = PlantBaseChange(model)
    t = trainer(max_steps=6, callbacks=[plant], val_check_interval=1, check_val_every_n_epoch=None)
    with pytest.raises(BaseModelChanged, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        t.fit(system, train, val)
    assert plant.batches == 1, "training went on after the base model changed"
