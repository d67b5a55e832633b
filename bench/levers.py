"""The speed levers the evaluation did not take, measured side by side on one eval-shaped forward.

    python bench/levers.py [--model bundled] [--dtype float32] [--batch 16] [--tokens 64] [--no-compile]

One no-grad forward of ``--batch`` rows of ``--tokens`` random tokens through the base model (the
shape of an evaluation batch), median of 5 calls, three ways: torch.inference_mode against
torch.no_grad (what the evaluation uses), torch threads 1-4 (the machine's cores and beyond), and
torch.compile (its compile time, the compiled call, and the recompile that a new sequence length
costs; the evaluation's batches have many lengths).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_time(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    import torch

    from adapters.models import load_base
    from adapters.plan import machine_line
    from adapters.quiet import install

    install()
    torch.set_num_threads(2)
    model, _ = load_base(args.model, args.dtype, "cpu", "none")
    g = torch.Generator().manual_seed(0)

    def batch(tokens):
        ids = torch.randint(100, 20000, (args.batch, tokens), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    x = batch(args.tokens)

    def run(m, grad_off=torch.no_grad):
        with grad_off():
            return m(**x).logits

    print(machine_line(model.dtype))
    print(f"model {args.model}, one forward of {args.batch} x {args.tokens} tokens, median of 5 calls")
    run(model)
    ways = {"no_grad": lambda: run(model), "inference_mode": lambda: run(model, torch.inference_mode)}
    pairs = {k: [] for k in ways}
    for r in range(4):  # alternating, each first in turn: a slower machine, or going first, hits both
        for k in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            pairs[k].append(median_time(ways[k]))
    ng, im = (statistics.median(v) for v in pairs.values())
    print(f"no_grad {ng:.3f} s, inference_mode {im:.3f} s ({ng / im:.3f}x)")
    for n in (1, 2, 3, 4):
        torch.set_num_threads(n)
        print(f"threads {n}: {median_time(lambda: run(model)):.3f} s")
    torch.set_num_threads(2)
    if args.no_compile:
        return
    t = time.perf_counter()
    compiled = torch.compile(model, dynamic=False)
    out = run(compiled)
    first = time.perf_counter() - t
    diff = float((out - run(model)).abs().max())
    times = {"eager": [], "compiled": []}
    for _ in range(3):
        times["eager"].append(median_time(lambda: run(model)))
        times["compiled"].append(median_time(lambda: run(compiled)))
    eager, comp = (statistics.median(v) for v in times.values())
    x = batch(args.tokens + 16)
    t = time.perf_counter()
    run(compiled)
    again = time.perf_counter() - t
    print(f"torch.compile: compile + first call {first:.1f} s; eager {eager:.3f} s, compiled {comp:.3f} s "
          f"({eager / comp:.2f}x), max |Δlogit| {diff:.1e}; a new length ({args.tokens + 16} tokens) recompiles "
          f"in {again:.1f} s")


if __name__ == "__main__":
    main()
