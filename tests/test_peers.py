"""Peer baselines (repeng, steering-vectors): trained by their own code on our pairs, they leave
the model untouched, and our sweep applies their vectors exactly as the libraries do."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch

from adapters import hidden, peers
from adapters.evaluate.methods import Method, peer_method, vector_method
from adapters.models import BaseChecksum
from conftest import logits, make_batch, make_pairs

N_PAIRS = 4


def _state(model):
    return ([n for n, _ in model.named_modules()], {n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.fixture(scope="module")
def trained(tiny_dir):
    """The tiny model in an unusual state (one block in train mode, one weight trainable), both
    peers trained on it via peer_method, and what the model looked like before."""
    from adapters import models

    model, tok = models.load_base(tiny_dir, dtype="float32", device="cpu")
    model.model.layers[1].train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    state, hooks = _state(model), set(peers._foreign_hooks(model))
    checksum = BaseChecksum(model)
    batch = make_batch(tok, 2, start=40)
    before = logits(model, batch)
    methods = {name: peer_method(name, model, tok, make_pairs(N_PAIRS), [-1.0, 0.0, 1.0]) for name in peers.PEERS}
    after = (_state(model), set(peers._foreign_hooks(model)), logits(model, batch))
    model.eval()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    return dict(model=model, tok=tok, state=state, hooks=hooks, checksum=checksum, batch=batch, before=before,
                methods=methods, after=after)


@pytest.fixture(scope="module")
def native(trained):
    """Each library's own trained object and our {module: vector} conversion of it."""
    return {name: peers._train(name, trained["model"], trained["tok"], make_pairs(N_PAIRS)) for name in peers.PEERS}


def _kw(batch):
    # repeng masks each row from its first position id 0 on; transformers 5 passes one (1, T) row
    # of position ids unless given, which repeng cannot reshape for B > 1: give both passes the
    # same per-row ids (left padding), as a caller of repeng must
    attn = batch["attention_mask"]
    return {"input_ids": batch["input_ids"], "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}


def test_training_leaves_the_model_untouched(trained):
    model = trained["model"]
    state, hooks, out = trained["after"]
    assert state == trained["state"]  # module names, train/eval modes, requires_grad flags
    trained["checksum"].verify(model, "after the peers")
    assert torch.equal(out, trained["before"])
    assert hooks == trained["hooks"]  # transformers' own output-capturing hooks aside, none added
    assert not any(type(m).__module__.startswith("repeng") for m in model.modules())


@pytest.mark.parametrize("name", peers.PEERS)
def test_zero_is_the_base_and_the_sign_flips_the_move(trained, native, name):
    model, batch, before = trained["model"], trained["batch"], trained["before"]
    m: Method = trained["methods"][name]
    assert m.per_example and m.name == name
    with m.ctx(0.0):
        assert torch.equal(logits(model, batch), before)
    vectors = native[name][1]
    assert vectors and all(v.norm() > 0 for v in vectors.values())
    # c = +1 / -1 move the projection on the vector of the last steered layer's output up / down
    last = max(vectors, key=lambda k: int(k.rsplit(".", 1)[-1]))
    real = batch["attention_mask"].bool()
    proj = {}
    for c in (-1.0, 0.0, 1.0):
        seen = []
        with m.ctx(c), hidden.hooks(model, {last: lambda h: seen.append(h.detach())}), torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        proj[c] = (seen[0][real] @ vectors[last]).mean()
    assert proj[1.0] > proj[0.0] > proj[-1.0]
    # and a small +c / -c move the output logits in opposite directions
    with m.ctx(0.05):
        up = logits(model, batch)
    with m.ctx(-0.05):
        down = logits(model, batch)
    assert not torch.allclose(up, before)
    cos = torch.nn.functional.cosine_similarity((up - before)[real].flatten(), (down - before)[real].flatten(), 0)
    assert cos < -0.9


def test_repeng_application_matches_repeng(trained, native):
    model, batch = trained["model"], trained["batch"]
    repeng = peers._import("repeng")
    cv, vectors = native["repeng"]
    layers = sorted(int(k.rsplit(".", 1)[-1]) for k in vectors)
    assert layers == peers.repeng_layers(model.config.num_hidden_layers)
    for i in layers:  # our conversion is repeng's own vector
        assert torch.equal(vectors[f"model.layers.{i}"], torch.as_tensor(cv.directions[i]))
    kw, real = _kw(batch), batch["attention_mask"].bool()
    wrapped = repeng.ControlModel(model, layers)
    try:
        wrapped.set_control(cv, 1.5)
        with torch.no_grad():
            theirs = model(**kw).logits
    finally:
        wrapped.unwrap()
    assert not any(type(m).__module__.startswith("repeng") for m in model.modules())
    with torch.no_grad():
        base = model(**kw).logits
        with trained["methods"]["repeng"].ctx(1.5):  # peer_method's own (separately trained) vector
            ours = model(**kw).logits
    assert not torch.allclose(theirs[real], base[real], atol=1e-3)
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)  # padding positions are never read


def test_steering_vectors_application_matches_steering_vectors(trained, native):
    model, batch = trained["model"], trained["batch"]
    sv, vectors = native["steering_vectors"]
    assert sorted(vectors) == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    for i, v in sv.layer_activations.items():
        assert torch.equal(vectors[f"model.layers.{i}"], v)
    with sv.apply(model, multiplier=1.5):
        theirs = logits(model, batch)
    assert not torch.allclose(theirs, trained["before"], atol=1e-3)
    with trained["methods"]["steering_vectors"].ctx(1.5):
        ours = logits(model, batch)
    assert torch.allclose(ours, theirs, atol=1e-5)
    with vector_method(model, vectors, [1.5]).ctx(1.5):
        assert torch.allclose(logits(model, batch), theirs, atol=1e-5)


def test_layers_argument(trained):
    model, tok = trained["model"], trained["tok"]
    assert sorted(peers.peer_vectors("steering_vectors", model, tok, make_pairs(1), layers=[1, 3])) == \
        ["model.layers.1", "model.layers.3"]
    assert sorted(peers.peer_vectors("repeng", model, tok, make_pairs(2), layers=[-1])) == ["model.layers.3"]
    assert peers.repeng_layers(32) == list(range(15, 28))
    assert peers.repeng_layers(30) == list(range(14, 26))


def test_missing_and_unknown_peers(monkeypatch, trained):
    model, tok = trained["model"], trained["tok"]
    with pytest.raises(peers.PeerError, match=r"unknown peer baseline 'pyreft'.*'repeng', 'steering_vectors'"):
        peer_method("pyreft", model, tok, make_pairs(2), [1.0])
    real = builtins.__import__

    def missing(name, *a, **k):
        if name.startswith(("repeng", "steering_vectors")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", missing)
    for name in peers.PEERS:
        monkeypatch.delitem(sys.modules, name, raising=False)
        with pytest.raises(peers.PeerError, match=rf"peer baseline '{name}' needs the optional extra: "
                                                  r"pip install -e '\.\[peers\]'"):
            peer_method(name, model, tok, make_pairs(2), [1.0])
    assert issubclass(peers.PeerError, ValueError)


def test_batched_steering_vectors_extraction_gives_its_batch_one_vector(trained):
    """We run steering-vectors' extraction 32 texts at a time (its default is 1): every row is
    read at its own last real token, so the vector is the same to fp32 rounding."""
    model, tok, pairs = trained["model"], trained["tok"], make_pairs(5)
    one = peers._train("steering_vectors", model, tok, pairs, sv_batch=1)[1]
    batched = peers._train("steering_vectors", model, tok, pairs)[1]
    assert peers.SV_BATCH > len(pairs) and one.keys() == batched.keys()
    for k in one:
        assert torch.allclose(one[k], batched[k], rtol=1e-4, atol=1e-5), k


def test_peer_vectors_are_cached_by_what_they_depend_on(trained, tmp_path, monkeypatch):
    model, tok = trained["model"], trained["tok"]
    said = []
    first = peers.peer_vectors("repeng", model, tok, make_pairs(3), cache=tmp_path, log=said.append)
    assert len(list(tmp_path.glob("repeng-*.safetensors"))) == 1
    assert said and said[-1].startswith("peer repeng: trained on 3 pairs")
    calls = []
    real = peers._train
    monkeypatch.setattr(peers, "_train", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = peers.peer_vectors("repeng", model, tok, make_pairs(3), cache=tmp_path, log=said.append)
    assert calls == [] and again.keys() == first.keys() and said[-1].startswith("peer repeng: vector from the cache")
    assert all(torch.equal(again[k], first[k]) for k in first)
    peers.peer_vectors("repeng", model, tok, make_pairs(4), cache=tmp_path)  # other pairs: trained again
    peers.peer_vectors("repeng", model, tok, make_pairs(3), layers=[-1], cache=tmp_path)  # other layers
    peers.peer_vectors("steering_vectors", model, tok, make_pairs(3), cache=tmp_path)  # other peer
    assert calls == ["repeng", "repeng", "steering_vectors"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    # a damaged cache file is trained again and replaced, not trusted
    path = next(tmp_path.glob("steering_vectors-*.safetensors"))
    path.write_bytes(b"not safetensors")
    peers.peer_vectors("steering_vectors", model, tok, make_pairs(3), cache=tmp_path)
    assert calls[-1] == "steering_vectors" and len(calls) == 4
