"""The main job's behaviour terms (preference + distillation) for one step, side by side.

    python bench/behaviour_step.py [--model bundled] [--dtype auto] [--steps 5] [--threads 2]

On configs/honesty.yaml's LoRA and its behaviour prompts (``behaviour.batch_size`` a step, each
with its y_h and y_d completions), timed round-robin on the same steps' prompts (one step of
each in turn, so a slow-down of the machine hits all alike), each step = forward + backward +
AdamW step:

* packed: a prompt's two completions in one row (``behaviour.pack``), as a run trains;
* one row per completion: the same terms from 2m rows (the step before packing);
* bare peft LoRA: the completions' cross-entropy on those 2m rows, a plain fine-tuning step on
  the same tokens.

The behaviour items of the steps a run draws come from the cache a run made
(``CONTRASTIVE_ADAPTERS_CACHE``), else they are generated and taught first (minutes on a CPU).
"""

from __future__ import annotations

import copy
import statistics
import time

from common import ROOT, base_run, step_args


def main() -> None:
    args = step_args(__doc__)

    import peft
    import torch

    from adapters import behaviour as bh
    from adapters import directions as dirs
    from adapters.hidden import resolve
    from adapters.models import BaseChecksum
    from adapters.module import ContrastiveModule
    from adapters.plan import machine_line
    from adapters.tuners import attach

    run = base_run(ROOT / "configs" / "honesty.yaml", args)
    cfg, base, tok = run.cfg, run.model, run.tokenizer
    d = dirs.compute(base, tok, run.train_pairs[:48], run.val_pairs[:16], cfg.directions, cfg.data.max_length,
                     run.fingerprint)
    items, neutral = bh.prepare(cfg, base, tok, run.train_pairs, run.fingerprint, None)
    device = next(base.parameters()).device
    model, adapter = attach(copy.deepcopy(base), cfg.adapter, d)
    system = ContrastiveModule(model, adapter, d, cfg.loss, cfg.train, BaseChecksum(model), behaviour=items,
                               neutral=neutral, behaviour_cfg=cfg.behaviour, pad_id=tok.pad_token_id).to(device)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-5)
    lora = cfg.adapter.lora
    bare = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=resolve(base, cfg.adapter.targets, cfg.adapter.depth),
        lora_dropout=0.0))
    bare_opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-5)

    def ours(packing: bool, step: int):
        system._packing = packing
        t = system.behaviour_terms(step)
        (cfg.loss.w_pref * t["pref"] + cfg.loss.w_distill * t["distill"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def bare_step(step: int):
        picks, _ = system._shard("behaviour", len(items), cfg.behaviour.batch_size, step)
        b = {k: v.to(device) for k, v in bh.collate([it for j in picks for it in items[j]], tok.pad_token_id).items()}
        K1 = b["mask"].shape[1]
        logits = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=K1 + 1).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["input_ids"][:, -K1:, None])[..., 0]
        (-(lp * b["mask"]).sum() / b["mask"].sum()).backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    system._packing = None
    system.behaviour_terms(0)  # the run's one packing check
    packs = system._packing
    steps = {"packed (one row per prompt)": lambda s: ours(True, s),
             "one row per completion": lambda s: ours(False, s),
             "bare peft LoRA, same rows (cross-entropy)": bare_step}
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn(0)
    for s in range(1, args.steps + 1):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn(s)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["packed (one row per prompt)"]
    print(machine_line(base.dtype))
    print(f"{cfg.behaviour.batch_size} prompts a step x 2 completions, LoRA r={lora.r}, {args.steps} timed steps; "
          f"the run's packing check: {'packs' if packs else 'refused (one row per completion)'}")
    print("| step | s/step (median) | min | packed / this |")
    print("|---|---:|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {ref / med[k]:.2f}x |")


if __name__ == "__main__":
    main()
