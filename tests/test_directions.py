"""Reference directions: every method recovers a planted direction with the right sign (Fisher
whitening where the gradients' strong noise axis fools SVD and the mean); the Fisher methods
match their dense definitions; gradient collection matches autograd on one pair alone; layer
selection; pooling; save/load with the base fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters import directions as dirs
from adapters import hidden
from adapters.config import ConfigError, DirectionsConfig
from adapters.data import encode_pairs
from adapters.directions import (METHODS, Directions, DirectionsError, fit_direction, fit_methods, layer_stats,
                                 pool, select_layers)
from adapters.models import BaseChecksum, base_fingerprint
from conftest import make_pairs, tiny_directions_cfg

FISHER = [m for m in METHODS if m.startswith("fisher_steer")]


def planted(n=80, d=32, seed=0, neg_frac=0.2, noise=0.3):
    """D = a·u + noise with a > 0 for most pairs and a < 0 for a few."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    a = torch.rand(n, generator=g) * 2 + 1.0  # (n,) in [1, 3)
    n_neg = int(n * neg_frac)
    a[:n_neg] = -(torch.rand(n_neg, generator=g) * 0.5 + 0.2)  # a few pairs disagree
    D = a[:, None] * u + noise * torch.randn(n, d, generator=g)
    return D, u


@pytest.mark.parametrize("method", ["pca_diff", "mean_diff"])
@pytest.mark.parametrize("flip", [False, True])
def test_fit_direction_recovers_planted_direction_with_sign(method, flip):
    D, u = planted()
    if flip:  # the same data seen from the other side: the direction must follow
        D, u = -D, -u
    V = fit_direction(D, method, 1)
    assert V.shape == (1, D.shape[1])
    v = V[0]
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    cos = float(v @ u)
    assert cos > 0.99, f"{method}: cos(v, u) = {cos:.4f}"
    assert float((D @ v).mean()) > 0


def test_pca_diff_is_uncentred():
    """The mean difference is the signal: centred PCA would return the noise axis w."""
    g = torch.Generator().manual_seed(1)
    d = 16
    u, w = torch.zeros(d), torch.zeros(d)
    u[0], w[1] = 1.0, 1.0
    n = 200
    D = (2.0 + 0.05 * torch.randn(n, 1, generator=g)) * u + 1.0 * torch.randn(n, 1, generator=g) * w
    v = fit_direction(D, "pca_diff", 1)[0]
    assert float(v @ u) > 0.99
    centred = torch.linalg.svd(D - D.mean(0), full_matrices=False)[2][0]
    assert abs(float(centred @ w)) > 0.99  # what sklearn-style PCA would have found


def test_pca_diff_several_components():
    D, u = planted(d=24)
    V = fit_direction(D, "pca_diff", 3)
    assert V.shape == (3, 24)
    torch.testing.assert_close(V @ V.T, torch.eye(3), atol=1e-5, rtol=0)
    assert ((D @ V.T).mean(0) >= 0).all()  # every component sign-aligned
    assert float(V[0] @ u) > 0.99


def test_unknown_method_lists_valid_ones():
    D, _ = planted()
    with pytest.raises(DirectionsError, match="pca_diff") as e:
        fit_direction(D, "pca", 1)
    assert "'pca'" in str(e.value) and all(repr(m) in str(e.value) for m in METHODS)
    with pytest.raises(DirectionsError, match="fisher_steer_dual_diff"):  # before any model work
        fit_methods(None, None, [], [], tiny_directions_cfg(), 96, ["pca_diff", "fisher_steer_reg6"])


def test_config_accepts_every_method_and_only_those():
    assert [DirectionsConfig(method=m).method for m in METHODS] == list(METHODS)
    with pytest.raises(ConfigError, match="fisher_steer_cov_reg5"):
        DirectionsConfig(method="fisher_steer")


def planted_grads(n=2000, d=12, seed=0, w_mean=0.0, w_std=0.0):
    """A planted unit u with D = a·u + noise (a > 0 for most pairs) and per-member gradients
    g_pos = 0.75·u + a_w·w + ε, g_neg = -0.75·u + b_w·w + ε' (ε isotropic, std 1), where w ⟂ u
    is a noise axis with a_w ~ N(w_mean, w_std²), b_w ~ N(-w_mean, w_std²)."""
    D, u = planted(n=n, d=d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)  # not planted's stream: w must not be drawn equal to u
    w = torch.randn(d, generator=g)
    w = w - (w @ u) * u
    w = w / w.norm()
    a_w = w_mean + w_std * torch.randn(n, 1, generator=g)
    b_w = -w_mean + w_std * torch.randn(n, 1, generator=g)
    g_pos = 0.75 * u + a_w * w + torch.randn(n, d, generator=g)
    g_neg = -0.75 * u + b_w * w + torch.randn(n, d, generator=g)
    logp = (torch.randn(n, generator=g) - 10.0, torch.randn(n, generator=g) - 10.0)
    return D, {"g_pos": g_pos, "g_neg": g_neg}, logp, u, w


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("flip", ["none", "all", "D"])
def test_every_method_recovers_planted_direction_with_sign(method, flip):
    """flip=all: the same data seen from the other side; flip=D: only the differences change
    sign, and every method follows them (the one sign rule is mean(D @ v) > 0)."""
    D, grads, logp, u, _ = planted_grads()
    if flip == "all":
        D, u, grads = -D, -u, {k: -g for k, g in grads.items()}
    elif flip == "D":
        D, u = -D, -u
    V = fit_direction(D, method, 1, grads, logp)
    assert V.shape == (1, D.shape[1])
    v = V[0]
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(v @ u) > 0.95, f"{method}: cos(v, u) = {float(v @ u):.4f}"
    assert float((D @ v).mean()) > 0


@pytest.mark.parametrize("method", FISHER)
def test_fisher_whitening_recovers_u_where_svd_and_mean_fail(method):
    """A strong noise axis w (mean 3, std 10 in each member's gradient) dominates mean(g) and the
    gradients' top singular vector; solving with the Fisher divides it out."""
    D, grads, logp, u, w = planted_grads(w_mean=3.0, w_std=10.0)
    g = grads["g_pos"] - grads["g_neg"]
    assert abs(float(dirs._unit(g.mean(0)) @ u)) < 0.3
    assert abs(float(fit_direction(D, "svd_grad", 1, grads)[0] @ u)) < 0.3
    v = fit_direction(D, method, 1, grads, logp)[0]
    assert float(v @ u) > 0.95, f"{method}: cos(v, u) = {float(v @ u):.4f}, cos(v, w) = {float(v @ w):.4f}"


def _dense(F, m, rel):
    d = F.shape[0]
    return torch.linalg.solve(F + rel * torch.trace(F) / d * torch.eye(d, dtype=F.dtype), m)


def _emp(X):
    return X.T @ X / len(X)


def _cov(X):
    return torch.cov(X.T, correction=0)


@pytest.mark.parametrize("n", [10, 60])  # fewer pairs than dimensions (F singular) and more
def test_fisher_methods_match_their_dense_definition(n):
    g = torch.Generator().manual_seed(3)
    d = 24
    D = torch.randn(n, d, generator=g, dtype=torch.float64)
    gp = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    gn = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 - 0.3
    G = gp - gn
    dual_pos, dual_neg = _dense(_emp(gp), gp.mean(0), 1e-2), _dense(_emp(gn), gn.mean(0), 1e-2)
    expected = {
        **{f"fisher_steer_reg{k}": _dense(_emp(G), G.mean(0), 10.0 ** -k) for k in range(1, 6)},
        **{f"fisher_steer_cov_reg{k}": _dense(_cov(G), G.mean(0), 10.0 ** -k) for k in range(1, 6)},
        "fisher_steer_dual": _dense((_emp(gp) + _emp(gn)) / 2, G.mean(0), 1e-2),
        "fisher_steer_dual_cov": _dense((_cov(gp) + _cov(gn)) / 2, G.mean(0), 1e-2),
        "fisher_steer_dual_pos": dual_pos,
        "fisher_steer_dual_neg": dual_neg,
        "fisher_steer_dual_diff": dual_pos / dual_pos.norm() - dual_neg / dual_neg.norm(),
    }
    assert sorted(expected) == sorted(FISHER)
    for method, e in expected.items():
        e = (e / e.norm()).float()
        e = e if float((D.float() @ e).mean()) > 0 else -e
        v = fit_direction(D.float(), method, 1, {"g_pos": gp.float(), "g_neg": gn.float()})[0]
        torch.testing.assert_close(v, e, atol=1e-4, rtol=0, msg=method)


def test_fisher_ridge_is_relative_to_the_mean_eigenvalue():
    """Rescaling the gradients leaves every Fisher direction unchanged, and λ matters (reg1 != reg5)."""
    D, grads, _, _, _ = planted_grads(n=8, d=24, w_mean=3.0, w_std=10.0)  # n < d: λ decides the null space
    for method in FISHER:
        v = fit_direction(D, method, 1, grads)
        for c in (1e-3, 1e3):
            got = fit_direction(D, method, 1, {k: c * g for k, g in grads.items()})
            torch.testing.assert_close(got, v, atol=1e-4, rtol=0, msg=f"{method} at gradient scale {c}")
    reg1, reg5 = (fit_direction(D, f"fisher_steer_reg{k}", 1, grads)[0] for k in (1, 5))
    assert float(reg1 @ reg5) < 0.99


def test_pca_diff_weighted_follows_the_likely_pairs():
    """Half the pairs differ by 2·w at log-prob -10, half by u at -1: unweighted PCA takes w,
    the weighted one u."""
    d, n = 16, 40
    u, w = torch.zeros(d), torch.zeros(d)
    u[0], w[1] = 1.0, 1.0
    D = torch.cat([2.0 * w.expand(n // 2, d), u.expand(n // 2, d)])
    lp = torch.cat([torch.full((n // 2,), -10.0), torch.full((n // 2,), -1.0)])
    assert abs(float(fit_direction(D, "pca_diff", 1)[0] @ w)) > 0.99
    v = fit_direction(D, "pca_diff_weighted", 1, logp=(lp, lp))[0]
    assert float(v @ u) > 0.99
    # the definition: top right-singular vector of sqrt(w)·D, w = n·softmax(mean of the two members' lp)
    g = torch.Generator().manual_seed(4)
    D = torch.randn(n, d, generator=g, dtype=torch.float64)
    lp_pos, lp_neg = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    w = n * torch.softmax((lp_pos + lp_neg) / 2, 0)
    e = torch.linalg.svd(w.sqrt()[:, None] * D)[2][0].float()
    v = fit_direction(D.float(), "pca_diff_weighted", 1, logp=(lp_pos.float(), lp_neg.float()))[0]
    torch.testing.assert_close(v, e if float((D.float() @ e).mean()) > 0 else -e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["pca_diff_weighted", "svd_grad"])
def test_components_of_multi_vector_methods(method):
    D, grads, logp, u, _ = planted_grads(n=400, d=24)
    V = fit_direction(D, method, 3, grads, logp)
    assert V.shape == (3, 24)
    torch.testing.assert_close(V @ V.T, torch.eye(3), atol=1e-5, rtol=0)
    assert ((D @ V.T).mean(0) >= 0).all()
    assert float(V[0] @ u) > 0.95


@pytest.mark.parametrize("method", ["mean_diff", *FISHER])
def test_single_vector_methods_refuse_components(method):
    D, grads, logp, _, _ = planted_grads(n=50)
    with pytest.raises(DirectionsError, match="components=2"):
        fit_direction(D, method, 2, grads, logp)


def test_missing_gradients_or_logprobs_are_errors():
    D, _ = planted()
    with pytest.raises(DirectionsError, match="gradients"):
        fit_direction(D, "fisher_steer_reg3", 1)
    with pytest.raises(DirectionsError, match="log-probs"):
        fit_direction(D, "pca_diff_weighted", 1)


def _single(model, ids: list[int], n_suffix: int, layers: list[str]):
    """lp of one unpadded sequence and its gradient w.r.t. a vector added at each layer, by plain autograd."""
    ids = torch.tensor(ids)
    deltas = {l: torch.zeros(1, hidden.output_dim(model, l), requires_grad=True) for l in layers}
    with hidden.hooks(model, {l: (lambda h, l=l: h + deltas[l]) for l in layers}):
        logits = model(input_ids=ids[None]).logits[0]  # (T, V)
    T = len(ids)
    lp = logits[T - n_suffix - 1: T - 1].log_softmax(-1).gather(1, ids[T - n_suffix:, None]).mean()
    return lp.detach(), dict(zip(layers, (g[0] for g in torch.autograd.grad(lp, list(deltas.values())))))


def test_collect_grads_matches_autograd_on_each_pair_alone(tiny):
    model, tok = tiny
    layers = ["model.layers.1", "model.layers.2.mlp", "model.layers.3"]
    pairs = make_pairs(4)
    enc = encode_pairs(tok, pairs, 96)
    assert len({len(e.pos) for e in enc}) > 1  # the batch is padded
    checksum = BaseChecksum(model)
    H, G, (lp_pos, lp_neg) = dirs.collect_grads(model, tok, pairs, layers, 96, batch_size=4)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    checksum.verify(model)
    h = dirs.collect(model, tok, pairs, layers, 96, batch_size=4)
    for l in layers:
        assert torch.equal(H[l][0], h[l][0]) and torch.equal(H[l][1], h[l][1])
        assert G[l]["g_pos"].shape == G[l]["g_neg"].shape == (4, 64) and G[l]["g_pos"].dtype == torch.float32
    for i, e in enumerate(enc):
        for ids, lp, key in ((e.pos, lp_pos, "g_pos"), (e.neg, lp_neg, "g_neg")):
            want_lp, want_g = _single(model, ids, e.n_suffix, layers)
            assert float(lp[i]) == pytest.approx(float(want_lp), abs=1e-5)
            for l in layers:
                torch.testing.assert_close(G[l][key][i], want_g[l], rtol=1e-4, atol=1e-5, msg=f"{key}[{i}] at {l}")
    _, no_grads, (lp_pos2, _) = dirs.collect_grads(model, tok, pairs, layers, 96, batch_size=4, grads=False)
    assert no_grads is None
    torch.testing.assert_close(lp_pos2, lp_pos)


def test_fit_methods_one_pass_one_directions_per_method(tiny, tiny_directions, monkeypatch):
    model, tok = tiny
    calls = []
    real = dirs.collect_grads
    monkeypatch.setattr(dirs, "collect_grads", lambda *a, **kw: calls.append(kw["grads"]) or real(*a, **kw))
    cfg = tiny_directions_cfg()
    out = fit_methods(model, tok, make_pairs(16), make_pairs(8, start=16), cfg, 96, list(METHODS),
                      fingerprint=base_fingerprint(model))
    assert calls == [True]
    assert list(out) == list(METHODS)
    h = dirs.collect(model, tok, make_pairs(16), tiny_directions.layers, max_length=96, batch_size=8)
    for m, d in out.items():
        assert d.method == m and d.layers == tiny_directions.layers and d.fingerprint == tiny_directions.fingerprint
        assert len(d.selected) == 2 and set(d.selected) <= set(d.layers)
        for l in d.layers:
            assert d.vectors[l].shape == (1, 64) and float(d.v(l).norm()) == pytest.approx(1.0, abs=1e-5)
            proj = (h[l][0] - h[l][1]) @ d.v(l)
            assert float(proj.mean()) > 0, f"{m} at {l}"
            assert d.scale[l] == pytest.approx(float(proj.abs().mean()), rel=1e-4)
    # the gradient pass's hidden states are collect's: pca_diff equals compute's (which uses collect)
    for l in tiny_directions.layers:
        assert torch.equal(out["pca_diff"].vectors[l], tiny_directions.vectors[l])
    assert out["pca_diff"].selected == tiny_directions.selected
    calls.clear()
    fit_methods(model, tok, make_pairs(8), make_pairs(4, start=16), cfg, 96, ["pca_diff", "mean_diff"])
    assert calls == []
    only = fit_methods(model, tok, make_pairs(8), make_pairs(4, start=16), cfg, 96, ["pca_diff_weighted"],
                       layers=["model.layers.2", "model.layers.1"])
    assert calls == [False]
    assert only["pca_diff_weighted"].layers == ["model.layers.1", "model.layers.2"]


def test_compute_with_a_gradient_method(tiny):
    model, tok = tiny
    cfg = tiny_directions_cfg(method="fisher_steer_cov_reg3", n_layers=1)
    d = dirs.compute(model, tok, make_pairs(8), make_pairs(4, start=16), cfg, max_length=96)
    assert d.method == "fisher_steer_cov_reg3" and len(d.selected) == 1
    assert all(d.vectors[l].shape == (1, 64) for l in d.layers)


def test_layer_stats_values():
    g = torch.Generator().manual_seed(2)
    d = 8
    v = torch.zeros(d)
    v[0] = 1.0
    pos, neg = torch.randn(20, d, generator=g), torch.randn(20, d, generator=g)
    pos[:, 0] += 2.0
    vpos, vneg = torch.randn(10, d, generator=g), torch.randn(10, d, generator=g)
    vpos[:, 0] += 2.0
    st = layer_stats(v, (pos, neg), (vpos, vneg))
    proj = (pos - neg)[:, 0]
    s = float(proj.abs().mean())
    assert st["scale"] == pytest.approx(s, rel=1e-5)
    assert st["agreement"] == pytest.approx(float((proj > 0).float().mean()))
    vproj = (vpos - vneg)[:, 0]
    assert st["val_separation"] == pytest.approx(float(vproj.mean()) / s, rel=1e-5)
    assert st["val_agreement"] == pytest.approx(float((vproj > 0).float().mean()))
    h = torch.cat([vpos[:, 0], vneg[:, 0]]).numpy()
    labels = np.r_[np.ones(10), np.zeros(10)]
    assert st["corr"] == pytest.approx(float(np.corrcoef(h, labels)[0, 1]), abs=1e-5)
    assert st["corr"] > 0.5


LAYERS = [f"model.layers.{i}" for i in range(8)]


def _stats(corrs, agree=None):
    agree = agree or [0.5] * len(corrs)
    return {l: {"corr": c, "val_agreement": a} for l, c, a in zip(LAYERS, corrs, agree)}


def test_select_top_k_by_abs_correlation():
    stats = _stats([0.1, 0.9, -0.95, 0.2, 0.3, 0.85, 0.0, -0.1])
    assert select_layers(stats, LAYERS, "top_k", n=3) == ["model.layers.1", "model.layers.2", "model.layers.5"]
    assert select_layers(stats, LAYERS, "top_k", n=1) == ["model.layers.2"]
    # ties on |corr| are broken by held-out agreement
    tie = _stats([0.5] * 8, agree=[0.1, 0.2, 0.9, 0.3, 0.8, 0.4, 0.5, 0.6])
    assert select_layers(tie, LAYERS, "top_k", n=2) == ["model.layers.2", "model.layers.4"]


def test_select_bands_takes_the_best_layer_of_each_depth_band():
    # top_k would take the adjacent 1, 2, 3; bands split 0..7 into [0-2], [3-4], [5-7]
    stats = _stats([0.1, 0.9, -0.95, 0.8, 0.3, 0.2, 0.0, -0.4])
    assert select_layers(stats, LAYERS, "bands", n=3) == ["model.layers.2", "model.layers.3", "model.layers.7"]
    assert select_layers(stats, LAYERS, "top_k", n=3) == ["model.layers.1", "model.layers.2", "model.layers.3"]
    assert select_layers(stats, LAYERS, "bands", n=1) == ["model.layers.2"]
    assert select_layers(stats, LAYERS, "bands", n=8) == LAYERS  # one layer per band
    assert select_layers(stats, LAYERS[:2], "bands", n=3) == LAYERS[:2]  # fewer layers than bands


def test_select_every_k_counts_from_the_last_layer():
    stats = _stats([0.0] * 8)
    assert select_layers(stats, LAYERS, "every_k", every=4) == ["model.layers.3", "model.layers.7"]
    assert select_layers(stats, LAYERS, "every_k", every=3) == ["model.layers.1", "model.layers.4",
                                                                "model.layers.7"]
    assert select_layers(stats, LAYERS, "every_k", every=1) == LAYERS


def test_select_explicit():
    stats = _stats([0.0] * 8)
    got = select_layers(stats, LAYERS, "explicit", explicit=["model.layers.6", "model.layers.2"])
    assert got == ["model.layers.2", "model.layers.6"]  # in layer order
    with pytest.raises(DirectionsError, match="model.layers.9"):
        select_layers(stats, LAYERS, "explicit", explicit=["model.layers.9"])
    with pytest.raises(DirectionsError, match="top_k"):
        select_layers(stats, LAYERS, "best")


def test_select_orders_by_layer_number_not_text():
    layers = [f"model.layers.{i}" for i in (2, 10, 11)]
    stats = {l: {"corr": 0.5, "val_agreement": 0.5} for l in layers}
    assert select_layers(stats, layers, "top_k", n=3) == layers


def test_pool_last_and_mean():
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)  # suffix lengths 3, 1
    assert torch.equal(pool(h, mask, "last", 4), h[:, -1])
    got = pool(h, mask, "mean", 2)
    assert torch.equal(got[0], h[0, 3:].mean(0))  # the last 2 suffix tokens
    assert torch.equal(got[1], h[1, 4])  # only 1 suffix token
    assert torch.equal(pool(h, mask, "mean", 10)[0], h[0, 2:].mean(0))  # never beyond the suffix


def test_compute_on_tiny_model(tiny, tiny_directions):
    model, tok = tiny
    d = tiny_directions
    assert d.layers == [f"model.layers.{i}" for i in range(4)]
    assert len(d.selected) == 2 and set(d.selected) <= set(d.layers)
    h = dirs.collect(model, tok, make_pairs(16), d.layers, max_length=96, batch_size=8)
    for l in d.layers:
        assert d.vectors[l].shape == (1, 64)
        D = h[l][0] - h[l][1]
        proj = D @ d.v(l)
        assert float(d.v(l).norm()) == pytest.approx(1.0, abs=1e-5)
        assert float(proj.mean()) > 0  # sign-aligned on the training pairs
        assert d.scale[l] == pytest.approx(float(proj.abs().mean()), rel=1e-4)
        assert 0.5 <= d.stats[l]["agreement"] <= 1.0


def test_directions_save_load_round_trip(tmp_path, tiny_directions):
    d = tiny_directions
    d.save(tmp_path)
    assert (tmp_path / "directions.safetensors").is_file() and (tmp_path / "directions.json").is_file()
    back = Directions.load(tmp_path, fingerprint=d.fingerprint)
    assert back.method == d.method and back.layers == d.layers and back.selected == d.selected
    assert back.fingerprint == d.fingerprint and back.scale == pytest.approx(d.scale)
    assert back.stats.keys() == d.stats.keys()
    for l in d.layers:
        assert torch.equal(back.vectors[l], d.vectors[l])
        assert back.stats[l] == pytest.approx(d.stats[l])
    assert Directions.load(tmp_path).fingerprint == d.fingerprint  # no check asked for
    with pytest.raises(DirectionsError, match="different base model"):
        Directions.load(tmp_path, fingerprint="0" * 20)


def test_collect_builds_no_graph_even_with_trainable_parameters(tiny):
    """collect is a measurement: with a parameter that requires grad it still returns plain
    tensors (no autograd graph kept alive per batch)."""
    from conftest import make_pairs

    model, tok = tiny
    p = model.get_input_embeddings().weight
    p.requires_grad_(True)
    try:
        out = dirs.collect(model, tok, make_pairs(4), ["model.layers.1"], 64)
    finally:
        p.requires_grad_(False)
    assert not any(t.requires_grad for pos_neg in out.values() for t in pos_neg)
