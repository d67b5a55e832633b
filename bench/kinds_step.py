"""Training-step time of every adapter kind on the same model and batch, side by side.

    python bench/kinds_step.py [--model bundled] [--steps 5] [--batch 6] [--dtype auto]

Each kind gets its own copy of the base model, attached from its config in configs/ (the
same layers, as trained by `python -m adapters compare --config configs/compare/kinds.yaml`).
One training step = ContrastiveModule.step_terms + backward + AdamW step, in steady state (the
base reference of the batch's pairs is cached after the warm-up step; c = +1 and -1 share one
pass for per-example kinds). Kinds are timed round-robin (one step each in turn) so a
slow-down of the machine hits all of them alike; the printed ratio is to LoRA. The checksum's
cost is in bench/train_step.py.
"""

from __future__ import annotations

import copy
import statistics
import time

from common import ROOT, step_args, step_setup

KIND_CONFIGS = {"lora": "honesty", "additive": "additive", "boft": "boft", "oft": "oft", "road": "road",
                "ether": "ether"}


def main() -> None:
    args = step_args(__doc__)

    import torch

    from adapters.config import load_config
    from adapters.models import BaseChecksum
    from adapters.module import ContrastiveModule
    from adapters.tuners import attach

    cfg, base, tok, d, batch = step_setup(args)

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

    ref = statistics.median(systems["lora"][3])
    print(f"model {args.model} ({base.dtype}), {args.batch} pairs x {batch['input_ids'].shape[1]} tokens, "
          f"{args.steps} timed steps per kind, {args.threads} threads")
    print("| kind | trainable params | s/step (median) | min | vs lora |")
    print("|---|---:|---:|---:|---:|")
    for kind, (_, _, n, times) in systems.items():
        med = statistics.median(times)
        print(f"| {kind} | {n:,} | {med:.2f} | {min(times):.2f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
