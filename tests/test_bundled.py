"""Real behaviour on the bundled SmolLM2-135M-Instruct (fp32, CPU).

Reference directions from 32 built-in pairs (8 more pick the loss layers), a LoRA trained for
10 steps, then measured on 16 held-out pairs with ``evaluate.sweep.held_out_separation``:

* shift = mean (h^c - h^0)·v / s over both members: what the shift term trains. With the
  default loss it must move with the sign of c: shift(+1) > 0 > shift(-1)
  (measured: layer 15 +0.93 / 0 / -1.06, layer 17 +1.40 / 0 / -1.61).
* separation = mean (h_pos - h_neg)·v / s: what the contrast term trains. With the contrast
  term bounded at clamp = 2 it must be ordered sep(+1) > sep(0) > sep(-1) within 10 steps
  (measured: layer 15 0.85 > 0.79 > 0.56). At the default clamp = 1 the base separation
  (~1.1 s_l on training pairs) already sits at the bound, so the +1 side of the contrast has no
  gradient and 10 steps do not order it (0.69 / 0.79 / 0.78); the 50-step main job does
  (+1.37 / +1.02 / -0.92), through the shift term.
  With the shift term alone the separation moves the *other* way (1.00 / 0.79 / 0.58).
"""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from adapters import directions as dirs
from adapters.config import AdapterConfig, DataConfig, DirectionsConfig, LossConfig, TrainConfig
from adapters.data import PairCollator, encode_pairs, load_pairs
from adapters.evaluate.sweep import held_out_separation
from adapters.models import BaseChecksum, base_fingerprint
from adapters.module import ContrastiveModule
from adapters.tuners import attach
from conftest import REPRPO_LOSS

pytestmark = pytest.mark.bundled

STEPS = 10
COEFFS = (-1.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def bundled_directions(bundled):
    model, tok = bundled
    pairs = load_pairs(DataConfig())
    train, dir_val, held_out = pairs[:32], pairs[32:40], pairs[40:56]
    d = dirs.compute(model, tok, train, dir_val, DirectionsConfig(depth=[0.5, 1.0], n_layers=2), 96,
                     base_fingerprint(model))
    assert len(d.selected) == 2
    return train, held_out, d


def train_and_measure(bundled, bundled_directions, loss_cfg: LossConfig) -> dict:
    """Train a LoRA on the shared bundled model, measure held-out projections, take it out again."""
    model, tok = bundled
    train, held_out, d = bundled_directions
    L.seed_everything(0, verbose=False)
    checksum = BaseChecksum(model)
    peft_model, adapter = attach(model, AdapterConfig(depth=[0.4, 0.95]), d)
    try:
        system = ContrastiveModule(peft_model, adapter, d, loss_cfg,
                                   TrainConfig(steps=STEPS, batch_size=4, lr=2e-3, warmup=1), checksum)
        loader = DataLoader(encode_pairs(tok, train, 96), batch_size=4, shuffle=True,
                            collate_fn=PairCollator(tok.pad_token_id),
                            generator=torch.Generator().manual_seed(0))
        L.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                  enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                  ).fit(system, loader)
        rows = held_out_separation(peft_model, tok, held_out, d, 96, coeffs=COEFFS)
        checksum.verify(peft_model, "after training on the bundled model")
    finally:  # the model is shared by the session: take the LoRA layers out again
        adapter.detach()
        peft_model.unload()
    checksum.verify(model, "after unloading the LoRA")
    out = {(r["layer"], r["coeff"]): r for r in rows}
    print(f"\nheld-out projections, loss {loss_cfg}:")
    for l in d.selected:
        print(f"  {l}: separation " + " ".join(f"c={c:+g} {out[l, c]['separation']:+.3f}" for c in COEFFS)
              + " | shift " + " ".join(f"c={c:+g} {out[l, c]['shift']:+.3f}" for c in COEFFS))
    return out


def test_default_loss_shifts_held_out_pairs_both_ways(bundled, bundled_directions):
    d = bundled_directions[2]
    m = train_and_measure(bundled, bundled_directions, REPRPO_LOSS)
    for l in d.selected:
        assert m[l, 0.0]["shift"] == 0.0
        assert m[l, 1.0]["shift"] > 0.25 and m[l, -1.0]["shift"] < -0.25, (l, m[l, 1.0], m[l, -1.0])


def test_contrast_loss_orders_held_out_separation(bundled, bundled_directions):
    d = bundled_directions[2]
    m = train_and_measure(bundled, bundled_directions, dataclasses.replace(REPRPO_LOSS, w_contrast=1.0, clamp=2.0))
    for l in d.selected:
        sep = [m[l, c]["separation"] for c in COEFFS]
        assert sep[2] > sep[1] > sep[0], f"{l}: separation at c=-1, 0, +1 = {sep}"
        assert m[l, 1.0]["shift"] > 0 > m[l, -1.0]["shift"]


KIND_CONFIGS = ["additive", "boft", "oft", "road", "ether", "honesty"]


@pytest.mark.parametrize("name", KIND_CONFIGS)
def test_every_kind_config_fits_the_bundled_model(bundled, name):
    """Each configs/<kind>.yaml attaches to SmolLM2 (block sizes divide its widths), starts at
    the identity, and is a signed function once its parameters move."""
    import copy
    from pathlib import Path

    from adapters.config import load_config
    from adapters.steer import steer
    from conftest import logits, make_batch, randomize

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    model, tok = copy.deepcopy(bundled[0]), bundled[1]  # a private copy: attaching mutates the model
    batch = make_batch(tok, n=2)
    base = logits(model, batch)
    model, adapter = attach(model, cfg.adapter)
    with steer(model, 1.0):  # at init every kind is the identity (LoRA B = 0, v = -u, R = 0 ...)
        torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=1e-4)
    randomize(adapter, std=0.01)
    real = batch["attention_mask"].bool()
    with steer(model, 0.0):
        assert torch.equal(logits(model, batch), base)
    with steer(model, 1.0):
        up = logits(model, batch)[real] - base[real]
    with steer(model, -1.0):
        down = logits(model, batch)[real] - base[real]
    assert up.abs().max() > 1e-3 and torch.isfinite(up).all() and torch.isfinite(down).all()
    assert torch.nn.functional.cosine_similarity(up.flatten(), down.flatten(), dim=0) < -0.5


def test_default_recipe_moves_self_report_both_ways(bundled, bundled_directions):
    """The main job's loss (configs/honesty.yaml), behaviour terms included, trained briefly on
    a few behaviour prompts, moves the self-report probe up at c = +1 and down at c = -1."""
    from pathlib import Path

    from adapters import behaviour as bh
    from adapters.config import BehaviourConfig, EvalConfig, load_config
    from adapters.evaluate.scoring import probe_scores
    from adapters.probes import load_probe

    model, tok = bundled
    train, _, d = bundled_directions
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "honesty.yaml")
    assert cfg.loss.behaviour, "the main job's loss has behaviour terms"
    cfg.behaviour = BehaviourConfig(max_prompts=12, openings=4, max_new_tokens=16)
    cfg.train = TrainConfig(steps=STEPS, batch_size=4, warmup=1)  # prepare readies what these steps draw
    items, neutral = bh.prepare(cfg, model, tok, train, base_fingerprint(model), None, log=lambda *_: None)
    L.seed_everything(0, verbose=False)
    checksum = BaseChecksum(model)
    peft_model, adapter = attach(model, AdapterConfig(depth=[0.4, 0.95]), d)
    try:
        system = ContrastiveModule(peft_model, adapter, d, cfg.loss, cfg.train,
                                   checksum, behaviour=items, neutral=neutral, behaviour_cfg=cfg.behaviour,
                                   pad_id=tok.pad_token_id)
        loader = DataLoader(encode_pairs(tok, train, 96), batch_size=4, shuffle=True,
                            collate_fn=PairCollator(tok.pad_token_id), generator=torch.Generator().manual_seed(0))
        L.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                  enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0).fit(system, loader)
        probe = load_probe("self_report", EvalConfig(self_report="builtin:select"), tok)
        from adapters.evaluate.methods import adapter_method

        m = adapter_method(peft_model, COEFFS)
        y, _ = probe_scores(peft_model, tok, probe, list(COEFFS),
                            ctx=lambda cs: m.ctx(torch.tensor(cs, dtype=torch.float32)))
    finally:
        adapter.detach()
        peft_model.unload()
    checksum.verify(model, "after unloading the LoRA")
    down, zero, up = (float(v) for v in y.mean(1))
    print(f"\nself-report y at c = -1 / 0 / +1: {down:+.2f} / {zero:+.2f} / {up:+.2f}")
    assert up > zero + 0.2 and down < zero - 0.2, (down, zero, up)
