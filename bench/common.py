"""What the step benchmarks share: arguments, and the base model, directions and batch they time on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_args(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=6, help="pairs per step (the default train.batch_size)")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def base_run(config: Path, args, loss: Path | None = None):
    """``pipeline.base`` (inputs checked, base model, checksum, fingerprint, tokenised pairs) on a
    config of configs/, with the bench's --model, --dtype and --threads; ``loss`` replaces its
    loss section by another config's."""
    import dataclasses

    from adapters.config import load_config
    from adapters.pipeline import base
    from adapters.quiet import install

    install()  # the libraries' expected warnings, as every command hides them

    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=args.model, dtype=args.dtype, device="auto"),
                              train=dataclasses.replace(cfg.train, threads=args.threads),
                              loss=load_config(loss).loss if loss else cfg.loss)
    return base(cfg)


def step_setup(args):
    """(config of configs/honesty.yaml with the card's ReprPO loss (configs/recipes/reprpo.yaml),
    frozen base, tokenizer, directions from 48 training pairs (16 held out), a batch of
    ``args.batch`` other training pairs on the model's device). The step benches time the ReprPO
    part of a step, the part the three-pass loop they compare against computes; the behaviour
    terms add passes of their own over completions and neutral text, which need completions
    generated first."""
    import torch

    from adapters import data, directions as dirs

    run = base_run(ROOT / "configs" / "honesty.yaml", args, loss=ROOT / "configs" / "recipes" / "reprpo.yaml")
    torch.manual_seed(0)
    cfg, base, tok, pairs = run.cfg, run.model, run.tokenizer, run.train_pairs
    d = dirs.compute(base, tok, pairs[:48], run.val_pairs[:16], cfg.directions, cfg.data.max_length, run.fingerprint)
    batch = data.PairCollator(tok.pad_token_id)(data.encode_pairs(tok, pairs[48:48 + args.batch], cfg.data.max_length))
    device = next(base.parameters()).device
    return cfg, base, tok, d, {k: v.to(device) for k, v in batch.items()}
