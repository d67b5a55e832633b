"""Compare trained runs side by side: ``python -m adapters compare --config configs/compare/kinds.yaml``.

The comparison config lists training configs and overrides applied to all of them::

    runs: [configs/honesty.yaml, configs/boft.yaml, ...]
    overrides: {train.steps: 50, eval.probes: [self_report]}
    seeds: [0, 1, 2]          # optional: each config trained once per seed
    probes: [self_report]     # optional: one table per probe (default self_report)
    out: runs/compare-kinds

Each run trains in its own process (``python -m adapters train``) into ``<out>/<config stem>/``; a run whose
report already exists is reused (``--force`` retrains) and one with a checkpoint is resumed, so
an interrupted comparison continues where it stopped. The tables (``<out>/comparison.md/.csv/.json``)
have, per probe, one row per config: trainable parameters, seconds per training step, the
summary of the trained adapter (score, slope, r2, monotone, valid_frac), neutral ΔNLL at
c = -1 / +1, the shift within the ΔNLL budget up / down, and the held-out projection
separation at c = -1 / 0 / +1 (mean over the loss layers). With several seeds a run is
``<config stem>-s<seed>`` and its row holds the mean over seeds, with the standard deviation
(ddof 1) of score, slope, r2 and the shifts beside them (``<column>_std``); ``monotone`` is then
the share of seeds whose dose-response is monotone. The baselines (prompting, steering vectors,
peers, base) come from the first config's runs, averaged over its seeds the same way.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from .checkpoint import interrupted
from .config import ConfigError, load_config, overrides_from, read_spec, spec_config_path
from .evaluate.report import csv_text, md_table
from .io import atomic_write_text, read_json, write_json
from .quiet import log, verbosity

COLUMNS = ("run", "kind", "seeds", "trainable_params", "step_s", "score", "slope", "r2", "monotone", "valid_frac",
           "dnll_-1", "dnll_+1", "shift_up", "shift_down", "sep_-1", "sep_0", "sep_+1")
WITH_STD = ("score", "slope", "r2", "shift_up", "shift_down")
"""Columns shown as mean ± standard deviation over seeds."""
SUMMARY_KEYS = ("score", "slope", "r2", "monotone", "valid_frac", "shift_up", "shift_down")


class RunFailed(RuntimeError):
    """A training run of the comparison did not finish."""

    def __init__(self, name: str, folder: Path, code: int):
        if code == 143:
            what = "was stopped by SIGTERM (exit 143); its last checkpoint is kept"
        elif code < 0:
            what = f"was killed by signal {-code}"
        else:
            what = f"failed (exit {code}); its error is printed above"
        super().__init__(f"training run {name} ({folder}) {what}. Finished runs are kept: run the same "
                         "compare command again to continue")


def _train_command() -> list[str]:
    """The training command each run of a comparison spawns (train.py as installed)."""
    return [sys.executable, "-m", "adapters", "train"]


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    spec = read_spec(path, "comparison config", ("runs", "overrides", "out", "probes", "seeds"))
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{path}: `seeds` must be a non-empty list of distinct integers, got {seeds!r}")
    probes = spec.get("probes", ["self_report"])
    if not isinstance(probes, list) or not probes or not all(isinstance(p, str) for p in probes):
        raise ConfigError(f"{path}: `probes` must list probe kinds, got {probes!r}")
    runs = spec.get("runs") or []
    if not runs or not all(isinstance(r, str) for r in runs):
        raise ConfigError(f"{path}: `runs` must list training config files")
    overrides = overrides_from(spec.get("overrides"))
    runs = [spec_config_path(r) for r in runs]
    for r in runs:  # validate every config (with the overrides) before training anything
        load_config(r, overrides)
    return {"runs": runs, "overrides": overrides, "out": Path(spec.get("out", "runs/compare")),
            "probes": probes, "seeds": seeds}


def run_row(run_dir: Path, probe: str = "self_report") -> dict:
    """One comparison row from a finished run folder (report.json + timing.json)."""
    report, timing = read_json(run_dir / "report.json"), read_json(run_dir / "timing.json")
    summ = next((r for r in report["summary"] if r["method"] == "adapter" and r["probe"] == probe), None)
    if summ is None:
        raise ValueError(f"{run_dir}/report.json has no adapter row for probe {probe!r}")
    dnll = {r["coeff"]: r["dnll"] for r in report["rows"] if r["method"] == "adapter" and r["probe"] == probe}

    def sep(c):
        vals = [r["separation"] for r in report["separation"] if r["method"] == "adapter" and r["coeff"] == c]
        return sum(vals) / len(vals) if vals else math.nan

    return {"run": run_dir.name, "kind": timing.get("kind", "?"), "trainable_params": timing.get("trainable_parameters"),
            "step_s": timing.get("step_seconds", math.nan), **_summary(summ), "dnll_-1": dnll.get(-1.0, math.nan),
            "dnll_+1": dnll.get(1.0, math.nan), "sep_-1": sep(-1.0), "sep_0": sep(0.0), "sep_+1": sep(1.0)}


def _summary(summ: dict) -> dict:
    """A report's summary row as comparison columns (monotone as 0 / 1, so seeds average it)."""
    out = {k: summ.get(k, math.nan) for k in SUMMARY_KEYS}
    out["monotone"] = float(summ["monotone"]) if "monotone" in summ else math.nan
    return out


def mean_over_seeds(rows: list[dict], name: str) -> dict:
    """One row from the same config trained with several seeds: means, and the score's std.

    A seed whose score is NaN (fewer than 3 valid coefficients: that seed broke the model) is
    not averaged away: the row's score is then NaN too, and ``seeds`` reads "k/n valid"."""
    import statistics

    def finite(v):
        return isinstance(v, (int, float)) and not math.isnan(v)

    valid = [r for r in rows if finite(r.get("score"))]
    seeds = len(rows) if len(valid) == len(rows) else f"{len(valid)}/{len(rows)} valid"
    out = {"run": name, "kind": rows[0]["kind"], "seeds": seeds, "trainable_params": rows[0].get("trainable_params")}
    for c in COLUMNS[4:]:
        if c not in rows[0]:
            continue
        vals = [r[c] for r in rows if finite(r.get(c))]
        out[c] = statistics.fmean(vals) if vals else math.nan
        if c in WITH_STD:
            out[f"{c}_std"] = statistics.stdev(vals) if 1 < len(vals) == len(rows) else math.nan
    if len(valid) < len(rows):
        out["score"] = out["score_std"] = math.nan
    return out


def baseline_rows(run_dir: Path, probe: str = "self_report") -> list[dict]:
    report = read_json(run_dir / "report.json")
    return [{"run": r["method"], "kind": "baseline", "trainable_params": None, **_summary(r),
             "dnll_-1": r.get("dnll_m1", math.nan), "dnll_+1": r.get("dnll_p1", math.nan)}
            for r in report["summary"] if r["method"] != "adapter" and r["probe"] == probe]


def _fmt(v, signed: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:+.3f}" if signed else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict], title: str) -> str:
    """One table per probe (rows carry a ``probe`` key; rows without one form a single table)."""
    lines = [f"# {title}", ""]
    for probe in dict.fromkeys(r.get("probe") for r in rows):
        lines += ([f"## {probe}", ""] if probe else []) + _table([r for r in rows if r.get("probe") == probe]) + [""]
    lines += ["score/slope/r2/monotone/valid_frac: the trained adapter's dose-response on the probe over the "
              "fit range (baselines: the same probe and runs). ΔNLL: neutral-text NLL change (nats/token). "
              "shift up / down: the largest move of the probe score above / below its value at c = 0 among "
              "coefficients whose neutral ΔNLL is within the budget (eval.shift_budget). "
              "sep: held-out (h_pos - h_neg)·v / s at the loss layers (mean). With seeds: means over the "
              "seeds ± standard deviation; monotone is then the share of seeds."]
    return "\n".join(lines) + "\n"


def _cell(r: dict, c: str) -> str:
    text = _fmt(r.get(c), signed=c not in ("step_s", "r2", "valid_frac", "monotone"))
    std = r.get(f"{c}_std")
    return text if std is None or (isinstance(std, float) and math.isnan(std)) else f"{text} ± {std:.2f}"


def _table(rows: list[dict]) -> list[str]:
    head = ["run", "kind", "seeds", "trainable params", "s/step", "score", "slope", "r2", "monotone", "valid_frac",
            "ΔNLL -1", "ΔNLL +1", "shift up", "shift down", "sep -1", "sep 0", "sep +1"]
    return md_table(head, [[_cell(r, c) for c in COLUMNS] for r in rows], align="ll" + "r" * (len(head) - 2))


def compare(spec: dict, force: bool = False, log=log.info, flags: tuple[str, ...] = ()) -> list[dict]:
    """Train (or reuse) every run of ``spec`` and tabulate them; ``flags`` (-q / -v) go to each run."""
    out: Path = spec["out"]
    train = [*_train_command(), *flags]
    seeds = spec.get("seeds")
    jobs = [(Path(p).stem, p, None) for p in spec["runs"]] if not seeds else \
        [(f"{Path(p).stem}-s{s}", p, s) for p in spec["runs"] for s in seeds]
    folders = []
    for name, cfg_path, seed in jobs:
        folder = out / name
        folders.append(folder)
        if (folder / "report.json").is_file() and (folder / "timing.json").is_file() and not force:
            log(f"[compare] {name}: finished run found, reused")
            continue
        if interrupted(folder):  # interrupted mid-training: continue it
            cmd = [*train, "--resume", str(folder)]
        else:  # the folder is this comparison's own: a run of it that never finished is replaced
            cmd = [*train, "--config", cfg_path, "--log.runs_dir", str(out), "--log.name", name,
                   "--overwrite"]
            for k, v in spec["overrides"]:
                cmd += [f"--{k}", v]
            if seed is not None:
                cmd += ["--train.seed", str(seed)]
        log(f"[compare] {name}: {' '.join(cmd)}")
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise RunFailed(name, folder, code)
    n = len(seeds) if seeds else 1
    rows, per_run = [], []
    for probe in spec["probes"]:
        runs = [{**run_row(f, probe), "probe": probe} for f in folders]
        per_run += runs
        rows += [{**mean_over_seeds(runs[i:i + n], Path(spec["runs"][i // n]).stem), "probe": probe}
                 for i in range(0, len(runs), n)]
        base = [baseline_rows(f, probe) for f in folders[:n]]  # the first config's runs (one per seed)
        rows += [{**mean_over_seeds([b[j] for b in base], base[0][j]["run"]), "kind": "baseline", "probe": probe}
                 for j in range(len(base[0]))]
    title = "Trained adapters and baselines, by probe"
    cols = ("probe",) + COLUMNS + tuple(f"{c}_std" for c in WITH_STD)
    atomic_write_text(out / "comparison.md", markdown(rows, title))
    atomic_write_text(out / "comparison.csv", csv_text(rows, cols))
    write_json(out / "comparison.json", {"probes": spec["probes"], "rows": rows, "runs": per_run})
    log(markdown(rows, title))
    return rows


def main(args) -> int:
    try:
        spec = load_spec(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        compare(spec, force=args.force, flags={-1: ("-q",), 0: (), 1: ("-v",)}[verbosity(args)])
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["compare", "load_spec", "run_row", "markdown"]
