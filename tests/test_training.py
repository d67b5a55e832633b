"""Lightning training on the tiny model: only adapter parameters change, base weights stay
bit-identical, and a write to a base weight during fit is caught and named."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from adapters import hidden
from adapters.config import TrainConfig
from adapters.data import PairCollator, encode_pairs
from adapters.models import BaseChecksum, BaseModelChanged
from adapters.module import ContrastiveModule
from adapters.tuners import KINDS, attach
from conftest import REPRPO_LOSS, base_clone, make_pairs, tiny_adapter_cfg

ALL_KINDS = pytest.mark.parametrize("kind", sorted(KINDS))


def setup_system(tiny, directions, kind, depth=(0.0, 0.75), **train_kw):
    model, tok = tiny
    checksum = BaseChecksum(model)
    # adapters only up to the last loss layer (layer 2 of 4): one after it gets no gradient from the
    # projection terms, and none from the NLL barrier while the barrier is inside its margin
    model, adapter = attach(model, tiny_adapter_cfg(kind, depth=list(depth)), directions)
    train_cfg = TrainConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 0, **train_kw})
    system = ContrastiveModule(model, adapter, directions, dataclasses.replace(REPRPO_LOSS, w_contrast=0.5), train_cfg, checksum)
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


def _base_forwards(system, monkeypatch) -> list:
    calls, forward = [], system._forward

    def counting(batch, c):
        if not torch.is_tensor(c) and c == 0.0:
            calls.append(batch["input_ids"].shape[0])
        return forward(batch, c)

    monkeypatch.setattr(system, "_forward", counting)
    return calls


def test_the_base_reference_is_computed_once_per_pair(tiny, tiny_directions, monkeypatch):
    _, _, system, train, _ = setup_system(tiny, tiny_directions, "lora")
    batch = next(iter(train))
    calls = _base_forwards(system, monkeypatch)
    first = system.step_terms(batch)
    assert calls == [8]  # one no-grad base pass over the 4 pairs
    again = system.step_terms(batch)
    assert calls == [8], "a cached pair went through the base model again"
    assert torch.equal(first["loss"], again["loss"])
    # a batch with two known and two new pairs: only the new ones go through the base model
    other = next(b for b in train if len(set(b["index"].tolist()) & set(batch["index"].tolist())) < 4)
    system.step_terms(other)
    assert calls[1] == 2 * len(set(other["index"].tolist()) - set(batch["index"].tolist()))


def test_the_cached_reference_is_the_base_model(tiny, tiny_directions):
    _, _, system, train, _ = setup_system(tiny, tiny_directions, "ether")
    batch = next(iter(train))
    p_base = assert_reference_is_a_fresh_base_pass(system, batch)
    mask = batch["suffix_mask"].bool()
    assert all((p_base[l][~mask] == 0).all() for l in system.layers)


def assert_reference_is_a_fresh_base_pass(system, batch) -> dict:
    from adapters.loss import project

    p_base, nll_base = system.base_reference(batch)
    with torch.no_grad():
        h, nll = system._forward(batch, 0.0)
    mask = batch["suffix_mask"].bool()
    for l in system.layers:
        want = project(h[l], system.vectors[l], system.scale[l])
        torch.testing.assert_close(p_base[l][mask], want[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nll_base[mask], nll[mask], atol=1e-5, rtol=1e-5)
    return p_base


# prefix: the decoder layers run once per row (the loss layers are 1 and 2: none when the adapter
# starts at layer 0, or above loss layer 1)
@pytest.mark.parametrize("kind,depth,prefix", [("lora", (0.0, 0.75), 0), ("additive", (0.0, 0.75), 0),
                                               ("road", (0.0, 0.75), 0), ("lora", (0.25, 0.75), 1),
                                               ("additive", (0.25, 0.75), 1), ("lora", (0.5, 0.75), 0)])
def test_both_signs_in_one_pass_equal_two_passes(tiny, tiny_directions, kind, depth, prefix):
    """The batched pass (per-example kinds: each row at +|c| and -|c| side by side, the decoder
    layers below the first adapted one run once per row) equals a plain pass per sign."""
    from conftest import randomize

    _, adapter, system, train, _ = setup_system(tiny, tiny_directions, kind, depth)
    assert system.layers == ["model.layers.1", "model.layers.2"] and system.prefix == prefix
    randomize(adapter, std=0.2)
    batch = next(iter(train))
    B = batch["index"].numel()
    # per-pair magnitudes (one value for a kind without per-example coefficients)
    mags = torch.tensor([0.5, 2.0, 1.0, 1.5] * B)[:B] if adapter.per_example else torch.full((B,), 1.5)
    got = system.policy_passes(batch, mags)
    for c in (1.0, -1.0):
        rows = c * torch.cat([mags, mags])  # each pair's two members at the pair's signed coefficient
        h, nll = system._forward(batch, rows if adapter.per_example else float(rows[0]))
        for l in system.layers:
            torch.testing.assert_close(got[c][0][l], h[l], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[c][1], nll, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[c][2], c * mags)
    assert not torch.allclose(got[1.0][1], got[-1.0][1]), "the two signs gave the same pass"


@pytest.mark.parametrize("kind,depth", [("lora", (0.25, 0.75)), ("additive", (0.25, 0.75)), ("road", (0.0, 0.75))])
def test_validation_equals_one_plain_pass_per_coefficient_and_runs_the_base_once(tiny, tiny_directions, kind, depth,
                                                                                   monkeypatch):
    """What validation logs (last-token separation per layer at 0 / -1 / +1, suffix ΔNLL at ±1)
    equals a plain pass per coefficient, with -1 and +1 in one pass where the kind takes per-row
    coefficients; the base pass (c = 0) runs at the first validation only."""
    from conftest import randomize

    _, adapter, system, train, val = setup_system(tiny, tiny_directions, kind, depth)
    randomize(adapter, std=0.2)
    batches = [next(iter(val)), next(iter(train))]  # two batches: each keeps its own base pass
    wants = [_plain_validation(system, b) for b in batches]
    got, calls = {}, []
    monkeypatch.setattr(system, "log", lambda name, value, **kw: got.__setitem__(name, value))
    forward = system._forward
    monkeypatch.setattr(system, "_forward", lambda b, c: calls.append(c) or forward(b, c))
    for _ in range(2):
        for batch, want in zip(batches, wants):
            got.clear()
            system.validation_step(batch, 0)
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-5)
    zeros = [c for c in calls if isinstance(c, float) and c == 0.0]
    assert len(zeros) == 2, calls  # each batch's base pass once, at the first validation
    assert len(calls) == 2 * (3 if adapter.per_example else 5), calls


def _plain_validation(system, batch) -> dict:
    from adapters.loss import masked_mean

    want = {}
    with torch.no_grad():
        h0, nll0 = system._forward(batch, 0.0)
        for c in (0.0, -1.0, 1.0):
            h, nll = system._forward(batch, c) if c else (h0, nll0)
            for l in system.layers:
                pos, neg = h[l][:, -1].chunk(2)
                want[f"val/sep@{c:+g}/{l}"] = (((pos - neg) @ system.vectors[l]) / system.scale[l]).mean()
            if c:
                want[f"val/dnll@{c:+g}"] = masked_mean(nll - nll0, batch["suffix_mask"], (0, 1))
    return want


@pytest.mark.parametrize("kind", [k for k, cls in KINDS.items() if cls.per_example])
def test_the_shared_prefix_gives_the_full_forwards_loss_and_gradients(tiny, tiny_directions, kind, monkeypatch):
    """The kinds that share a prefix (per-example: a row's two signs in one pass; the others run one
    pass per sign and share nothing), adapted from layer 1 up: the step's loss and every adapter
    gradient equal those of the unshared pass (fp32)."""
    from conftest import randomize

    from adapters.module import ContrastiveModule

    _, adapter, system, train, _ = setup_system(tiny, tiny_directions, kind, depth=(0.25, 0.75))
    assert system.prefix == 1
    randomize(adapter, std=0.2)
    batch = next(iter(train))
    params = adapter.trainable_parameters()

    def loss_and_grads():
        for p in params:
            p.grad = None
        loss = system.step_terms(batch, step=0)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    shared, shared_grads = loss_and_grads()
    monkeypatch.setattr(ContrastiveModule, "prefix", property(lambda self: 0))
    full, full_grads = loss_and_grads()
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().max()) > 0 for g in full_grads), "no gradient reached the adapter"


def test_the_base_cache_survives_a_checkpoint(tiny, tiny_directions, tmp_path):
    from adapters.checkpoint import load_checkpoint, save_checkpoint

    _, adapter, system, train, _ = setup_system(tiny, tiny_directions, "lora")
    batch = next(iter(train))
    system.base_reference(batch)
    opt = system.configure_optimizers()["optimizer"]
    save_checkpoint(tmp_path, 1, adapter, opt, "fp", 0, system.base_cache.state_tensors())
    _, _, cache = load_checkpoint(tmp_path, adapter, "fp")
    restored = ContrastiveModule(system.model, adapter, tiny_directions, system.loss_cfg, system.train_cfg,
                                 system.checksum, base_cache=cache)
    assert set(restored.base_cache.entries) == set(batch["index"].tolist())
    a, b = system.base_reference(batch), restored.base_reference(batch)
    assert all(torch.equal(a[0][l], b[0][l]) for l in system.layers) and torch.equal(a[1], b[1])


def test_cached_references_fit_any_later_batch(tiny, tiny_directions):
    """Pairs cached in one batch, then assembled at another width and row order, equal a fresh
    base pass over the new batch (right alignment, row placement)."""
    model, adapter, system, _, _ = setup_system(tiny, tiny_directions, "lora")
    tok = tiny[1]
    enc = encode_pairs(tok, make_pairs(6), 96)
    collate = PairCollator(tok.pad_token_id)
    system.base_reference(collate([enc[4], enc[1]]))
    later = collate([enc[0], enc[1], enc[5], enc[4]])
    assert later["input_ids"].shape[1] != collate([enc[4], enc[1]])["input_ids"].shape[1]
    assert_reference_is_a_fresh_base_pass(system, later)
