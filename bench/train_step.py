"""Our training step against the three-pass loop and a bare peft LoRA step, side by side.

    python bench/train_step.py [--model bundled] [--dtype auto] [--steps 5] [--batch 6]

On the same model, batch and LoRA adapter (configs/honesty.yaml), timed round-robin (one
step of each in turn, so a slow-down of the machine hits all alike), each step = forward(s)
+ backward + AdamW step:

* ours: ``ContrastiveModule.step_terms`` in steady state: the base reference of every pair
  is in the cache (a pair's first visit costs one extra no-grad base pass), and c = +1 and
  c = -1 run as one forward pass of [batch; batch] with per-row coefficients;
* three-pass loop: a no-grad base pass, then c = +1 and c = -1 as separate forward passes
  (the step before the cache and the batched signs); and the same without the contiguous
  head input of ``models.contiguous_head`` (the step as it was before both changes);
* bare peft LoRA: ``peft.get_peft_model`` with the same LoRA on a copy of the base, one
  forward + backward of the suffix cross-entropy on the same tokens as our grad passes
  ([batch; batch], 4B rows), and on the batch alone (2B rows) for reference.

Also: one base-weights checksum verify as a share of our step, and per run (the number of
verifies a default run makes). Targets (the README's benchmarks paragraph): ours <= 0.5x the
three-pass loop, <= 1.3x the bare LoRA step, checksum < 2% of a step.
"""

from __future__ import annotations

import copy
import statistics
import time

from common import step_args, step_setup


def main() -> None:
    args = step_args(__doc__)

    import peft
    import torch

    from adapters import hidden
    from adapters.hidden import resolve
    from adapters.loss import contrastive_loss, masked_mean, project, token_nll
    from adapters.models import BaseChecksum
    from adapters.module import COEFFS, ContrastiveModule
    from adapters.tuners import attach

    cfg, base, tok, d, batch = step_setup(args)
    device = next(base.parameters()).device
    mask = batch["suffix_mask"]
    keep = int(mask.sum(1).max()) + 1

    model, adapter = attach(copy.deepcopy(base), cfg.adapter, d)
    system = ContrastiveModule(model, adapter, d, cfg.loss, cfg.train, BaseChecksum(model)).to(device)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-5)

    targets = resolve(base, cfg.adapter.targets, cfg.adapter.depth)
    lora = cfg.adapter.lora
    bare = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                                    target_modules=targets, lora_dropout=0.0))
    bare_opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-5)

    def ours():
        loss = system.step_terms(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def three_pass():
        with torch.no_grad():
            h0, nll0 = system._forward(batch, 0.0)
        p0 = {l: project(h0[l], system.vectors[l], system.scale[l]) for l in system.layers}
        total = 0.0
        for c in COEFFS:
            h, nll = system._forward(batch, c)
            total = total + contrastive_loss(h, p0, nll, nll0, mask, system.vectors, system.scale, c, cfg.loss)["loss"]
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def bare_step(copies: int):
        ids = torch.cat([batch["input_ids"]] * copies)
        attn = torch.cat([batch["attention_mask"]] * copies)
        m = torch.cat([mask] * copies)
        logits = bare(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
        loss = masked_mean(token_nll(logits, ids), m, (0, 1))
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    head = hidden.base_model_of(model).get_output_embeddings()

    def three_pass_before():  # and without models.contiguous_head: the step as it was before
        hooks = dict(head._forward_pre_hooks)
        head._forward_pre_hooks.clear()
        try:
            three_pass()
        finally:
            head._forward_pre_hooks.update(hooks)

    steps = {"ours (cached base, one pass for both signs)": ours, "three-pass loop": three_pass,
             "three-pass loop, non-contiguous head input (the step before)": three_pass_before,
             "bare peft LoRA, same tokens (4B rows)": lambda: bare_step(2),
             "bare peft LoRA, the batch once (2B rows)": lambda: bare_step(1)}
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up (fills our base cache: steady state)
        fn()
    for _ in range(args.steps):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)

    checksum = BaseChecksum(base)
    verify = []
    for _ in range(5):
        t = time.perf_counter()
        checksum.verify(base)
        verify.append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["ours (cached base, one pass for both signs)"]
    print(f"model {args.model} ({base.dtype}, {device}), {args.batch} pairs x {batch['input_ids'].shape[1]} tokens "
          f"(suffix logits {keep}), LoRA r={cfg.adapter.lora.r} on {len(targets)} modules, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads")
    print("| step | s/step (median) | min | ours / this |")
    print("|---|---:|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {ref / med[k]:.2f}x |")
    v = statistics.median(verify)
    calls = 6 + cfg.train.steps // cfg.train.val_every
    print(f"checksum verify (every base tensor): {v:.4f} s = {100 * v / ref:.1f}% of one step; {calls} verifies in a "
          f"{cfg.train.steps}-step run = {100 * calls * v / (cfg.train.steps * ref):.2f}% of its training time")


if __name__ == "__main__":
    main()
