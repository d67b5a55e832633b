"""The summary numbers of a dose-response sweep, from per-coefficient means (NumPy only).

* slope, r2 and p_value of a linear fit of mean y on c over the valid coefficients with
  |c| <= ``fit_range`` (NaN with fewer than 3); valid_frac; score = |slope| · r2 · valid_frac²;
  effect_size = |slope| / std(y at c = 0); min / max of mean y over the valid coefficients.
* monotone: mean y moves the same way between every two neighbouring coefficients of the fit range.
* dnll_m1 / dnll_p1: neutral-text ΔNLL at c = -1 / +1.
* shift_up / shift_down within a ΔNLL budget: among the coefficients whose neutral ΔNLL is at
  most the budget, the largest move of mean y above / below its value at c = 0 (and c_up / c_down,
  where). Rescaling c changes a slope but not this figure, so it compares methods whose
  coefficients mean different things.
"""

from __future__ import annotations

import math

import numpy as np

SUMMARY_COLUMNS = ("method", "slope", "r2", "valid_frac", "effect_size", "p_value", "score", "min", "max", "monotone",
                   "dnll_m1", "dnll_p1", "shift_up", "shift_down", "c_up", "c_down")


def bootstrap_ci(x: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(coeffs, mean_y, valid, y0_items, dnll=None, fit_range: float = math.inf,
              shift_budget: float = 0.15) -> dict:
    """The summary row of a method and probe from per-coefficient means and validity flags, plus the
    dose-response shape (monotone, ΔNLL at ±1) and the shift within the ΔNLL budget."""
    from scipy import stats

    coeffs, mean_y, valid = np.asarray(coeffs, float), np.asarray(mean_y, float), np.asarray(valid, bool)
    dnll = np.zeros_like(coeffs) if dnll is None else np.asarray(dnll, float)
    shift = shift_within(coeffs, mean_y, dnll, shift_budget)  # over the whole sweep
    inside = np.abs(coeffs) <= fit_range
    coeffs, mean_y, valid, dnll_in = coeffs[inside], mean_y[inside], valid[inside], dnll[inside]
    valid_frac = float(valid.mean())
    out = {"valid_frac": valid_frac, "slope": math.nan, "r2": math.nan, "p_value": math.nan,
           "score": math.nan, "effect_size": math.nan, "min": math.nan, "max": math.nan}
    xv, yv = coeffs[valid], mean_y[valid]
    if valid.sum() >= 1:
        out["min"], out["max"] = float(yv.min()), float(yv.max())
    if valid.sum() >= 3 and np.ptp(xv) > 0:
        fit = stats.linregress(xv, yv)
        r2 = float(fit.rvalue ** 2) if np.isfinite(fit.rvalue) else 0.0
        out.update(slope=float(fit.slope), r2=r2, p_value=float(fit.pvalue),
                   score=abs(float(fit.slope)) * r2 * valid_frac ** 2)
        sd = float(np.std(y0_items, ddof=1)) if len(y0_items) > 1 else math.nan
        out["effect_size"] = abs(float(fit.slope)) / sd if sd and sd > 0 else math.nan
    steps = np.diff(mean_y[np.argsort(coeffs)])
    out["monotone"] = bool(len(steps) >= 1 and (np.all(steps > 0) or np.all(steps < 0)))
    at = dict(zip(coeffs.tolist(), dnll_in.tolist()))
    out["dnll_m1"], out["dnll_p1"] = at.get(-1.0, math.nan), at.get(1.0, math.nan)
    out.update(shift)
    return out


def shift_within(coeffs, mean_y, dnll, budget: float = 0.15) -> dict:
    """{shift_up, shift_down} >= 0: the largest move of mean y above / below its value at c = 0
    among the coefficients whose ΔNLL is at most ``budget``."""
    coeffs, mean_y, dnll = (np.asarray(x, float) for x in (coeffs, mean_y, dnll))
    y0 = mean_y[coeffs == 0.0]
    if not len(y0):
        return {"shift_up": math.nan, "shift_down": math.nan}
    ok = dnll <= budget
    c_ok, moved = coeffs[ok], mean_y[ok] - float(y0[0])
    up, down = int(np.argmax(moved)), int(np.argmin(moved))
    return {"shift_up": float(max(0.0, moved[up])), "shift_down": float(max(0.0, -moved[down])),
            "c_up": float(c_ok[up]) if moved[up] > 0 else 0.0, "c_down": float(c_ok[down]) if moved[down] < 0 else 0.0}

