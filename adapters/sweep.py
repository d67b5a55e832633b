"""Steering-vector sweep over direction methods x layer types, one table.

    python -m adapters sweep --config configs/sweep/layer_types.yaml

The sweep config names a training config for the model, data and evaluation settings, the
layer types and the direction methods, and overrides for that config::

    config: configs/honesty.yaml
    layer_types: [model.layers.{N}, model.layers.{N}.mlp.down_proj, ...]
    methods: [pca_diff, mean_diff, svd_grad, fisher_steer_reg2, ...]
    baselines: [prompting, base]            # evaluated once, in the same table (any baseline
                                            # but the per-type vectors: prompting, base, peers)
    overrides: {eval.probes: [self_report], directions.n_layers: 3}
    out: runs/sweep-layer-types

For each layer type the directions of every method are fitted from one collection of hidden
states (and one forward/backward for the gradient methods) at the candidate layers of that
type, the loss-layer rule of ``directions`` picks the layers, and the steering vector v_l·s_l
at those layers is swept over eval.coeffs with every coefficient in one batched pass. A
random direction of the pca_diff vector's norm is the per-type control. Rows are named
``<layer type>:<method>``; the table is sorted by score. Finished layer types are kept in
``<out>/parts/`` and reused when the sweep is run again with the same layer type, methods,
coefficients, probes and model (``--force`` recomputes them).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from .config import ConfigError, load_config, overrides_from, read_spec, spec_config_path
from .io import read_json, write_json
from .quiet import log

KEYS = ("config", "layer_types", "methods", "baselines", "overrides", "out")


def short_name(pattern: str) -> str:
    """model.layers.{N}.mlp.down_proj -> mlp.down_proj; model.layers.{N} -> layers."""
    tail = pattern.split("{N}", 1)[1].lstrip(".") if "{N}" in pattern else pattern
    return tail or "layers"


def load_spec(path: str | Path) -> dict:
    from .config import BASELINES
    from .directions import METHODS
    from .evaluate.methods import NEEDS_DIRECTIONS

    path = Path(path)
    spec = read_spec(path, "sweep config", KEYS)
    problems = []
    types, methods = spec.get("layer_types") or [], spec.get("methods") or []
    if not types or not all(isinstance(t, str) for t in types):
        problems.append("`layer_types` must list module patterns such as model.layers.{N}.mlp")
    if not methods or not all(isinstance(m, str) for m in methods):
        problems.append("`methods` must list direction methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        problems.append(f"unknown direction methods {unknown}; valid: {list(METHODS)}")
    baselines = spec.get("baselines", ["prompting", "base"]) or []
    allowed = [b for b in BASELINES if b not in NEEDS_DIRECTIONS]  # those come per layer type
    bad = [b for b in baselines if b not in allowed]
    if bad:
        problems.append(f"sweep baselines may be {', '.join(allowed)}; got {bad}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    overrides = overrides_from(spec.get("overrides"))
    cfg = load_config(spec_config_path(spec.get("config", "configs/honesty.yaml")), overrides)
    return {"cfg": cfg, "layer_types": types, "methods": methods, "baselines": baselines,
            "out": Path(spec.get("out", "runs/sweep"))}


def _slug(pattern: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", short_name(pattern))


def sweep(spec: dict, force: bool = False, log=log.info):
    """Run the sweep; return the Report (every layer type x method, plus the baselines)."""
    from .directions import fit_methods
    from .evaluate.methods import Inputs, baseline_methods, pca_vectors, random_vectors, vector_method
    from .evaluate.report import Report
    from .evaluate.sweep import run_sweep, signal_notes
    from .pipeline import base
    from .probes import load_probe

    cfg, out = spec["cfg"], spec["out"]
    # every layer type is checked against the model before any work
    run = base(dataclasses.replace(cfg, directions=dataclasses.replace(cfg.directions,
                                                                       candidates=spec["layer_types"])))
    model, tok, checksum, train_pairs, val_pairs = run.model, run.tokenizer, run.checksum, run.train_pairs, \
        run.val_pairs
    probes = [load_probe(k, cfg.eval, tok) for k in cfg.eval.probes]
    report = Report()

    def run_part(name: str, what: dict, make_methods):
        path = out / "parts" / f"{name}.json"
        what = {**what, "coeffs": cfg.eval.coeffs, "probes": cfg.eval.probes, "model": cfg.model.name}
        part = read_json(path) if path.is_file() and not force else None
        if part is not None and part.get("what") == what:
            log(f"[sweep] {name}: reused {path}")
        else:
            log(f"[sweep] {name}")
            r = run_sweep(model, tok, make_methods(), probes, cfg.eval, log)
            part = {"what": what, "rows": r.rows, "summary": r.summary}
            write_json(path, part)
        report.rows.extend(part["rows"])
        report.summary.extend(part["summary"])

    if spec["baselines"]:
        run_part("baselines", {"baselines": spec["baselines"]},
                 lambda: baseline_methods(spec["baselines"], Inputs(model, tok, cfg, train_pairs=train_pairs)))
    for pattern in spec["layer_types"]:
        ltype = short_name(pattern)

        def methods(pattern=pattern, ltype=ltype):
            dcfg = dataclasses.replace(cfg.directions, candidates=[pattern])
            fitted = fit_methods(model, tok, train_pairs, val_pairs, dcfg, cfg.data.max_length, spec["methods"])
            ms = [vector_method(model, pca_vectors(d), cfg.eval.coeffs, f"{ltype}:{name}")
                  for name, d in fitted.items()]
            ref = pca_vectors(fitted.get("pca_diff", next(iter(fitted.values()))))
            ms.append(vector_method(model, random_vectors(ref, cfg.train.seed), cfg.eval.coeffs, f"{ltype}:random"))
            return ms

        run_part(_slug(pattern), {"pattern": pattern, "methods": spec["methods"]}, methods)
        checksum.verify(model, f"after the {ltype} sweep")
    signal_notes(report)
    return report


def write(report, out: Path, title: str, wandb_mode: str = "disabled", project: str = "contrastive-adapters"):
    from .evaluate.report import log_wandb, write_report

    paths = write_report(report, out, title=title, plot_top=8)
    if wandb_mode != "disabled":
        log_wandb(report, paths, project=project, name=out.name, mode=wandb_mode, folder=out)
    return paths


def main(args) -> int:
    from .errors import UserError
    from .pipeline import Refused

    try:
        spec = load_spec(args.config)
        report = sweep(spec, force=args.force)
    except (UserError, Refused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = f"Steering vectors: methods x layer types ({spec['cfg'].model.name})"
    paths = write(report, spec["out"], title, spec["cfg"].log.wandb, spec["cfg"].log.project)
    from .evaluate.report import markdown

    log.info(markdown(report, title, rows=False))
    print(f"wrote {paths['md']}")
    return 0
