"""Train a signed contrastive adapter, then evaluate it against baselines.

Usage:
    python train.py --config configs/honesty.yaml
    python train.py --config configs/honesty.yaml --train.steps 40 --log.name quick
    python train.py --config configs/additive.yaml --adapter.depth '[0.5, 0.9]'
    python train.py --resume runs/honesty      # continue an interrupted run from its checkpoint

Steps: load the frozen base model -> pairs (train / validation split) -> reference
directions at the candidate layers (PCA of pos-neg differences, sign-aligned) and loss-layer
selection -> attach the adapter -> Lightning fit with the bidirectional loss -> save the
adapter (with the base fingerprint) -> dose-response evaluation -> report.
Everything lands in runs/<name>/; wandb is offline by default (`wandb sync runs/<name>/wandb/...`).
A checkpoint (adapter, optimiser, data position) is kept in runs/<name>/checkpoint/ every
train.checkpoint_every steps until the adapter is saved; --resume continues from it with the
run's own config and directions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file with the values that differ from the defaults")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR",
                    help="continue the interrupted run in RUN_DIR (its config.yaml, directions, checkpoint)")
    args, rest = ap.parse_known_args(argv)

    from adapters.config import ConfigError, config_to_dict, dump_config, load_config, parse_overrides

    try:
        if args.resume:
            if args.config or rest:
                raise ConfigError("--resume continues a run with its own config.yaml; drop --config and overrides")
            if not (Path(args.resume) / "config.yaml").is_file():
                raise ConfigError(f"{args.resume} is not a run folder (no config.yaml) and cannot be resumed")
            cfg = load_config(Path(args.resume) / "config.yaml")
        else:
            cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    import lightning as L
    import torch

    from adapters import data, directions as dirs, evaluate
    from adapters.checkpoint import FOLDER as CKPT, CheckpointCallback, CheckpointError, ResumableSampler, load_checkpoint
    from adapters.hidden import layer_index
    from adapters.io import write_json
    from adapters.models import BaseChecksum, ModelLoadError, base_fingerprint, load_base
    from adapters.module import ContrastiveModule
    from adapters.run import save_adapter
    from adapters.tuners import attach

    torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    t0 = time.time()
    if args.resume:
        run_dir = Path(args.resume)
        name = run_dir.name
    else:
        name = cfg.log.name or f"{cfg.adapter.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.log.runs_dir) / name
        if (run_dir / CKPT).is_dir():
            sys.exit(f"{run_dir} holds an interrupted run (its checkpoint/ folder); continue it with "
                     f"`python train.py --resume {run_dir}`, or choose another log.name")

    # 1. every input file first, all problems at once, before any model is loaded
    train_pairs, val_pairs = check_inputs(cfg)

    # 2. the frozen base model, and the inputs that depend on it
    try:
        model, tok = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device)
    except ModelLoadError as e:
        sys.exit(f"model error: {e}")
    checksum = BaseChecksum(model)
    fingerprint = base_fingerprint(model)
    encoded, val_encoded = check_model_inputs(cfg, model, tok, train_pairs, val_pairs)
    if not args.resume:  # only now is the run folder written (a bad input never touches it)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    print(f"run folder: {run_dir}")
    print(f"model {cfg.model.name} ({model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M) "
          f"loaded; {len(train_pairs)} train / {len(val_pairs)} val pairs [{time.time() - t0:.0f}s]")

    # 3. reference directions, frozen, and the loss layers (a resumed run reuses its own)
    if args.resume and (run_dir / "directions.safetensors").is_file():
        directions = dirs.Directions.load(run_dir, fingerprint)
    else:
        directions = dirs.compute(model, tok, train_pairs, val_pairs, cfg.directions, cfg.data.max_length,
                                  fingerprint)
        checksum.verify(model, "after computing directions")
        directions.save(run_dir)
    for l in directions.selected:
        st = directions.stats[l]
        print(f"  loss layer {l}: corr {st['corr']:+.2f} val agreement {st['val_agreement']:.2f} "
              f"scale {st['scale']:.2f}")

    # 4. the adapter and the Lightning system
    model, adapter = attach(model, cfg.adapter, directions)
    n_train = sum(p.numel() for p in adapter.trainable_parameters())
    last_loss = max(layer_index(l) for l in directions.selected)
    late = sorted({layer_index(t) for t in getattr(adapter, "targets", getattr(adapter, "layers", []))} - {-1})
    late = [i for i in late if i > last_loss]
    if late:
        print(f"warning: adapter layers {late} come after the last loss layer ({last_loss}); they get gradient "
              "only from the NLL barrier and mostly stay at the identity. Lower adapter.depth or select later "
              "loss layers.")
    print(f"adapter {cfg.adapter.kind}: {n_train} trainable parameters [{time.time() - t0:.0f}s]")
    start, opt_state = 0, None
    if args.resume:
        try:
            if (run_dir / CKPT).is_dir():
                start, opt_state = load_checkpoint(run_dir, adapter, fingerprint)
            elif (run_dir / "adapter.safetensors").is_file():  # training had finished: evaluate
                from adapters.io import load_tensors

                adapter.load_state_tensors(load_tensors(run_dir / "adapter.safetensors")[0])
                start = cfg.train.steps
            else:
                raise CheckpointError(f"{run_dir} has neither a checkpoint nor an adapter: it stopped before its "
                                      "first checkpoint; start it again without --resume")
        except (CheckpointError, ValueError) as e:
            sys.exit(f"cannot resume: {e}")
        print(f"resuming {run_dir} at step {start} of {cfg.train.steps}")
    system = ContrastiveModule(model, adapter, directions, cfg.loss, cfg.train, checksum,
                               start_step=start, optimizer_state=opt_state)
    collate = data.PairCollator(tok.pad_token_id)
    drop_last = len(encoded) > cfg.train.batch_size
    epoch, offset = ResumableSampler.position(start, len(encoded), cfg.train.batch_size, drop_last)
    train_loader = torch.utils.data.DataLoader(encoded, batch_size=cfg.train.batch_size, collate_fn=collate,
                                               sampler=ResumableSampler(len(encoded), cfg.train.seed, epoch, offset),
                                               drop_last=drop_last)
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
    ckpt = CheckpointCallback(run_dir, cfg.train.checkpoint_every, cfg.train.steps, fingerprint, cfg.train.seed)
    trainer = L.Trainer(max_steps=cfg.train.steps - start, callbacks=[ckpt], accelerator=cfg.train.accelerator, devices=1,
                        logger=logger, enable_checkpointing=False, num_sanity_val_steps=0,
                        val_check_interval=cfg.train.val_every, check_val_every_n_epoch=None,
                        gradient_clip_val=cfg.train.grad_clip, log_every_n_steps=1,
                        limit_val_batches=cfg.train.val_batches or None,
                        enable_model_summary=False, default_root_dir=str(run_dir))
    t_fit = time.time()
    if start < cfg.train.steps:
        trainer.fit(system, train_loader, val_loader)
    t_fit = time.time() - t_fit
    print(f"trained {cfg.train.steps - start} steps [{time.time() - t0:.0f}s]")

    # 5. save (the base must be untouched), then evaluate
    checksum.verify(model, "before saving")
    save_adapter(run_dir, adapter, fingerprint)
    checksum.verify(model, "after saving")
    shutil.rmtree(run_dir / CKPT, ignore_errors=True)  # the saved adapter supersedes it
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
        "seconds": time.time() - t0, "fit_seconds": t_fit, "step_seconds": t_fit / max(cfg.train.steps - start, 1),
        "eval_seconds": time.time() - t_eval, "trainable_parameters": n_train, "kind": cfg.adapter.kind})
    if logger:
        logger.experiment.finish()
    print(f"done in {time.time() - t0:.0f}s: {run_dir}")
    return run_dir


def _exit_if(problems: list[str]) -> None:
    if len(problems) == 1:
        sys.exit(f"input error: {problems[0]}")
    if problems:
        sys.exit(f"input errors ({len(problems)}):\n  - " + "\n  - ".join(problems))


def check_inputs(cfg):
    """Pairs, probe and neutral-text files: (train, val) pairs, or exit listing every problem."""
    from adapters import data, evaluate

    problems, split = [], ([], [])
    try:
        pairs = data.load_pairs(cfg.data)
        split = data.split_pairs(pairs, cfg.data.val_fraction, cfg.train.seed)
    except data.PairsError as e:
        problems.append(str(e))
    if cfg.eval.enabled:
        for kind in cfg.eval.probes:
            try:
                evaluate.probe_rows(kind, cfg.eval)
            except evaluate.ProbeError as e:
                problems.append(str(e))
        try:
            evaluate.neutral_texts(cfg.eval.neutral)
        except evaluate.ProbeError as e:
            problems.append(str(e))
    _exit_if(problems)
    return split


def check_model_inputs(cfg, model, tok, train_pairs, val_pairs):
    """What depends on the model: layer patterns, context length, tokenised pairs (all at once)."""
    from adapters import data, hidden

    problems, encoded = [], ([], [])
    for what, patterns, depth in (("directions.candidates", cfg.directions.candidates, cfg.directions.depth),
                                  ("adapter.layers", cfg.adapter.layers, cfg.adapter.depth)):
        try:
            hidden.resolve(model, patterns, depth)
        except hidden.LayerError as e:
            problems.append(f"{what}: {e}")
    context = getattr(hidden.base_model_of(model).config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        problems.append(f"data.max_length={cfg.data.max_length} exceeds the model's context of {context} tokens")
    try:
        encoded = (data.encode_pairs(tok, train_pairs, cfg.data.max_length),
                   data.encode_pairs(tok, val_pairs, cfg.data.max_length))
    except data.PairsError as e:
        problems.append(str(e))
    _exit_if(problems)
    return encoded


if __name__ == "__main__":
    main()
