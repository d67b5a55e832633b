"""Train a signed contrastive adapter, then evaluate it against baselines.

Usage:
    python train.py --config configs/honesty.yaml
    python train.py --config configs/honesty.yaml --train.steps 40 --log.name quick
    python train.py --config configs/additive.yaml --adapter.depth '[0.5, 0.9]'

Steps: load the frozen base model -> pairs (train / validation split) -> reference
directions at the candidate layers (PCA of pos-neg differences, sign-aligned) and loss-layer
selection -> attach the adapter -> Lightning fit with the bidirectional loss -> save the
adapter (with the base fingerprint) -> dose-response evaluation -> report.
Everything lands in runs/<name>/; wandb is offline by default (`wandb sync runs/<name>/wandb/...`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file with the values that differ from the defaults")
    args, rest = ap.parse_known_args(argv)

    from adapters.config import ConfigError, config_to_dict, dump_config, load_config, parse_overrides

    try:
        cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    import lightning as L
    import torch

    from adapters import data, directions as dirs, evaluate
    from adapters.io import write_json
    from adapters.models import BaseChecksum, base_fingerprint, load_base
    from adapters.module import ContrastiveModule
    from adapters.run import save_adapter
    from adapters.tuners import attach

    torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    t0 = time.time()
    name = cfg.log.name or f"{cfg.adapter.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.log.runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    print(f"run folder: {run_dir}")

    # 1. data first: bad pairs fail before any model is loaded
    pairs = data.load_pairs(cfg.data)
    train_pairs, val_pairs = data.split_pairs(pairs, cfg.data.val_fraction, cfg.train.seed)

    # 2. the frozen base model
    model, tok = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
    checksum = BaseChecksum(model)
    fingerprint = base_fingerprint(model)
    encoded = data.encode_pairs(tok, train_pairs, cfg.data.max_length)
    val_encoded = data.encode_pairs(tok, val_pairs, cfg.data.max_length)
    print(f"model {cfg.model.name} ({model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M) "
          f"loaded; {len(train_pairs)} train / {len(val_pairs)} val pairs [{time.time() - t0:.0f}s]")

    # 3. reference directions, frozen, and the loss layers
    directions = dirs.compute(model, tok, train_pairs, val_pairs, cfg.directions, cfg.data.max_length, fingerprint)
    checksum.verify(model, "after computing directions")
    directions.save(run_dir)
    for l in directions.selected:
        st = directions.stats[l]
        print(f"  loss layer {l}: corr {st['corr']:+.2f} val agreement {st['val_agreement']:.2f} "
              f"scale {st['scale']:.2f}")

    # 4. the adapter and the Lightning system
    model, adapter = attach(model, cfg.adapter, directions)
    n_train = sum(p.numel() for p in adapter.trainable_parameters())
    print(f"adapter {cfg.adapter.kind}: {n_train} trainable parameters [{time.time() - t0:.0f}s]")
    system = ContrastiveModule(model, adapter, directions, cfg.loss, cfg.train, checksum)
    collate = data.PairCollator(tok.pad_token_id)
    train_loader = torch.utils.data.DataLoader(encoded, batch_size=cfg.train.batch_size, shuffle=True,
                                               collate_fn=collate, drop_last=len(encoded) > cfg.train.batch_size)
    val_loader = torch.utils.data.DataLoader(val_encoded, batch_size=cfg.train.batch_size, collate_fn=collate)

    logger = False
    if cfg.log.wandb != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        logger = WandbLogger(project=cfg.log.project, name=name, save_dir=str(run_dir),
                             offline=cfg.log.wandb == "offline")
        logger.experiment.config.update(config_to_dict(cfg), allow_val_change=True)
        logger.experiment.summary.update({f"directions/{k}/{l}": v for l, st in directions.stats.items()
                                          for k, v in st.items()})
    trainer = L.Trainer(max_steps=cfg.train.steps, accelerator=cfg.train.accelerator, devices=1,
                        logger=logger, enable_checkpointing=False, num_sanity_val_steps=0,
                        val_check_interval=cfg.train.val_every, check_val_every_n_epoch=None,
                        gradient_clip_val=cfg.train.grad_clip, log_every_n_steps=1,
                        limit_val_batches=cfg.train.val_batches or None,
                        enable_model_summary=False, default_root_dir=str(run_dir))
    t_fit = time.time()
    trainer.fit(system, train_loader, val_loader)
    t_fit = time.time() - t_fit
    print(f"trained {cfg.train.steps} steps [{time.time() - t0:.0f}s]")

    # 5. save (the base must be untouched), then evaluate
    checksum.verify(model, "before saving")
    save_adapter(run_dir, adapter, fingerprint)
    t_eval = time.time()
    if cfg.eval.enabled:
        report = evaluate.evaluate_run(model, tok, directions, val_pairs, cfg)
        checksum.verify(model, "after evaluation")
        paths = evaluate.write_report(report, run_dir, title=f"Evaluation of {name}")
        print(evaluate.markdown(report, title=f"Evaluation of {name}"))
        if logger:
            import wandb

            cols = list(report.summary[0])
            logger.experiment.log({"eval/summary": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in report.summary]),
                                   "eval/rows": wandb.Table(columns=list(report.rows[0]), data=[list(r.values()) for r in report.rows]),
                                   "eval/plot": wandb.Image(str(paths["png"]))})
    write_json(run_dir / "timing.json", {
        "seconds": time.time() - t0, "fit_seconds": t_fit, "step_seconds": t_fit / max(cfg.train.steps, 1),
        "eval_seconds": time.time() - t_eval, "trainable_parameters": n_train, "kind": cfg.adapter.kind})
    if logger:
        logger.experiment.finish()
    print(f"done in {time.time() - t0:.0f}s: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
