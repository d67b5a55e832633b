"""The dose-response sweep: every method over its coefficients on every probe, the validity of
each coefficient, the search for the ΔNLL budget's edge, and the summary rows (``evaluate_run``
for a trained run).

Validity (a broken model is not a steered model): coefficient c is valid when
  * the answer tokens keep at least ``mass_ratio`` (default 1/2) of the probability mass they
    had at c = 0 *for the same method*, and
  * mean neutral-text ΔNLL per token is at most ``max_dnll`` (default 1 nat).
The mass rule is relative to the base model's own mass, not absolute: a 135M model puts only
~0.45 of its mass on Yes/No at the first token, so "most of the mass on the answer" would
call the unsteered model broken.

A grid can straddle the ΔNLL budget of the shift (``metrics.shift_within``; steering-vectors'
vectors spend it before c = 0.5) or stop short of it (an adapter still inside it at c = 4), so
for every scalable method (the adapter and every steering vector, not prompting) the sweep
searches on: in each direction it evaluates up to ``shift_search`` more coefficients, each where a
power law k·|c|^e through the two nearest points puts the crossing (past the grid's end up to
``shift_reach`` times its largest |c|, or inside the bracket the grid or search found). Those rows
carry ``search`` = True; they count for the shift only, never for the fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch

from .. import hidden
from ..config import Config, EvalConfig
from ..probes import ContinuationProbe, Probe, load_probe, neutral_texts
from ..quiet import log, progress
from .methods import Inputs, Method, adapter_method, base_method, baseline_methods
from .metrics import bootstrap_ci, shift_within, summarize
from .report import Report
from .scoring import NonFiniteOutputs, neutral_nll, probe_scores


@contextlib.contextmanager
def _per_row(model, m: Method, coeffs: list[float], prefix: int, group: int, store: hidden.PrefixStore | None = None):
    """A block in which a per-example method runs each row at its own coefficient of ``coeffs``,
    and the decoder layers below ``prefix`` once per run of ``group`` identical rows (not at all
    for an input whose state there ``store`` holds)."""
    device = next(model.parameters()).device
    with (m.ctx(torch.tensor(coeffs, dtype=torch.float32, device=device)),
          hidden.shared_prefix(model, prefix, group, store)):
        yield


def score_method(model, tokenizer, m: Method, probes: list[Probe | ContinuationProbe], neutral: list[str],
                 batch_size: int = 16, store: hidden.PrefixStore | None = None):
    """y and mass per probe, (len(m.coeffs), n_items) each, and neutral NLL per coefficient
    (None with ``neutral`` None). ``store``: the base model's states entering the method's first
    steered layer, for the inputs it holds (``base_row``); only for a method whose layers below
    it are the base model's."""
    if m.per_example:  # one group: every coefficient in the same forward passes
        share = len(m.coeffs) if m.system is None else 1  # an item's rows differ only by c: one prefix
        groups = [(list(m.coeffs), contextlib.nullcontext, lambda cs: _per_row(model, m, cs, m.prefix, share, store))]
    else:
        groups = [([c], lambda c=c: m.ctx(c), None) for c in m.coeffs]
    ys, masses, nlls = {p.kind: [] for p in probes}, {p.kind: [] for p in probes}, []
    for coeffs, outer, ctx in groups:
        with outer():
            if neutral is not None:
                nlls.append(neutral_nll(model, tokenizer, neutral, coeffs, m.sys, max(1, batch_size // 4), ctx))
            for p in probes:
                y, mass = probe_scores(model, tokenizer, p, coeffs, m.sys, batch_size, ctx)
                ys[p.kind].append(y)
                masses[p.kind].append(mass)
    cat = lambda d: {k: torch.cat(v).numpy() for k, v in d.items()}  # noqa: E731
    return cat(ys), cat(masses), torch.cat(nlls).numpy() if nlls else None


def _neutral_dnlls(model, tokenizer, m: Method, neutral: list[str], cs: list[float], base_nll: float, batch_size: int,
                   store: hidden.PrefixStore | None = None) -> list[float]:
    """Neutral-text ΔNLL of method ``m`` at each coefficient of ``cs``, in the same passes for a
    per-example method (inf where the outputs are not finite: the model is broken there, past any
    budget; a pass that breaks is redone one coefficient at a time to tell which)."""
    if not m.per_example or m.system is not None or len(cs) == 1:  # (rows that differ by system prompt: one each)
        out = []
        for c in cs:
            try:
                if m.per_example:
                    nll = neutral_nll(model, tokenizer, neutral, [c], m.sys, batch_size,
                                      lambda rows: _per_row(model, m, rows, m.prefix, 1, store))
                else:
                    with m.ctx(c):
                        nll = neutral_nll(model, tokenizer, neutral, [c], m.sys, batch_size)
            except NonFiniteOutputs:
                out.append(math.inf)
                continue
            out.append(float(nll[0]) - base_nll)
        return out
    try:
        nll = neutral_nll(model, tokenizer, neutral, cs, m.sys, batch_size,
                          lambda rows: _per_row(model, m, rows, m.prefix, len(cs), store))
    except NonFiniteOutputs:
        return [d for c in cs for d in _neutral_dnlls(model, tokenizer, m, neutral, [c], base_nll, batch_size, store)]
    return [float(x) - base_nll for x in nll]


def _crossing(a1: float, d1: float, a2: float, d2: float, budget: float) -> float | None:
    """Where ΔNLL = k·|c|^e through (a1, d1) and (a2, d2) reaches ``budget`` (None when the two
    points do not define a rising power law)."""
    if min(a1, a2, d1, d2) <= 0 or a1 == a2 or d1 == d2:
        return None
    e = math.log(d2 / d1) / math.log(a2 / a1)
    return a2 * (budget / d2) ** (1 / e) if e > 0 else None


def _next_guess(known: list[tuple[float, float]], outs: list[tuple[float, float]], budget: float,
                reach: float) -> float | None:
    """The next |c| for ``budget_search`` to evaluate on one side, from the (|c|, ΔNLL) points found
    inside the budget (``known``, increasing |c|) and outside it (``outs``, the nearest last);
    None when that side is done."""
    (a0, d0), (a1, d1) = known[-2] if len(known) > 1 else known[-1], known[-1]
    if not outs:
        if a1 >= reach:
            return None
        g = _crossing(a0, d0, a1, d1, budget)
        return min(reach, 2 * a1 if g is None else min(max(g, 1.25 * a1), 4 * a1))
    ao, do = outs[-1]
    if ao - a1 <= 0.02 * ao:
        return None
    if not math.isfinite(do):  # the outputs broke there: no law to fit, halve the bracket
        g = None
    elif d1 > 0:
        g = _crossing(a1, d1, ao, do, budget)
    elif len(outs) > 1:
        g = _crossing(ao, do, *outs[-2], budget)
    else:
        g = ao * math.sqrt(budget / do)
    w = ao - a1
    return (a1 + ao) / 2 if g is None else min(max(g, a1 + 0.1 * w), ao - 0.1 * w)


def budget_search(model, tokenizer, m: Method, neutral: list[str], grid_dnll: dict[float, float], base_nll: float,
                  eval_cfg: EvalConfig, store: hidden.PrefixStore | None = None) -> dict[float, float]:
    """Coefficients beyond the grid that locate, in each direction, where neutral ΔNLL crosses
    ``eval_cfg.shift_budget``, with at most ``eval_cfg.shift_search`` evaluations per direction. ΔNLL is
    modelled as k·|c|^e through the two points nearest the crossing: past the grid's end the model
    extrapolates (at least 1.25x, at most 4x the last |c| and ``eval_cfg.shift_reach`` x the grid's
    largest |c|; doubling where it cannot be fitted); inside a bracket it interpolates (kept off
    the bracket's ends; through the two nearest outside points, or with e = 2, when the inside one
    is c = 0),
    until the bracket is within 2% of |c|. Where the outputs are not finite, ΔNLL is inf: past the
    budget, and the bracket up to it is halved. Returns {coefficient: ΔNLL} for the new coefficients."""
    budget, bs = eval_cfg.shift_budget, max(1, eval_cfg.batch_size // 4)
    reach = eval_cfg.shift_reach * max(abs(c) for c in grid_dnll)
    found: dict[float, float] = {}
    sides = {}  # sign -> (known: (|c|, ΔNLL) inside the budget, increasing |c|; outs: outside, the nearest last)
    for sign in (1.0, -1.0):
        side = sorted((abs(c), d) for c, d in grid_dnll.items() if c * sign > 0)
        if not side:
            continue
        known, outs = [(0.0, 0.0)], []
        for a, d in side:
            if d > budget:
                outs = [(a, d)]
                break
            known.append((a, d))
        sides[sign] = (known, outs)

    for _ in range(eval_cfg.shift_search):  # both directions' next coefficients in the same passes
        todo = {sign: a for sign, (known, outs) in sides.items()
                if (a := _next_guess(known, outs, budget, reach)) is not None}
        if not todo:
            break
        cs = [sign * a for sign, a in todo.items()]
        for (sign, a), c, d in zip(todo.items(), cs, _neutral_dnlls(model, tokenizer, m, neutral, cs, base_nll, bs,
                                                                    store)):
            found[c] = d
            known, outs = sides[sign]
            (known if d <= budget else outs).append((a, d))
        sides = {sign: sides[sign] for sign in todo}
    return {c: d for c, d in sorted(found.items()) if c not in grid_dnll}


def _scores(model, tokenizer, m: Method, probes, neutral: list[str], batch_size: int, base, store=None):
    """``score_method`` of ``m`` over its coefficients, its c = 0 row taken from ``base`` (the base
    model's scores, computed once for every method) where ``m.zero_is_base``."""
    if not m.zero_is_base:
        return score_method(model, tokenizer, m, probes, neutral, batch_size, store)
    rest = [c for c in m.coeffs if c != 0.0]
    if not rest:
        ys, masses, nlls = base
    else:
        ys, masses, nlls = score_method(model, tokenizer, dataclasses.replace(m, coeffs=rest), probes, neutral,
                                        batch_size, store)
    # row j: the base row where c = 0, else the next of the method's own rows (their order is m.coeffs')
    rows = np.cumsum([c != 0.0 for c in m.coeffs]) - 1
    take = lambda own, shared: np.stack([shared[0] if c == 0.0 else own[r]  # noqa: E731
                                         for c, r in zip(m.coeffs, rows)])
    return ({k: take(v, base[0][k]) for k, v in ys.items()}, {k: take(v, base[1][k]) for k, v in masses.items()},
            take(nlls, base[2]))


def base_row(model, tokenizer, methods: list[Method], probes, neutral: list[str], batch_size: int):
    """Every method's c = 0 row (the base model), scored once for all (None, None when no method
    takes it), and the ``PrefixStore`` of its states entering each per-example method's first
    steered layer: every later pass of such a method over the same probe items or neutral
    paragraphs starts there."""
    if not any(m.zero_is_base for m in methods):
        return None, None
    store = hidden.PrefixStore(m.prefix for m in methods if m.per_example and m.system is None)
    try:
        with hidden.keep_prefix(model, store):
            return score_method(model, tokenizer, base_method(model), probes, neutral, batch_size), store
    except NonFiniteOutputs as e:
        raise NonFiniteOutputs(f"base: {e}") from None


def run_sweep(model, tokenizer, methods: list[Method], probes: list[Probe | ContinuationProbe], eval_cfg: EvalConfig,
              log=log.info) -> Report:
    neutral = neutral_texts(eval_cfg.neutral, eval_cfg.neutral_items)
    report = Report()
    base, store = base_row(model, tokenizer, methods, probes, neutral, eval_cfg.batch_size)
    for m in progress(methods, "evaluation", unit="method"):
        kept = store if m.zero_is_base else None  # its layers below m.prefix are the base model's
        try:
            ys, masses, nlls = _scores(model, tokenizer, m, probes, neutral, eval_cfg.batch_size, base, kept)
        except NonFiniteOutputs as e:
            raise NonFiniteOutputs(f"{m.name}: {e}; sweep smaller coefficients (eval.coeffs)") from None
        coeffs, i0 = list(m.coeffs), m.coeffs.index(0.0)
        base_nll = float(nlls[i0])
        found = {}
        if m.scalable and eval_cfg.shift_search > 0:
            found = budget_search(model, tokenizer, m, neutral, {c: float(n) - base_nll for c, n in zip(coeffs, nlls)},
                                  base_nll, eval_cfg, kept)
        extra = [c for c, d in found.items() if math.isfinite(d)]  # not where the model broke
        if extra:  # the probes at the search's coefficients (their ΔNLL is known)
            ys2, masses2, _ = score_method(model, tokenizer, dataclasses.replace(m, coeffs=extra), probes, None,
                                           eval_cfg.batch_size, kept)
            ys = {k: np.concatenate([ys[k], ys2[k]]) for k in ys}
            masses = {k: np.concatenate([masses[k], masses2[k]]) for k in masses}
            nlls = np.concatenate([nlls, [base_nll + found[c] for c in extra]])
        all_coeffs, n_grid = coeffs + extra, len(coeffs)
        for p in probes:
            y_all, mass_all = ys[p.kind], masses[p.kind]
            base_mass = float(mass_all[i0].mean())
            means, valid, dn = [], [], []
            for j, c in enumerate(all_coeffs):
                y = y_all[j]
                lo, hi = bootstrap_ci(y, eval_cfg.n_boot)
                ratio = float(mass_all[j].mean()) / base_mass if base_mass > 0 else math.nan
                dnll = float(nlls[j]) - base_nll
                ok = bool(ratio >= eval_cfg.mass_ratio and dnll <= eval_cfg.max_dnll)
                report.rows.append({"method": m.name, "probe": p.kind, "coeff": float(c), "mean_y": float(y.mean()),
                                    "ci_low": lo, "ci_high": hi, "honest_rate": float((y > 0).mean()),
                                    "mass": float(mass_all[j].mean()), "mass_ratio": ratio, "dnll": dnll,
                                    "valid": ok, "search": j >= n_grid})
                means.append(float(y.mean()))
                valid.append(ok)
                dn.append(dnll)
            s = summarize(coeffs, means[:n_grid], valid[:n_grid], y_all[i0], dn[:n_grid], eval_cfg.fit_range,
                          eval_cfg.shift_budget)
            s.update(shift_within(all_coeffs, means, dn, eval_cfg.shift_budget))
            report.summary.append({"method": m.name, "probe": p.kind, **s})
            log(f"  {m.name:>16} {p.kind:<11} slope {s['slope']:+.2f} r2 {s['r2']:.2f} "
                f"valid {s['valid_frac']:.2f} score {s['score']:.2f} shift@{eval_cfg.shift_budget:g} "
                f"+{s['shift_up']:.2f} (c {s['c_up']:+.3g}) / -{s['shift_down']:.2f} (c {s['c_down']:+.3g})")
    signal_notes(report)
    return report


def signal_notes(report: Report) -> None:
    """Add a note for each probe prompting cannot move (the probe has no signal on this model)."""
    for probe in sorted({r["probe"] for r in report.rows}):
        rows = {r["coeff"]: r for r in report.rows if r["method"] == "prompting" and r["probe"] == probe}
        if -1.0 in rows and 1.0 in rows:
            lo, hi = rows[-1.0], rows[1.0]
            if not (hi["ci_low"] > lo["ci_high"]):
                report.notes.append(f"{probe}: no behavioural signal for this probe on this model (prompting "
                                    f"the honest vs dishonest persona does not separate y: "
                                    f"{lo['mean_y']:+.2f} vs {hi['mean_y']:+.2f}).")


def _collect_at(model, tokenizer, pairs, layers: list[str], max_length: int, batch_size: int, m: Method,
                cs: list[float]) -> dict[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``directions.collect`` at every coefficient of ``cs`` in the same passes, for a per-example
    method: each pair once per coefficient on consecutive rows (batches hold whole runs), the
    decoder layers below ``m.prefix`` once per run (below none of ``layers``: they are recorded)."""
    from ..directions import collect

    k = len(cs)
    prefix = min([m.prefix, *(hidden.layer_index(layer) for layer in layers)])
    # [pos; neg] halves, each pair's k rows in a run: c cycles through cs
    around = lambda rows: _per_row(model, m, list(cs) * (rows // k), prefix, k)  # noqa: E731
    got = collect(model, tokenizer, [p for p in pairs for _ in cs], layers, max_length,
                  max(k, batch_size - batch_size % k), around=around)
    return {c: {layer: (pos[i::k], neg[i::k]) for layer, (pos, neg) in got.items()} for i, c in enumerate(cs)}


@torch.no_grad()
def held_out_separation(model, tokenizer, val_pairs, directions, max_length, method: Method | None = None,
                        coeffs=(-1.0, 0.0, 1.0), batch_size=16) -> list[dict]:
    """Held-out pairs' projections on the frozen references at each loss layer and coefficient,
    in units of s_l, on the last token:
      separation = mean (h_pos - h_neg)·v / s          (the contrast the ReprPO term trains)
      shift      = mean (h^c - h^0)·v / s over both members (what the shift term trains)."""
    from ..directions import collect

    method = method or adapter_method(model, coeffs)
    cs = sorted(set(coeffs) | {0.0}, key=lambda c: c != 0.0)
    if method.per_example:
        hs = _collect_at(model, tokenizer, val_pairs, directions.selected, max_length, batch_size, method, cs)
    else:
        hs = {}
        for c in cs:
            with method.ctx(c):
                hs[c] = collect(model, tokenizer, val_pairs, directions.selected, max_length, batch_size)
    out = []
    for c in coeffs:
        for layer in directions.selected:
            v, s = directions.v(layer), directions.scale[layer]
            (pos, neg), (pos0, neg0) = hs[c][layer], hs[0.0][layer]
            d = (pos - neg) @ v / s
            shift = torch.cat([pos - pos0, neg - neg0]) @ v / s
            out.append({"layer": layer, "coeff": c, "separation": float(d.mean()),
                        "agreement": float((d > 0).float().mean()), "shift": float(shift.mean())})
    return out


def evaluate_run(model, tokenizer, directions, train_pairs, val_pairs, cfg: Config,
                 probes: list[Probe | ContinuationProbe] | None = None, log=log.info) -> Report:
    """A trained adapter and the baselines over the sweep, plus held-out separation."""
    ev = cfg.eval
    probes = probes or [load_probe(k, ev, tokenizer) for k in ev.probes]
    methods = [adapter_method(model, ev.coeffs)] + baseline_methods(
        ev.baselines, Inputs(model, tokenizer, cfg, directions, train_pairs, val_pairs, log))
    report = run_sweep(model, tokenizer, methods, probes, ev, log)
    rows = held_out_separation(model, tokenizer, val_pairs, directions, cfg.data.max_length, methods[0],
                               batch_size=ev.batch_size)
    report.separation += [{"method": methods[0].name, **r} for r in rows]
    return report
