"""Training throughput and peak GPU memory: Qwen3-0.6B with a 4-bit base, on a GPU.

    python bench/gpu_qwen.py [--model Qwen/Qwen3-0.6B] [--steps 10] [--batch 6]

Skips (exit 0, one line saying why) when there is no CUDA device or the model cannot be
loaded (no network / not in the local Hugging Face cache). Otherwise: the LoRA of
configs/models/qwen3-0.6b.yaml on the nf4-quantized base, directions from 48 built-in pairs,
then ``--steps`` training steps (steady state: base reference cached, both signs in one
pass), side by side with the same base in bf16; prints tokens per second (tokens through
the model with grad per step / seconds) and torch.cuda.max_memory_allocated per setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen3-0.6B")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    import dataclasses

    from adapters import data, directions as dirs
    from adapters.config import load_config
    from adapters.module import ContrastiveModule
    from adapters.pipeline import Refused, base
    from adapters.tuners import attach

    cfg = load_config(ROOT / "configs" / "models" / "qwen3-0.6b.yaml")
    cfg.loss = load_config(ROOT / "configs" / "recipes" / "reprpo.yaml").loss  # the ReprPO step (bench/common.py)
    print(f"{torch.cuda.get_device_name()}; {args.model}, LoRA r={cfg.adapter.lora.r}, {args.batch} pairs per step")
    print("| base | tokens/s | s/step | peak GPU memory |")
    print("|---|---:|---:|---:|")
    for quant in ("4bit", "none"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model_cfg = dataclasses.replace(cfg.model, name=args.model, dtype="bfloat16", device="cuda", quantization=quant)
        try:
            # base() sets torch's CPU threads to train.threads: keep the machine's own number here
            run = base(dataclasses.replace(cfg, model=model_cfg,
                                           train=dataclasses.replace(cfg.train, threads=torch.get_num_threads())))
        except Refused as e:
            if not str(e).startswith("model error"):
                raise
            print(f"skipped: {e}")
            return
        model, tok, pairs = run.model, run.tokenizer, run.train_pairs
        d = dirs.compute(model, tok, pairs[:48], run.val_pairs[:16], cfg.directions, cfg.data.max_length,
                         run.fingerprint)
        model, adapter = attach(model, cfg.adapter, d)
        system = ContrastiveModule(model, adapter, d, cfg.loss, cfg.train, run.checksum).cuda()
        opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-5)
        enc = data.encode_pairs(tok, pairs[48:48 + args.batch], cfg.data.max_length)
        batch = {k: v.cuda() for k, v in data.PairCollator(tok.pad_token_id)(enc).items()}
        times = []
        for i in range(args.steps + 1):  # the first step fills the base cache: not timed
            torch.cuda.synchronize()
            t = time.perf_counter()
            system.step_terms(batch)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        step = statistics.median(times)
        tokens = 2 * batch["input_ids"].numel()  # [batch; batch] at c = +1 and -1
        print(f"| {quant} | {tokens / step:,.0f} | {step:.3f} | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |")
        del system, model, adapter, opt, run


if __name__ == "__main__":
    main()
