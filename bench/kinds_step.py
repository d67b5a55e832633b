"""Training-step time of every adapter kind on the same model and batch, side by side.

    python bench/kinds_step.py [--model bundled] [--steps 5] [--batch 6] [--dtype auto]

Each kind gets its own copy of the base model, attached from its config in configs/ (the
same layers, as trained by `python -m adapters compare --config configs/compare/kinds.yaml`).
One training step = base pass (no grad) + c = +1 and c = -1 passes + backward + AdamW step,
exactly ContrastiveModule.step_terms. Kinds are timed round-robin (one step each in turn) so
a slow-down of the machine hits all of them alike; the printed ratio is to LoRA.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KIND_CONFIGS = {"lora": "honesty", "additive": "additive", "boft": "boft", "oft": "oft", "road": "road",
                "ether": "ether"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=6, help="pairs per step (the default train.batch_size)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from adapters import data, directions as dirs
    from adapters.config import load_config
    from adapters.models import BaseChecksum, base_fingerprint, load_base
    from adapters.module import ContrastiveModule
    from adapters.tuners import attach

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "honesty.yaml")
    base, tok = load_base(args.model, args.dtype, "cpu")
    pairs = data.load_pairs(cfg.data)
    d = dirs.compute(base, tok, pairs[:48], pairs[48:64], cfg.directions, cfg.data.max_length,
                     base_fingerprint(base))
    batch = data.PairCollator(tok.pad_token_id)(data.encode_pairs(tok, pairs[64:64 + args.batch], cfg.data.max_length))

    systems = {}
    for kind, name in KIND_CONFIGS.items():
        kcfg = load_config(ROOT / "configs" / f"{name}.yaml")
        model, adapter = attach(copy.deepcopy(base), kcfg.adapter, d)
        system = ContrastiveModule(model, adapter, d, cfg.loss, cfg.train, BaseChecksum(model))
        opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-4)
        n = sum(p.numel() for p in adapter.trainable_parameters())
        systems[kind] = (system, opt, n, [])

    def one_step(system, opt):
        t = time.perf_counter()
        loss = system.step_terms(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for system, opt, _, _ in systems.values():  # warm-up
        one_step(system, opt)
    for _ in range(args.steps):
        for system, opt, _, times in systems.values():
            times.append(one_step(system, opt))

    # the base-weights checksum: one full verify, as a share of a training step
    checksum = BaseChecksum(base)
    verify = []
    for _ in range(5):
        t = time.perf_counter()
        checksum.verify(base)
        verify.append(time.perf_counter() - t)

    ref = statistics.median(systems["lora"][3])
    print(f"model {args.model} ({base.dtype}), {args.batch} pairs x {batch['input_ids'].shape[1]} tokens, "
          f"{args.steps} timed steps per kind, {args.threads} threads")
    print("| kind | trainable params | s/step (median) | min | vs lora |")
    print("|---|---:|---:|---:|---:|")
    for kind, (_, _, n, times) in systems.items():
        med = statistics.median(times)
        print(f"| {kind} | {n:,} | {med:.2f} | {min(times):.2f} | {med / ref:.2f}x |")
    v = statistics.median(verify)
    # after directions, fit start, fit end, before and after saving, after evaluation, + each validation
    calls = 6 + cfg.train.steps // cfg.train.val_every
    print(f"checksum verify (every base tensor): {v:.3f} s = {100 * v / ref:.1f}% of one LoRA step; "
          f"{calls} verifies in a {cfg.train.steps}-step run = {100 * calls * v / (cfg.train.steps * ref):.2f}% "
          "of its training time")


if __name__ == "__main__":
    main()
