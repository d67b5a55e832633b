"""Batched coefficient sweep vs the per-coefficient loop, side by side on the same model.

    python bench/eval_sweep.py [--model bundled] [--dtype auto] [--repeats 3] [--kind lora]

The evaluation sweep of a per-example kind (additive, LoRA, ETHER, the steering-vector
baselines) runs every coefficient of eval.coeffs in the same forward passes (rows item-major,
each row at its own c), and computes the decoder layers below the method's first steered
layer once per item (``hidden.shared_prefix``). This times ``evaluate.sweep.score_method`` on the
default probes and the neutral text three ways, alternating (so a slow-down of the machine hits
all): looped (one pass per coefficient), batched without the shared prefix, and batched with it
(the evaluation's path), for the adapter kind of configs/<kind>.yaml with random non-zero
parameters and for a steering vector at the PCA vector's depth, and prints the median seconds,
the speed-ups over the loop and the largest |Δy| from the loop.

Then the whole evaluation of the main job's methods (the adapter, the steering vector, a random
vector of its norm, prompting, the base model), side by side: the per-coefficient, per-method
loop against the evaluation's path, which also scores every method's c = 0 row (the base
model) once for all of them, and starts every later pass over the same items at the method's first
steered layer from the base row's states there (``evaluate.sweep.base_row``, ``run_sweep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import base_run  # noqa: E402

from adapters.plan import machine_line  # noqa: E402

KIND_CONFIGS = {"lora": "honesty", "additive": "additive", "ether": "ether"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kind", default="lora", choices=sorted(KIND_CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from adapters.evaluate.methods import (adapter_method, base_method, prompting_method, random_vectors,
                                           vector_method)
    from adapters.evaluate.sweep import _scores, base_row, score_method
    from adapters.hidden import output_dim, resolve
    from adapters.probes import load_probe, neutral_texts
    from adapters.tuners import attach

    run = base_run(ROOT / "configs" / f"{KIND_CONFIGS[args.kind]}.yaml", args)
    cfg, tok = run.cfg, run.tokenizer
    model, adapter = attach(run.model, cfg.adapter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    ev = cfg.eval
    probes = [load_probe(k, ev, tok) for k in ev.probes]
    neutral = neutral_texts(ev.neutral, ev.neutral_items)
    layers = resolve(model, ["model.layers.{N}"], [0.5, 0.55])  # the PCA vector's layers 15, 16
    dim = output_dim(model, layers[0])
    vectors = {layer: torch.randn(dim, generator=g) * 2.0 for layer in layers}
    methods = {f"adapter ({args.kind})": adapter_method(model, ev.coeffs),
               "steering vector": vector_method(model, vectors, ev.coeffs)}
    items = sum(len(p.user) for p in probes)
    print(machine_line(model.dtype))
    print(f"model {args.model}; coefficients {ev.coeffs}; "
          f"probes {ev.probes} ({items} items) + {len(neutral)} neutral paragraphs; batch_size {ev.batch_size}")
    print(f"{'method':<20} {'prefix':>6} {'looped s':>9} {'batched s':>9} {'shared s':>9} {'batched x':>10} "
          f"{'shared x':>10} {'max |Δy|':>9}")
    for name, m in methods.items():
        paths = {"looped": dataclasses.replace(m, per_example=False), "batched": dataclasses.replace(m, prefix=0),
                 "shared": m}
        times, out = {k: [] for k in paths}, {}
        score_method(model, tok, m, probes[:1], neutral[:1], ev.batch_size)  # warm-up
        for _ in range(args.repeats):
            for label, meth in paths.items():
                t = time.perf_counter()
                out[label] = score_method(model, tok, meth, probes, neutral, ev.batch_size)
                times[label].append(time.perf_counter() - t)
        tl, tb, ts = (statistics.median(times[k]) for k in paths)
        dy = max(float(np.abs(out["looped"][0][k] - out[p][0][k]).max()) for k in out["looped"][0]
                 for p in ("batched", "shared"))
        print(f"{name:<20} {m.prefix:>6} {tl:>9.2f} {tb:>9.2f} {ts:>9.2f} {tl / tb:>9.2f}x {tl / ts:>9.2f}x {dy:>9.4f}")

    every = [*methods.values(), vector_method(model, random_vectors(vectors), ev.coeffs, "random"),
             prompting_method(model, cfg.data.positive, cfg.data.negative, ev.prompt_template), base_method(model)]

    def looped():
        return [score_method(model, tok, dataclasses.replace(m, per_example=False), probes, neutral, ev.batch_size)
                for m in every]

    def ours():
        base, store = base_row(model, tok, every, probes, neutral, ev.batch_size)
        return [_scores(model, tok, m, probes, neutral, ev.batch_size, base, store) for m in every]

    times, out = {"looped": [], "ours": []}, {}
    for _ in range(args.repeats):
        for label, fn in (("looped", looped), ("ours", ours)):
            t = time.perf_counter()
            out[label] = fn()
            times[label].append(time.perf_counter() - t)
    tl, to = statistics.median(times["looped"]), statistics.median(times["ours"])
    dy = max(float(np.abs(a[0][k] - b[0][k]).max()) for a, b in zip(out["looped"], out["ours"]) for k in a[0])
    print(f"evaluation of {', '.join(m.name for m in every)} ({sum(len(m.coeffs) for m in every)} method x "
          f"coefficient rows): looped {tl:.2f} s, ours {to:.2f} s, {tl / to:.2f}x; max |Δy| {dy:.4f}")


if __name__ == "__main__":
    main()
