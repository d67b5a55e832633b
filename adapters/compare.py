"""Compare trained runs side by side: ``python -m adapters compare --config configs/compare/kinds.yaml``.

The comparison config lists training configs and overrides applied to all of them::

    runs: [configs/honesty.yaml, configs/boft.yaml, ...]
    overrides: {train.steps: 50, eval.probes: [self_report]}
    out: runs/compare-kinds

Each run trains in its own process (``train.py``) into ``<out>/<config stem>/``; a run whose
report already exists is reused (``--force`` retrains) and one with a checkpoint is resumed, so
an interrupted comparison continues where it stopped. The table (``<out>/comparison.md/.csv/.json``) has one row per run:
trainable parameters, seconds per training step, the summary of the trained adapter on the
first probe (score, slope, r2, valid_frac), neutral ΔNLL at c = -1 / +1, and the held-out
projection separation at c = -1 / 0 / +1 (mean over the loss layers).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import yaml

from .config import ConfigError, load_config
from .io import atomic_write_text, read_json, write_json

COLUMNS = ("run", "kind", "trainable_params", "step_s", "score", "slope", "r2", "valid_frac",
           "dnll_-1", "dnll_+1", "sep_-1", "sep_0", "sep_+1")


def _train_script() -> Path:
    script = Path(__file__).resolve().parents[1] / "train.py"
    if not script.is_file():
        raise ConfigError(f"compare runs train.py from a source checkout; {script} does not exist")
    return script


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    unknown = set(spec) - {"runs", "overrides", "out", "probe"} if isinstance(spec, dict) else {"(not a mapping)"}
    if unknown:
        raise ConfigError(f"{path}: a comparison config has the keys runs, overrides, out, probe; "
                          f"unexpected: {sorted(unknown)}")
    runs = spec.get("runs") or []
    if not runs or not all(isinstance(r, str) for r in runs):
        raise ConfigError(f"{path}: `runs` must list training config files")
    overrides = [(k, yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
                  if not isinstance(v, str) else v) for k, v in (spec.get("overrides") or {}).items()]
    root = Path(__file__).resolve().parents[1]  # relative paths: from the cwd, else the checkout
    runs = [r if Path(r).is_file() else str(root / r) for r in runs]
    for r in runs:  # validate every config (with the overrides) before training anything
        load_config(r, overrides)
    return {"runs": runs, "overrides": overrides, "out": Path(spec.get("out", "runs/compare")),
            "probe": spec.get("probe", "self_report")}


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
            "step_s": timing.get("step_seconds", math.nan), "score": summ["score"], "slope": summ["slope"],
            "r2": summ["r2"], "valid_frac": summ["valid_frac"], "dnll_-1": dnll.get(-1.0, math.nan),
            "dnll_+1": dnll.get(1.0, math.nan), "sep_-1": sep(-1.0), "sep_0": sep(0.0), "sep_+1": sep(1.0)}


def baseline_rows(run_dir: Path, probe: str = "self_report") -> list[dict]:
    report = read_json(run_dir / "report.json")
    return [{"run": r["method"], "kind": "baseline", "score": r["score"], "slope": r["slope"], "r2": r["r2"],
             "valid_frac": r["valid_frac"]} for r in report["summary"] if r["method"] != "adapter" and r["probe"] == probe]


def _fmt(v, signed: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:+.3f}" if signed else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict], title: str) -> str:
    head = ["run", "kind", "trainable params", "s/step", "score", "slope", "r2", "valid_frac",
            "ΔNLL -1", "ΔNLL +1", "sep -1", "sep 0", "sep +1"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), signed=c not in ("step_s", "r2", "valid_frac"))
                                       for c in COLUMNS) + " |")
    lines += ["", "score/slope/r2/valid_frac: the trained adapter's dose-response on the probe over the sweep "
              "(baselines: the same probe, from the first run). ΔNLL: neutral-text NLL change (nats/token). "
              "sep: held-out (h_pos - h_neg)·v / s at the loss layers (mean)."]
    return "\n".join(lines) + "\n"


def compare(spec: dict, force: bool = False, log=print) -> list[dict]:
    out: Path = spec["out"]
    script = _train_script()
    folders = []
    for cfg_path in spec["runs"]:
        name = Path(cfg_path).stem
        folder = out / name
        folders.append(folder)
        if (folder / "report.json").is_file() and (folder / "timing.json").is_file() and not force:
            log(f"[compare] {name}: finished run found, reused")
            continue
        if (folder / "checkpoint").is_dir():  # interrupted mid-training: continue it
            cmd = [sys.executable, str(script), "--resume", str(folder)]
        else:
            cmd = [sys.executable, str(script), "--config", cfg_path, "--log.runs_dir", str(out), "--log.name", name]
            for k, v in spec["overrides"]:
                cmd += [f"--{k}", v]
        log(f"[compare] {name}: {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
    rows = [run_row(f, spec["probe"]) for f in folders]
    rows += baseline_rows(folders[0], spec["probe"])
    title = f"Adapter kinds on probe {spec['probe']}"
    atomic_write_text(out / "comparison.md", markdown(rows, title))
    atomic_write_text(out / "comparison.csv", ",".join(COLUMNS) + "\n" + "".join(
        ",".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + "\n" for r in rows))
    write_json(out / "comparison.json", {"probe": spec["probe"], "rows": rows})
    log(markdown(rows, title))
    return rows


def main(args) -> int:
    try:
        spec = load_spec(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        compare(spec, force=args.force)
    except subprocess.CalledProcessError as e:
        print(f"error: a training run failed (exit {e.returncode}); finished runs are kept, rerun to resume",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["compare", "load_spec", "run_row", "markdown"]
