"""Peer baselines (repeng, steering-vectors): trained by their own code on our pairs, they leave
the model untouched, and our sweep applies their vectors exactly as the libraries do."""

from __future__ import annotations

import builtins

import pytest
import torch

from adapters import peers
from adapters.evaluate import Method
from adapters.models import BaseChecksum
from conftest import logits, make_batch, make_pairs


@pytest.fixture(scope="module")
def trained(tiny_dir):
    from adapters import models

    model, tok = models.load_base(tiny_dir, dtype="float32", device="cpu")
    names = [n for n, _ in model.named_modules()]
    hooks_before = {h.__qualname__ for h in _hooks(model)}
    checksum = BaseChecksum(model)
    batch = make_batch(tok, 3, start=40)
    before = logits(model, batch)
    methods = {name: peers.peer_method(name, model, tok, make_pairs(12), [-1.0, 0.0, 1.0]) for name in peers.PEERS}
    return model, tok, names, checksum, batch, before, methods, hooks_before


def _hooks(model):
    return [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]


def test_training_leaves_the_model_untouched(trained):
    model, _, names, checksum, batch, before, _, hooks_before = trained
    assert [n for n, _ in model.named_modules()] == names
    checksum.verify(model, "after the peers")
    assert torch.equal(logits(model, batch), before)
    new = {h.__qualname__ for h in _hooks(model)} - hooks_before
    assert new <= {"install_output_capuring_hook.<locals>.output_capturing_hook"}  # transformers' own, inert


@pytest.mark.parametrize("name", peers.PEERS)
def test_zero_is_the_base_and_the_sign_flips_the_move(trained, name):
    model, _, _, _, batch, before, methods, _ = trained
    m: Method = methods[name]
    assert m.per_example
    with m.ctx(0.0):
        assert torch.equal(logits(model, batch), before)
    with m.ctx(0.05):
        up = logits(model, batch)
    with m.ctx(-0.05):
        down = logits(model, batch)
    assert not torch.allclose(up, before)
    real = batch["attention_mask"].bool()  # padding positions are never read
    cos = torch.nn.functional.cosine_similarity((up - before)[real].flatten(), (down - before)[real].flatten(), 0)
    assert cos < -0.9  # a small +c and -c move the output in opposite directions


def test_repeng_application_matches_repeng(trained):
    model, tok, _, _, batch, _, methods, _ = trained
    repeng = peers._import("repeng")
    vectors = peers.peer_vectors("repeng", model, tok, make_pairs(12))
    layers = sorted(int(k.split(".")[-1]) for k in vectors)
    cv = repeng.ControlVector(model.config.model_type, {i: vectors[f"model.layers.{i}"].numpy() for i in layers})
    # repeng reads per-row position ids to skip left padding (transformers 5 passes one row of
    # them unless given): both passes get the same explicit ones
    attn = batch["attention_mask"]
    kw = {"input_ids": batch["input_ids"], "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
    wrapped = repeng.ControlModel(model, layers)
    try:
        wrapped.set_control(cv, 1.5)
        with torch.no_grad():
            theirs = model(**kw).logits
    finally:
        wrapped.unwrap()
    with methods["repeng"].ctx(1.5), torch.no_grad():
        ours = model(**kw).logits
    assert torch.allclose(ours[batch["attention_mask"].bool()], theirs[batch["attention_mask"].bool()], atol=1e-5)


def test_steering_vectors_application_matches_steering_vectors(trained):
    model, tok, _, _, batch, _, methods, _ = trained
    sv = peers._import("steering_vectors").train_steering_vector(model, tok, peers._texts(tok, make_pairs(12)))
    with sv.apply(model, multiplier=1.5):
        theirs = logits(model, batch)
    with methods["steering_vectors"].ctx(1.5):
        ours = logits(model, batch)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_missing_and_unknown_peers(monkeypatch, tiny):
    model, tok = tiny
    with pytest.raises(peers.PeerError, match="unknown peer baseline 'pyreft'"):
        peers.peer_vectors("pyreft", model, tok, make_pairs(4))
    real = builtins.__import__

    def no_repeng(name, *a, **k):
        if name.startswith("repeng"):
            raise ImportError("No module named 'repeng'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_repeng)
    monkeypatch.delitem(__import__("sys").modules, "repeng", raising=False)
    with pytest.raises(peers.PeerError, match=r"pip install -e '\.\[peers\]'"):
        peers.peer_vectors("repeng", model, tok, make_pairs(4))
