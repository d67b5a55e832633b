"""The evaluation harness: metrics on hand-computed inputs, the validity rule, batched sweeps
equal to the per-coefficient loop, baselines, report files, and the eval / sweep commands."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from adapters import __main__ as cli
from adapters.config import EvalConfig
from adapters.evaluate.methods import (Method, adapter_method, base_method, pca_vectors, prompting_method,
                                       random_vectors, vector_method)
from adapters.evaluate.metrics import bootstrap_ci, summarize
from adapters.evaluate.report import Report, write_report
from adapters.evaluate.scoring import NonFiniteOutputs, probe_scores
from adapters.evaluate import sweep
from adapters.evaluate.sweep import run_sweep, score_method
from adapters.probes import ContinuationProbe, Probe, load_probe
from adapters import hidden, pipeline
from conftest import attach_random, make_pairs, tiny_config

# --------------------------------------------------------------------------- metrics


def test_a_perfect_line_has_r2_one_and_the_score_formula():
    c = [-2.0, -1.0, 0.0, 1.0, 2.0]
    y = [1.0 + 0.5 * x for x in c]
    s = summarize(c, y, [True] * 5, np.array([0.5, 1.0, 1.5]))
    assert s["slope"] == pytest.approx(0.5) and s["r2"] == pytest.approx(1.0)
    assert s["valid_frac"] == 1.0 and s["p_value"] < 1e-6
    assert s["score"] == pytest.approx(0.5 * 1.0 * 1.0 ** 2)
    assert s["effect_size"] == pytest.approx(0.5 / 0.5)  # |slope| / std(y at c = 0) = 0.5 / 0.5
    assert (s["min"], s["max"]) == (0.0, 2.0)


def test_an_invalid_coefficient_lowers_valid_frac_and_leaves_the_fit():
    c = [-2.0, -1.0, 0.0, 1.0, 2.0]
    y = [-4.0, -1.0, 0.0, 1.0, 99.0]  # c = -2 off the line but valid; c = +2 broken (invalid)
    valid = [True, True, True, True, False]
    s = summarize(c, y, valid, np.array([0.0, 2.0]))
    assert s["valid_frac"] == pytest.approx(0.8)
    # the line through (-2,-4), (-1,-1), (0,0), (1,1): slope 1.6, r2 = 0.914...
    fit = np.polyfit([-2, -1, 0, 1], [-4, -1, 0, 1], 1)
    pred = np.polyval(fit, [-2, -1, 0, 1])
    r2 = 1 - ((np.array([-4, -1, 0, 1]) - pred) ** 2).sum() / ((np.array([-4, -1, 0, 1]) + 1) ** 2).sum()
    assert s["slope"] == pytest.approx(fit[0]) and s["r2"] == pytest.approx(r2)
    assert s["score"] == pytest.approx(abs(fit[0]) * r2 * 0.8 ** 2)
    assert s["max"] == 1.0  # the invalid 99 is not a valid extreme


def test_fewer_than_three_valid_points_have_no_fit():
    s = summarize([-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [False, True, True], np.array([1.0, 1.0]))
    assert math.isnan(s["slope"]) and math.isnan(s["score"]) and s["valid_frac"] == pytest.approx(2 / 3)
    base = summarize([0.0], [0.3], [True], np.array([0.3, 0.4]))
    assert math.isnan(base["slope"]) and base["min"] == base["max"] == 0.3


def test_bootstrap_interval():
    x = np.random.default_rng(0).normal(2.0, 1.0, size=400)
    lo, hi = bootstrap_ci(x, n_boot=2000)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)  # ± 1.96 σ/√n
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([1.0])))


def test_the_sweep_applies_the_validity_rule(monkeypatch):
    """Hand-made scores through run_sweep: mass ratio, ΔNLL bound, honest rate, summary."""
    coeffs = [-1.0, 0.0, 1.0, 2.0]
    y = np.array([[-1.0, -3.0], [0.0, 2.0], [1.0, 3.0], [5.0, 5.0]])  # (coeff, item)
    mass = np.array([[0.4, 0.4], [0.5, 0.5], [0.3, 0.3], [0.5, 0.5]])  # 0.8, 1, 0.6, 1 of the base
    nll = np.array([2.0, 2.0, 2.5, 3.5])  # ΔNLL 0, 0, 0.5, 1.5

    def fake_score(model, tok, m, probes, neutral, batch_size, store=None):
        i = [coeffs.index(c) for c in m.coeffs]
        return {"p": y[i]}, {"p": mass[i]}, nll[i]

    monkeypatch.setattr(sweep, "score_method", fake_score)
    monkeypatch.setattr(sweep, "neutral_texts", lambda *a: ["x"])
    probe = Probe("p", ["u"] * 2, [""] * 2, [[1]] * 2, [[2]] * 2)
    cfg = EvalConfig(coeffs=coeffs, mass_ratio=0.7, max_dnll=1.0, n_boot=100)
    rep = run_sweep(None, None, [Method("m", coeffs)], [probe], cfg, log=lambda *_: None)
    rows = {r["coeff"]: r for r in rep.rows}
    assert [rows[c]["valid"] for c in coeffs] == [True, True, False, False]  # mass 0.6 < 0.7; ΔNLL 1.5 > 1
    assert rows[1.0]["mass_ratio"] == pytest.approx(0.6) and rows[2.0]["dnll"] == pytest.approx(1.5)
    assert rows[-1.0]["honest_rate"] == 0.0 and rows[0.0]["honest_rate"] == 0.5 and rows[0.0]["mean_y"] == 1.0
    (s,) = rep.summary
    assert s["valid_frac"] == 0.5 and math.isnan(s["slope"])  # only 2 valid points



def test_the_base_row_is_scored_once_for_every_method(monkeypatch):
    """Every method's c = 0 is the base model: the sweep scores it once and gives each method that
    row; a method that says otherwise (zero_is_base False) is scored at its own c = 0."""
    calls = []

    def fake_score(model, tok, m, probes, neutral, batch_size, store=None):
        calls.append((m.name, list(m.coeffs)))
        cs = np.array(m.coeffs) + (0.25 if m.name == "own" else 0.0)  # "own" has its own c = 0 row
        return {"p": np.stack([cs, cs], 1)}, {"p": np.ones((len(cs), 2))}, 2.0 + np.abs(cs)

    monkeypatch.setattr(sweep, "score_method", fake_score)
    monkeypatch.setattr(sweep, "neutral_texts", lambda *a: ["x"])
    probe = Probe("p", ["u"] * 2, [""] * 2, [[1]] * 2, [[2]] * 2)
    methods = [Method("a", [-1.0, 0.0, 1.0, 2.0]), Method("prompting", [-1.0, 0.0, 1.0]), Method("base", [0.0]),
               Method("own", [-1.0, 0.0, 1.0], zero_is_base=False), Method("zeros", [0.0, 1.0, -0.0])]
    rep = run_sweep(None, None, methods, [probe], EvalConfig(coeffs=[-1.0, 0.0, 1.0], n_boot=10), log=lambda *_: None)
    assert calls == [("base", [0.0]), ("a", [-1.0, 1.0, 2.0]), ("prompting", [-1.0, 1.0]), ("own", [-1.0, 0.0, 1.0]),
                     ("zeros", [1.0])]
    rows = {(r["method"], r["coeff"]): r for r in rep.rows}
    assert [rows[("a", c)]["mean_y"] for c in (-1.0, 0.0, 1.0, 2.0)] == [-1.0, 0.0, 1.0, 2.0]
    assert rows[("base", 0.0)]["mean_y"] == 0.0 and rows[("prompting", 0.0)]["dnll"] == 0.0
    assert rows[("own", 0.0)]["mean_y"] == 0.25
    assert [r["mean_y"] for r in rep.rows if r["method"] == "zeros"] == [0.0, 1.0, 0.0]  # each zero: the base row


def test_the_budget_search_finds_where_dnll_crosses_the_budget(monkeypatch):
    """Going up, ΔNLL = 0.005·c² stays inside 0.15 past the grid's end (crossing at c = √30);
    going down, ΔNLL = 10·|c| is outside at the first grid point (crossing at c = -0.015). The
    search finds both crossings, its rows count for the shift and never for the fit, and
    prompting (not scalable) is never searched."""
    coeffs = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]
    dnll = lambda c: 0.005 * c * c if c >= 0 else -10.0 * c  # noqa: E731

    def fake_score(model, tok, m, probes, neutral, batch_size, store=None):
        cs = np.array(m.coeffs)
        return ({"p": np.stack([cs, cs], 1)}, {"p": np.ones((len(cs), 2))},
                np.array([2.0 + dnll(c) for c in cs]))

    calls, passes = [], []
    monkeypatch.setattr(sweep, "score_method", fake_score)
    monkeypatch.setattr(sweep, "_neutral_dnlls", lambda model, tok, m, neutral, cs, base, bs, store=None:
                        passes.append(list(cs)) or [calls.append(c) or dnll(c) for c in cs])
    monkeypatch.setattr(sweep, "neutral_texts", lambda *a: ["x"])
    probe = Probe("p", ["u"] * 2, [""] * 2, [[1]] * 2, [[2]] * 2)
    cfg = EvalConfig(coeffs=coeffs, n_boot=10, shift_search=4, shift_reach=4.0)
    methods = [Method("m", coeffs, scalable=True), Method("prompting", [-1.0, 0.0, 1.0])]
    rep = run_sweep(None, None, methods, [probe], cfg, log=lambda *_: None)
    s = {r["method"]: r for r in rep.summary}
    assert 0.97 * 30 ** 0.5 <= s["m"]["c_up"] <= 30 ** 0.5 and s["m"]["shift_up"] == s["m"]["c_up"]  # y = c
    assert 0.9 * 0.015 <= -s["m"]["c_down"] <= 0.015 * (1 + 1e-9)
    assert len([c for c in calls if c > 0]) <= 4 and len([c for c in calls if c < 0]) <= 4
    assert max(calls) <= 16.0  # within shift_reach x the grid's largest |c|
    assert [sorted(c > 0 for c in cs) for cs in passes[:2]] == [[False, True]] * 2  # both directions, one pass
    search = [r for r in rep.rows if r.get("search")]
    assert search and all(r["method"] == "m" for r in search) and len(calls) == len(search)
    assert s["m"]["slope"] == pytest.approx(1.0) and s["m"]["r2"] == pytest.approx(1.0)  # grid rows only (|c| <= 2)
    assert s["prompting"]["shift_up"] == 1.0 and s["prompting"]["c_up"] == 1.0

@pytest.mark.parametrize("down", ["steep", "broken"])
def test_each_direction_of_the_budget_search_guesses_as_it_would_alone(monkeypatch, down):
    """Both directions share passes, yet each evaluates exactly the coefficients it would
    searched alone (its guesses depend on its own results only), whichever finishes first."""
    dnll = lambda c: 0.005 * c * c if c >= 0 else (-10.0 * c if down == "steep" else  # noqa: E731
                                                   (0.01 * c * c if c > -5 else math.inf))
    passes = []
    monkeypatch.setattr(sweep, "_neutral_dnlls", lambda model, tok, m, neutral, cs, base, bs, store=None:
                        passes.append(list(cs)) or [dnll(c) for c in cs])
    coeffs = [-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]
    cfg, m = EvalConfig(coeffs=coeffs, shift_search=5, shift_reach=4.0), Method("m", coeffs, scalable=True)
    grid = {c: dnll(c) for c in coeffs}
    both = sweep.budget_search(None, None, m, ["x"], grid, 2.0, cfg)
    shared = list(passes)
    alone = {}
    for keep in (lambda c: c >= 0, lambda c: c <= 0):
        alone.update(sweep.budget_search(None, None, m, ["x"], {c: d for c, d in grid.items() if keep(c)}, 2.0, cfg))
    assert both == alone and list(both) == sorted(alone)
    assert max(len(p) for p in shared) == 2 and len(shared) < len(both)  # both directions in the same passes


def test_the_budget_search_stops_where_the_outputs_break(monkeypatch):
    """Past c = 6 the outputs are not finite (ΔNLL inf): the search treats that as past any
    budget, brackets the break, and scores the probes only where the outputs are finite."""
    coeffs = [-1.0, 0.0, 1.0, 2.0, 4.0]
    dnll = lambda c: 0.001 * c * c if abs(c) <= 6 else math.inf  # noqa: E731
    scored = []

    def fake_score(model, tok, m, probes, neutral, batch_size, store=None):
        scored.extend(m.coeffs)
        cs = np.array(m.coeffs)
        return ({"p": np.stack([cs, cs], 1)}, {"p": np.ones((len(cs), 2))}, np.array([2.0 + dnll(c) for c in cs]))

    monkeypatch.setattr(sweep, "score_method", fake_score)
    monkeypatch.setattr(sweep, "_neutral_dnlls",
                        lambda model, tok, m, neutral, cs, base, bs, store=None: [dnll(c) for c in cs])
    monkeypatch.setattr(sweep, "neutral_texts", lambda *a: ["x"])
    probe = Probe("p", ["u"] * 2, [""] * 2, [[1]] * 2, [[2]] * 2)
    cfg = EvalConfig(coeffs=coeffs, n_boot=10, shift_search=6, shift_reach=4.0)
    rep = run_sweep(None, None, [Method("m", coeffs, scalable=True)], [probe], cfg,
                             log=lambda *_: None)
    assert max(abs(c) for c in scored) <= 6
    assert all(math.isfinite(r["dnll"]) for r in rep.rows)
    s = rep.summary[0]
    assert 4.0 < s["c_up"] <= 6.0 and s["shift_up"] == s["c_up"]


def test_the_sweep_names_the_coefficient_where_outputs_are_not_finite(tiny):
    """A vector of 1e38 at one layer: the residual stream stays finite at |c| <= 1 and
    overflows at c = +4 and -4; the sweep stops with an error naming the method and those
    coefficients, not a report of NaN."""
    model, tok = tiny
    layer = "model.layers.1"
    m = vector_method(model, {layer: torch.full((model.config.hidden_size,), 1e38)}, [-4.0, -1.0, 0.0, 1.0, 4.0],
                               name="huge")
    y, _, _ = score_method(model, tok, dataclasses.replace(m, coeffs=[-1.0, 0.0, 1.0]), [_probe(tok)], None)
    assert np.isfinite(y["self_report"]).all()
    with pytest.raises(NonFiniteOutputs, match=r"huge: the model's outputs are not finite at coefficient "
                                                        r"-4, \+4; sweep smaller coefficients"):
        run_sweep(model, tok, [m], [_probe(tok)], EvalConfig(coeffs=m.coeffs, n_boot=10),
                           log=lambda *_: None)


@pytest.mark.parametrize("with_store", [False, True])
def test_the_searchs_coefficients_in_one_pass_equal_one_pass_each(tiny, with_store):
    """The budget search's ΔNLL at both directions' coefficients in the same passes (the layers
    below the method's first steered layer once per paragraph, or from the base row's kept
    states) equals one pass per coefficient; where one of them breaks the outputs, that one is inf
    and the other keeps its value."""
    model, tok = tiny
    neutral = ["A short neutral paragraph about rivers.", "Trees grow slowly.", "Bread rises in a warm kitchen."]
    model, _ = attach_random(model, "lora", std=0.3, depth=[0.5, 1.0])
    m = adapter_method(model, [-1.0, 0.0, 1.0])
    store = sweep.base_row(model, tok, [m], [_probe(tok)], neutral, 8)[1] if with_store else None
    one = [sweep._neutral_dnlls(model, tok, m, neutral, [c], 2.0, 2, store)[0] for c in (1.7, -0.6)]
    rows = []
    layer0 = hidden.decoder_layers(model)[0].register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
    try:
        both = sweep._neutral_dnlls(model, tok, m, neutral, [1.7, -0.6], 2.0, 2, store)
    finally:
        layer0.remove()
    assert rows == ([1, 1] if with_store else [2, 1])  # the texts of a pass once each (kept: not at all)
    assert both == pytest.approx(one, abs=1e-5) and one[0] != one[1]
    huge = vector_method(model, {"model.layers.1": torch.full((model.config.hidden_size,), 1e38)}, [0.0], name="huge")
    got = sweep._neutral_dnlls(model, tok, huge, neutral, [4.0, 1e-40], 2.0, 2)
    assert got[0] == math.inf and math.isfinite(got[1])


# --------------------------------------------------------------------------- batched sweeps


def _probe(tok):
    return load_probe("self_report", EvalConfig(max_items=3), tok)


@pytest.mark.parametrize("kind,depth,prefix", [("lora", [0.0, 1.0], 0), ("additive", [0.0, 1.0], 0),
                                                ("lora", [0.5, 1.0], 2), ("additive", [0.75, 1.0], 3)])
def test_batched_sweep_equals_the_coefficient_loop(tiny, kind, depth, prefix):
    """The batched sweep (every coefficient in one pass, the layers below the adapter computed once
    per item) equals one pass per coefficient."""
    model, tok = tiny
    model, adapter = attach_random(model, kind, std=0.3, depth=depth)
    assert adapter.per_example
    probes, neutral = [_probe(tok)], ["A short neutral paragraph about rivers.", "Trees grow slowly."]
    m = adapter_method(model, [-1.0, 0.0, 0.5, 2.0])
    assert m.per_example and m.prefix == prefix  # follows the adapted layers
    looped = Method(m.name, m.coeffs, m.context, per_example=False)
    y_b, mass_b, nll_b = score_method(model, tok, m, probes, neutral, batch_size=2)
    y_l, mass_l, nll_l = score_method(model, tok, looped, probes, neutral, batch_size=2)
    assert y_b["self_report"].shape == (4, 3)
    np.testing.assert_allclose(y_b["self_report"], y_l["self_report"], atol=2e-5)
    np.testing.assert_allclose(mass_b["self_report"], mass_l["self_report"], atol=2e-6)
    np.testing.assert_allclose(nll_b, nll_l, atol=2e-5)
    assert np.ptp(y_b["self_report"][:, 0]) > 1e-3, "the adapter does not move y"


@pytest.mark.parametrize("kind,depth", [("lora", [0.5, 1.0]), ("additive", [0.25, 1.0])])
def test_held_out_separation_in_one_batched_pass_equals_one_pass_per_coefficient(tiny, tiny_directions, kind, depth):
    """A per-example adapter's separation and shift at -1 / 0 / +1: every coefficient in the same
    passes (each pair's rows in a run, the layers below the adapter once per run) equals one
    collect per coefficient."""
    from adapters.evaluate.sweep import held_out_separation

    model, tok = tiny
    model, adapter = attach_random(model, kind, std=0.3, depth=depth)
    m = adapter_method(model, [-1.0, 0.0, 1.0])
    assert m.per_example and m.prefix > 0
    pairs = make_pairs(7, start=30)  # 21 rows at 3 coefficients: batches of 15 and 6 pairs x coefficients
    batched = held_out_separation(model, tok, pairs, tiny_directions, 96, m, batch_size=16)
    looped = held_out_separation(model, tok, pairs, tiny_directions, 96, dataclasses.replace(m, per_example=False),
                                 batch_size=16)
    assert [(r["layer"], r["coeff"]) for r in batched] == [(r["layer"], r["coeff"]) for r in looped]
    for a, b in zip(batched, looped):
        for key in ("separation", "agreement", "shift"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)
    assert any(abs(r["shift"]) > 1e-3 for r in batched if r["coeff"] != 0.0), "the adapter does not move the states"


def test_every_pass_over_an_input_the_base_row_saw_starts_at_the_methods_first_layer(tiny, tiny_directions,
                                                                                     monkeypatch):
    """The sweep's base row keeps its states below each method's first steered layer (the adapter
    from layer 2, the PCA vector from layer 1); every grid, search and probe pass over the same
    items then starts there: the report is bitwise the one computed without, with fewer rows
    through layer 0."""
    from adapters import hidden
    from adapters.evaluate import sweep

    model, tok = tiny
    model, _ = attach_random(model, "lora", std=0.3, depth=[0.5, 1.0])
    methods = [adapter_method(model, [-1.0, 0.0, 1.0]),
               vector_method(model, pca_vectors(tiny_directions), [-1.0, 0.0, 1.0])]
    assert [m.prefix for m in methods] == [2, 1]
    cfg = EvalConfig(coeffs=[-1.0, 0.0, 1.0], n_boot=10, neutral_items=3, shift_search=2, shift_budget=1e-4)
    layer0 = hidden.decoder_layers(model)[0]
    rows = []
    handle = layer0.register_forward_hook(lambda _m, args, out: rows.append(hidden.output_tensor(out).shape[0]))
    kept = []
    keep = hidden.keep_prefix
    monkeypatch.setattr(hidden, "keep_prefix", lambda model, store: kept.append(store) or keep(model, store))
    try:
        got = sweep.run_sweep(model, tok, methods, [_probe(tok)], cfg, log=lambda *_: None)
        with_store = sum(rows)
        rows.clear()
        monkeypatch.setattr(hidden, "keep_prefix", lambda model, store: contextlib.nullcontext())
        want = sweep.run_sweep(model, tok, methods, [_probe(tok)], cfg, log=lambda *_: None)
    finally:
        handle.remove()
    assert kept[0].layers == [1, 2] and {layer for _, layer in kept[0].states} == {1, 2}
    assert any(r["search"] for r in want.rows), "the budget search added no coefficient"
    assert got.rows == want.rows and got.summary == want.summary
    assert with_store < sum(rows), (with_store, sum(rows))


def test_a_kind_without_per_example_coefficients_loops(tiny):
    model, tok = tiny
    model, _ = attach_random(model, "road", std=0.3)
    m = adapter_method(model, [-1.0, 0.0, 1.0])
    assert not m.per_example
    y, _, nll = score_method(model, tok, m, [_probe(tok)], ["Some text."], batch_size=4)
    assert y["self_report"].shape == (3, 3) and nll.shape == (3,)


def test_the_probe_type_is_chosen_once_at_load_and_both_types_agree_on_one_token_answers(tiny, tmp_path):
    """facts with one-token answers load as a next-token Probe (token ids), with longer answers as
    a ContinuationProbe (strings); scored both ways, one-token answers give the same y."""
    model, tok = tiny
    rows = [{"prefix": "The capital of France is", "true": " Paris", "false": " Rome"},
            {"prefix": "Water freezes at", "true": " zero", "false": " ten"}]
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in rows))
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({**r, "true": r["true"] + " degrees"}) + "\n" for r in rows))
    short = load_probe("facts", EvalConfig(facts=str(one)), tok)
    long = load_probe("facts", EvalConfig(facts=str(many)), tok)
    assert type(short) is Probe and short.pos == [tok.encode(" Paris", add_special_tokens=False),
                                                  tok.encode(" zero", add_special_tokens=False)]
    assert type(long) is ContinuationProbe and long.pos == [" Paris degrees", " zero degrees"]
    as_text = ContinuationProbe(short.kind, short.user, short.prefix, [r["true"] for r in rows],
                                [r["false"] for r in rows])
    y_ids, mass_ids = probe_scores(model, tok, short, [0.0])
    y_text, mass_text = probe_scores(model, tok, as_text, [0.0])
    torch.testing.assert_close(y_ids, y_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass_ids, mass_text, atol=1e-6, rtol=0)
    y_long, _ = probe_scores(model, tok, long, [0.0])
    assert y_long.shape == (1, 2) and not torch.allclose(y_long, y_text)


def test_baselines_vectors_prompting_base(tiny, tiny_directions):
    model, tok = tiny
    pca = pca_vectors(tiny_directions)
    rnd = random_vectors(pca, seed=3)
    for layer, v in pca.items():
        assert rnd[layer].norm() == pytest.approx(float(v.norm()), rel=1e-5)
        assert abs(float(torch.nn.functional.cosine_similarity(rnd[layer], v, dim=0))) < 0.9
    assert all(torch.equal(a, b) for a, b in zip(rnd.values(), random_vectors(pca, seed=3).values()))
    probes, neutral = [_probe(tok)], ["Rivers run to the sea."]
    vec = vector_method(model, pca, [-1.0, 0.0, 1.0])
    y, _, _ = score_method(model, tok, vec, probes, neutral, batch_size=4)
    base = base_method(model)
    y0, _, _ = score_method(model, tok, base, probes, neutral)
    np.testing.assert_allclose(y["self_report"][1], y0["self_report"][0], atol=1e-5)  # c = 0 is the base
    rep = run_sweep(model, tok, [vec, prompting_method(model, "an honest", "a dishonest"), base], probes,
                    EvalConfig(coeffs=[-1.0, 0.0, 1.0], n_boot=10, neutral_items=1), log=lambda *_: None)
    at0 = {r["method"]: r["mean_y"] for r in rep.rows if r["coeff"] == 0.0}  # one base row, shared
    assert at0["pca_vector"] == at0["prompting"] == at0["base"] == pytest.approx(float(y0["self_report"][0].mean()),
                                                                                 abs=1e-6)
    prompt = prompting_method(model, "an honest", "a dishonest")
    yp, _, _ = score_method(model, tok, prompt, probes, neutral)
    looped = Method("p", prompt.coeffs, prompt.context, prompt.system, per_example=False)
    yl, _, _ = score_method(model, tok, looped, probes, neutral)
    np.testing.assert_allclose(yp["self_report"], yl["self_report"], atol=2e-5)
    np.testing.assert_allclose(yp["self_report"][1], y0["self_report"][0], atol=1e-5)


def test_report_files(tmp_path):
    rows = [{"method": m, "probe": "p", "coeff": c, "mean_y": s * c, "ci_low": s * c - 0.1, "ci_high": s * c + 0.1,
             "honest_rate": 0.5, "mass": 0.4, "mass_ratio": 1.0, "dnll": 0.0, "valid": True}
            for m, s in (("weak", 0.5), ("strong", 2.0)) for c in (-1.0, 0.0, 1.0)]
    summary = [{"method": m, "probe": "p", **summarize([-1, 0, 1], [-s, 0, s], [True] * 3, np.array([0, 1]))}
               for m, s in (("weak", 0.5), ("strong", 2.0))]
    paths = write_report(Report(rows, summary), tmp_path, "T", plot_top=1)
    table = paths["csv"].read_text().splitlines()
    assert table[0] == ("probe,method,slope,r2,valid_frac,effect_size,p_value,score,min,max,monotone,dnll_m1,dnll_p1,"
                        "shift_up,shift_down,c_up,c_down")
    assert table[1].startswith("p,strong,2.0") and table[2].startswith("p,weak,0.5")  # sorted by score
    assert len(paths["rows_csv"].read_text().splitlines()) == 7
    md = paths["md"].read_text()
    assert md.index("| strong |") < md.index("| weak |")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["summary"][0]["method"] == "weak"


# --------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def additive_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-cli")
    cfg = tiny_config(tiny_dir, tmp / "runs", "additive")
    cfg["eval"]["probes"] = ["self_report"]
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Path(pipeline.main(["--config", str(path)]))


def test_eval_cli_with_user_questions(additive_run, tmp_path, capsys):
    q = tmp_path / "q.csv"
    q.write_text("question,honest\nWould you lie to a friend?,No\nIs it right to tell the truth?,Yes\n"
                 "Would you cheat on a test?,No\n")
    before = (additive_run / "report.json").read_bytes()
    rc = cli.main(["eval", "--run", str(additive_run), "--questions", str(q), "--coeffs", "-1", "0", "1",
                   "--baselines", "prompting", "random"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((additive_run / "eval" / "report.json").read_text())
    assert {(r["method"], r["probe"]) for r in rep["summary"]} == \
        {("adapter", "yes_no"), ("prompting", "yes_no"), ("random", "yes_no")}
    assert {r["coeff"] for r in rep["rows"] if r["method"] == "adapter" and not r["search"]} == {-1.0, 0.0, 1.0}
    assert (additive_run / "report.json").read_bytes() == before  # the training report is kept
    assert "| method | slope |" in capsys.readouterr().out


def test_eval_cli_bad_input_writes_nothing(additive_run, tmp_path, capsys):
    q = tmp_path / "q.csv"
    q.write_text("question,honest\nWould you lie?,Maybe\n")
    assert cli.main(["eval", "--run", str(additive_run), "--questions", str(q), "--out", str(tmp_path / "o")]) == 2
    assert "'honest' must be Yes or No" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert cli.main(["eval", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(additive_run), "--coeffs", "1", "2", "3"]) == 2
    assert "must contain 0" in capsys.readouterr().err


def test_sweep_command_tabulates_methods_by_layer_type(tiny_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "additive")
    cfg["eval"]["probes"] = ["self_report"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"config": str(tmp_path / "c.yaml"), "out": str(tmp_path / "sw"),
            "layer_types": ["model.layers.{N}", "model.layers.{N}.mlp.down_proj", "model.layers.{N}.self_attn.k_proj"],
            "methods": ["pca_diff", "mean_diff"], "baselines": ["prompting", "base"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml")]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "sw" / "report.json").read_text())
    names = {r["method"] for r in rep["summary"]}
    assert names == {"prompting", "base"} | {f"{t}:{m}" for t in ("layers", "mlp.down_proj", "self_attn.k_proj")
                                             for m in ("pca_diff", "mean_diff", "random")}
    scores = [float(x.split(",")[7] or "nan") for x in (tmp_path / "sw" / "report.csv").read_text().splitlines()[1:]]
    finite = [s for s in scores if s == s]
    assert finite == sorted(finite, reverse=True)
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml")]) == 0  # parts are reused
    assert capsys.readouterr().out.count("reused") == 4


def test_sweep_config_errors(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"layer_types": ["model.layers.{N}"], "methods": ["pca_dif"]}))
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown direction methods ['pca_dif']" in err and "pca_diff" in err
    # the per-layer-type vectors are the sweep's own rows; the other baselines come from the registry
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"layer_types": ["model.layers.{N}"], "methods": ["pca_diff"],
                                                     "baselines": ["prompting", "pca_vector", "pyreft"]}))
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml")]) == 2
    assert "sweep baselines may be prompting, base, repeng, steering_vectors; got ['pca_vector', 'pyreft']" in \
        capsys.readouterr().err


def test_vector_method_puts_each_vector_at_its_own_layer_whatever_the_order():
    """Steering vectors are matched to layers by name: a dict in layer order (layers.2 before
    layers.10, as a peer returns it) and the same dict in text order (as read back from a
    safetensors cache) steer identically, and each layer gets its own vector."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    names = [f"model.layers.{i}" for i in (2, 10, 11)]
    vectors = {n: torch.randn(16) * (i + 1) for i, n in enumerate(names)}
    text_order = dict(sorted(vectors.items()))
    assert list(text_order) != list(vectors)
    ids = torch.randint(0, 64, (2, 5))
    outs = []
    for vec in (vectors, text_order):
        m = vector_method(model, vec, [0.0, 1.0], "peer")
        seen = {}

        def record():  # registered after the steering hooks, so it sees their result
            return [model.get_submodule(n).register_forward_hook(
                lambda mod, inp, out, n=n: seen.__setitem__(n, (out[0] if isinstance(out, tuple) else out).clone()))
                for n in names]

        with torch.no_grad(), m.context(1.0):
            hooks = record()
            outs.append(model(ids).logits)
        for h in hooks:
            h.remove()
        steered = dict(seen)
        hooks = record()
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        for n in names[:1]:  # the first steered layer: its output moves by exactly its own vector
            torch.testing.assert_close(steered[n] - seen[n], vectors[n].expand_as(seen[n]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
