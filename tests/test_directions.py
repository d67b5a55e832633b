"""Reference directions: PCA recovers a planted direction with the right sign; layer
selection; pooling; save/load with the base fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters import directions as dirs
from adapters.directions import Directions, DirectionsError, fit_direction, layer_stats, pool, select_layers
from conftest import make_pairs


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
    assert "mean_diff" in str(e.value) and "'pca'" in str(e.value)


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
