"""Loss terms: exact values on hand-made hidden states, the sign flip at c = -1, the bound,
the NLL barrier and the per-token NLL."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from adapters.config import LossConfig
from adapters.loss import bound, contrastive_loss, nll_barrier, project, projection_terms, token_nll

BOUNDS_AGGS = list(itertools.product(["clamp", "tanh"], ["pair", "token"]))


def random_states(B=3, T=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    h_base = h + 0.5 * torch.randn(2 * B, T, D, generator=g)
    v = torch.randn(D, generator=g)
    v = v / v.norm()
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for i, n in enumerate([2, 3, 4] * 2):  # right-aligned suffixes, same length in pos and neg
        mask[i, T - n:] = True
    return h, h_base, v, mask


@pytest.mark.parametrize("how,aggregate", BOUNDS_AGGS)
def test_terms_flip_sign_with_c(how, aggregate):
    h, h_base, v, mask = random_states()
    up = projection_terms(h, project(h_base, v, 0.7), v, 0.7, mask, 1.0, 2.0, how, aggregate)
    down = projection_terms(h, project(h_base, v, 0.7), v, 0.7, mask, -1.0, 2.0, how, aggregate)
    for key in ("contrast", "shift"):
        assert torch.equal(down[key], -up[key]), key
        assert up[key] != 0
    # the logged projections do not depend on c
    assert torch.equal(up["proj_contrast"], down["proj_contrast"])
    assert torch.equal(up["proj_shift"], down["proj_shift"])


def hand_states():
    """One pair, T = 3, D = 2, v = e0, suffix = the last 2 tokens."""
    h = torch.tensor([[[9.0, 0], [1.0, 0], [3.0, 0]],      # pos
                      [[-9.0, 0], [0.0, 5], [0.0, 7]]])    # neg
    h_base = torch.tensor([[[0.0, 0], [0.0, 0], [1.0, 0]],
                           [[0.0, 0], [2.0, 0], [-2.0, 0]]])
    v = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[False, True, True], [False, True, True]])
    return h, h_base, v, mask


def test_projection_terms_hand_values():
    h, h_base, v, mask = hand_states()
    # Δ tokens (suffix): 1, 3 -> pair mean 2; shift tokens: pos 1, 2 ; neg -2, 2
    t = projection_terms(h, project(h_base, v, 1.0), v, 1.0, mask, 1.0, 10.0, "clamp", "pair")
    assert t["contrast"].item() == pytest.approx(-2.0)
    assert t["shift"].item() == pytest.approx(-(1.5 + 0.0) / 2)
    assert t["proj_contrast"].item() == pytest.approx(2.0)
    # the scale s divides every projection
    t2 = projection_terms(h, project(h_base, v, 2.0), v, 2.0, mask, 1.0, 10.0, "clamp", "pair")
    assert t2["contrast"].item() == pytest.approx(-1.0)
    # per-token aggregation bounds each token: clamp(1, 1.5) and clamp(3, 1.5)
    tt = projection_terms(h, project(h_base, v, 1.0), v, 1.0, mask, 1.0, 1.5, "clamp", "token")
    assert tt["contrast"].item() == pytest.approx(-(1.0 + 1.5) / 2)
    tp = projection_terms(h, project(h_base, v, 1.0), v, 1.0, mask, 1.0, 1.5, "clamp", "pair")
    assert tp["contrast"].item() == pytest.approx(-1.5)


def test_masked_tokens_are_ignored():
    h, h_base, v, mask = hand_states()
    h2 = h.clone()
    h2[:, 0] = 1e6  # the unmasked first position holds garbage (padding / prompt)
    for agg in ("pair", "token"):
        a = projection_terms(h, project(h_base, v, 1.0), v, 1.0, mask, 1.0, 10.0, "clamp", agg)
        b = projection_terms(h2, project(h_base, v, 1.0), v, 1.0, mask, 1.0, 10.0, "clamp", agg)
        assert torch.equal(a["contrast"], b["contrast"]) and torch.equal(a["shift"], b["shift"])


@pytest.mark.parametrize("how", ["clamp", "tanh"])
def test_bound_limits_at_k(how):
    k = 2.0
    p = torch.tensor([-1e6, -3.0, -0.01, 0.0, 0.01, 3.0, 1e6], requires_grad=True)
    b = bound(p, k, how)
    assert b.abs().max().item() <= k
    assert b[0].item() == pytest.approx(-k) and b[-1].item() == pytest.approx(k)
    assert b[2].item() == pytest.approx(-0.01, rel=1e-3) and b[4].item() == pytest.approx(0.01, rel=1e-3)
    assert torch.equal(b[3], torch.tensor(0.0))
    b.sum().backward()
    assert p.grad[0] == 0 and p.grad[-1] == 0  # no push beyond the bound
    if how == "clamp":
        assert torch.equal(b[[1, 5]], torch.tensor([-k, k]))
    with pytest.raises(ValueError, match="clamp"):
        bound(p, k, "sigmoid")


def test_large_projection_gives_exactly_minus_c_k():
    h, h_base, v, mask = hand_states()
    for c in (1.0, -1.0):
        t = projection_terms(h * 1000, project(h_base, v, 1.0), v, 1.0, mask, c, 3.0, "clamp", "pair")
        assert t["contrast"].item() == -c * 3.0


def test_nll_barrier_zero_inside_margin_positive_outside():
    base = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[False, True, True, True]])
    inside = base + torch.tensor([[50.0, 0.1, -1.0, 0.05]])  # masked token may rise freely
    out = nll_barrier(inside, base, mask, margin=0.1, power=2.0)
    assert out["nll_barrier"].item() == 0.0
    assert out["dnll"].item() == pytest.approx((0.1 - 1.0 + 0.05) / 3, abs=1e-6)

    above = base + torch.tensor([[0.0, 0.6, 0.1, 1.1]])
    out = nll_barrier(above, base, mask, margin=0.1, power=2.0)
    assert out["nll_barrier"].item() == pytest.approx((0.5 ** 2 + 0.0 + 1.0 ** 2) / 3, rel=1e-5)
    out3 = nll_barrier(above, base, mask, margin=0.1, power=3.0)
    assert out3["nll_barrier"].item() == pytest.approx((0.5 ** 3 + 1.0) / 3, rel=1e-5)


def test_nll_barrier_weighs_each_row_once():
    base = torch.zeros(2, 4)
    mask = torch.tensor([[False, False, False, True], [True, True, True, True]])
    nll = torch.tensor([[0.0, 0.0, 0.0, 2.1], [0.1, 0.1, 0.1, 1.1]])  # excess over 0.1: row 0: 2; row 1: 0, 0, 0, 1
    out = nll_barrier(nll, base, mask, margin=0.1, power=1.0)
    assert out["nll_barrier"].item() == pytest.approx((2.0 + 0.25) / 2)  # not the token mean (2 + 1) / 5
    assert out["dnll"].item() == pytest.approx((2.1 + 1.4 / 4) / 2)


def test_token_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    B, T, K, V = 2, 7, 4, 11
    ids = torch.randint(0, V, (B, T), generator=g)
    logits = torch.randn(B, K, V, generator=g)
    nll = token_nll(logits, ids)
    assert nll.shape == (B, T)
    assert torch.equal(nll[:, : T - K + 1], torch.zeros(B, T - K + 1))
    for b in range(B):
        for j in range(K - 1):  # logits position j (absolute T-K+j) predicts token T-K+j+1
            t = T - K + j + 1
            want = F.cross_entropy(logits[b, j][None], ids[b, t][None])
            assert nll[b, t].item() == pytest.approx(want.item(), rel=1e-6)
            by_hand = -torch.log_softmax(logits[b, j], -1)[ids[b, t]]
            assert nll[b, t].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_token_nll_with_full_logits():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (3, 5), generator=g)
    logits = torch.randn(3, 5, 9, generator=g)
    nll = token_nll(logits, ids)
    want = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(nll[:, 1:], want)
    assert torch.equal(nll[:, 0], torch.zeros(3))


@pytest.mark.parametrize("how,aggregate", BOUNDS_AGGS)
def test_contrastive_loss_is_the_weighted_sum(how, aggregate):
    layers = ["model.layers.1", "model.layers.3"]
    h, hb, v, mask = {}, {}, {}, None
    for i, l in enumerate(layers):
        h[l], hb[l], v[l], mask = random_states(seed=i)
    g = torch.Generator().manual_seed(5)
    nll_base = torch.rand(6, 6, generator=g) * 3
    nll = nll_base + torch.randn(6, 6, generator=g)
    scale = {layers[0]: 0.5, layers[1]: 2.0}
    cfg = LossConfig(w_contrast=0.3, w_shift=1.0, clamp=1.5, bound=how, aggregate=aggregate, target="clamp",
                     nll_weight=10.0, nll_margin=0.1, nll_power=2.0)
    pb = {l: project(hb[l], v[l], scale[l]) for l in layers}
    up = contrastive_loss(h, pb, nll, nll_base, mask, v, scale, 1.0, cfg)
    down = contrastive_loss(h, pb, nll, nll_base, mask, v, scale, -1.0, cfg)
    for t in (up, down):
        want = 0.3 * t["contrast"] + 1.0 * t["shift"] + 10.0 * t["nll_barrier"]
        torch.testing.assert_close(t["loss"], want)
        assert t["nll_barrier"] > 0
        for l in layers:
            assert f"proj_contrast/{l}" in t and f"proj_shift/{l}" in t
    # mean over the loss layers of the per-layer terms
    per = [projection_terms(h[l], project(hb[l], v[l], scale[l]), v[l], scale[l], mask, 1.0, 1.5, how, aggregate) for l in layers]
    torch.testing.assert_close(up["contrast"], (per[0]["contrast"] + per[1]["contrast"]) / 2)
    torch.testing.assert_close(down["contrast"], -up["contrast"])
    torch.testing.assert_close(down["shift"], -up["shift"])
    torch.testing.assert_close(down["nll_barrier"], up["nll_barrier"])  # the barrier has no sign
