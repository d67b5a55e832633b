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
Bad input (config, pairs, probes, model, run folder) stops before any work with a message on
stderr and exit status 2. Everything lands in runs/<name>/; wandb is offline by default (`wandb sync runs/<name>/wandb/...`).
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


class Refused(SystemExit):
    """A start refused for bad input (config, inputs, model, run folder): the message names the
    key, file and reason; the process prints it and exits with status 2, as the other commands do."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file with the values that differ from the defaults")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR",
                    help="continue the interrupted run in RUN_DIR (its config.yaml, directions, checkpoint)")
    ap.add_argument("--overwrite", action="store_true",
                    help="train into runs/<log.name> even though it holds a run: its files are deleted first")
    args, rest = ap.parse_known_args(argv)

    from adapters.config import ConfigError, load_config, parse_overrides

    try:
        if args.resume:
            if args.config or rest or args.overwrite:
                raise ConfigError("--resume continues a run with its own config.yaml; drop --config, --overwrite "
                                  "and overrides")
            if not (Path(args.resume) / "config.yaml").is_file():
                raise ConfigError(f"{args.resume} is not a run folder (no config.yaml) and cannot be resumed")
            cfg = load_config(Path(args.resume) / "config.yaml")
        else:
            cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as e:
        raise Refused(f"config error: {e}")
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(cfg.log.runs_dir) / (cfg.log.name or f"{cfg.adapter.kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    # data-parallel runs: Lightning starts ranks 1.. as copies of this command with LOCAL_RANK
    # set; every rank prepares the same inputs, and only rank 0 writes (and locks) the run folder
    rank = int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0")) * cfg.train.devices
    if rank:
        return train(cfg, run_dir, rank, resume=bool(args.resume))

    from adapters.checkpoint import interrupted
    from adapters.run import RunError, RunLock, run_files

    try:
        with RunLock(run_dir):
            if not args.resume and not args.overwrite:
                if interrupted(run_dir):
                    raise RunError(f"{run_dir} holds an interrupted run (its checkpoint/ folder); continue it with "
                                   f"`python train.py --resume {run_dir}`, choose another log.name, or start "
                                   "again with --overwrite")
                if run_files(run_dir):
                    raise RunError(f"{run_dir} already holds a run ({', '.join(p.name for p in run_files(run_dir))})"
                                   f"; finish or re-evaluate it with `python train.py --resume {run_dir}`, choose "
                                   "another log.name, or replace it with --overwrite (its files are deleted)")
            return train(cfg, run_dir, rank, resume=bool(args.resume), overwrite=args.overwrite)
    except RunError as e:
        raise Refused(f"run folder error: {e}")
    except OSError as e:  # a full disk, a folder made read-only, ...: say so, and what survived
        from adapters.checkpoint import interrupted

        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        kept = (f"; the last complete checkpoint is kept: continue with `python train.py --resume {run_dir}` once "
                "there is room") if interrupted(run_dir) else ""
        sys.exit(f"file system error: {e.strerror or e}{where}{kept}")


def train(cfg, run_dir: Path, rank: int = 0, resume: bool = False, overwrite: bool = False) -> Path:
    """The pipeline on a resolved config, into ``run_dir`` (which the caller has locked)."""
    import lightning as L
    import torch

    from adapters import data, directions as dirs, evaluate
    from adapters.checkpoint import FOLDER as CKPT, CheckpointCallback, CheckpointError, ResumableSampler, interrupted, \
        load_checkpoint, save_checkpoint
    from adapters.config import config_to_dict, dump_config
    from adapters.hidden import layer_index
    from adapters.inputs import InputError, check_inputs, check_model_inputs
    from adapters.io import write_json
    from adapters.models import (BaseChecksum, ModelLoadError, base_fingerprint, enable_gradient_checkpointing,
                                 load_base)
    from adapters.module import ContrastiveModule, TrainingError
    from adapters.run import clear_run, save_adapter
    from adapters.tuners import attach

    torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    zero = rank == 0
    name = run_dir.name
    t0 = time.time()

    # 1. every input file first, all problems at once, before any model is loaded
    try:
        train_pairs, val_pairs = check_inputs(cfg)
    except InputError as e:
        raise Refused(str(e))

    # 2. the frozen base model, and the inputs that depend on it
    try:
        model, tok = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantization)
    except ModelLoadError as e:
        raise Refused(f"model error: {e}")
    if cfg.train.gradient_checkpointing:  # replays the steering coefficient in the recompute
        enable_gradient_checkpointing(model)
    checksum = BaseChecksum(model)
    fingerprint = base_fingerprint(model)
    try:
        encoded, val_encoded = check_model_inputs(cfg, model, tok, train_pairs, val_pairs)
    except InputError as e:
        raise Refused(str(e))
    if zero and not resume:  # only now is the run folder written (a bad input never touches it)
        if overwrite:
            cleared = clear_run(run_dir)
            if cleared:
                print(f"--overwrite: deleted the old run's {', '.join(p.name for p in cleared)} in {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    print(f"run folder: {run_dir}")
    print(f"model {cfg.model.name} ({model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M) "
          f"loaded; {len(train_pairs)} train / {len(val_pairs)} val pairs [{time.time() - t0:.0f}s]")

    # 3. reference directions, frozen, and the loss layers (a resumed run reuses its own)
    reused = bool(resume and (run_dir / "directions.safetensors").is_file())
    if reused:
        directions = dirs.Directions.load(run_dir, fingerprint)
    else:
        directions = dirs.compute(model, tok, train_pairs, val_pairs, cfg.directions, cfg.data.max_length,
                                  fingerprint)
        checksum.verify(model, "after computing directions")
        if zero:
            directions.save(run_dir)
    for l in directions.selected:
        st = directions.stats[l]
        print(f"  loss layer {l}: corr {st['corr']:+.2f} val agreement {st['val_agreement']:.2f} "
              f"scale {st['scale']:.2f}")

    # 3b. behaviour targets (loss.w_pref / w_distill / w_kl): the base model's own completions
    # under each persona and its log-probs on them, from the cache when seen before
    from adapters import behaviour as bh

    try:
        items, neutral = bh.prepare(cfg, model, tok, train_pairs, fingerprint, run_dir if zero else None)
    except bh.BehaviourError as e:
        raise Refused(f"behaviour error: {e}")
    checksum.verify(model, "after the behaviour targets")

    # 4. the adapter and the Lightning system
    model, adapter = attach(model, cfg.adapter, directions)
    n_train = sum(p.numel() for p in adapter.trainable_parameters())
    last_loss = max(layer_index(l) for l in directions.selected)
    late = sorted({layer_index(t) for t in adapter.steered_modules()} - {-1})
    late = [i for i in late if i > last_loss]
    if late:
        print(f"warning: adapter layers {late} come after the last loss layer ({last_loss}); they get gradient "
              "only from the NLL barrier and mostly stay at the identity. Lower adapter.depth or select later "
              "loss layers.")
    print(f"adapter {cfg.adapter.kind}: {n_train} trainable parameters [{time.time() - t0:.0f}s]")
    start, opt_state, base_cache = 0, None, None
    if resume:
        try:
            if interrupted(run_dir):
                start, opt_state, base_cache = load_checkpoint(run_dir, adapter, fingerprint)
                base_cache = base_cache if reused else None  # projections on the old directions
            elif (run_dir / "adapter.safetensors").is_file():  # training had finished: evaluate
                from adapters.run import read_adapter

                adapter.load_state_tensors(read_adapter(run_dir / "adapter.safetensors")[0])
                start = cfg.train.steps
            else:
                raise CheckpointError(f"{run_dir} has neither a checkpoint nor an adapter: it stopped before its "
                                      "first checkpoint; start it again without --resume")
        except (CheckpointError, ValueError) as e:
            raise Refused(f"cannot resume: {e}")
        print(f"resuming {run_dir} at step {start} of {cfg.train.steps}")
    system = ContrastiveModule(model, adapter, directions, cfg.loss, cfg.train, checksum,
                               start_step=start, optimizer_state=opt_state, base_cache=base_cache,
                               behaviour=items, neutral=neutral, behaviour_cfg=cfg.behaviour,
                               pad_id=tok.pad_token_id)
    collate = data.PairCollator(tok.pad_token_id)
    world = cfg.train.devices  # 1 unless strategy=ddp (the config refuses devices > 1 otherwise)
    drop_last = len(encoded) > cfg.train.batch_size or world > 1
    epoch, offset = ResumableSampler.position(start, len(encoded), cfg.train.batch_size, drop_last)
    sampler = ResumableSampler(len(encoded), cfg.train.seed, epoch, offset, rank, world, cfg.train.batch_size)
    train_loader = torch.utils.data.DataLoader(encoded, batch_size=cfg.train.batch_size // world, collate_fn=collate,
                                               sampler=sampler, drop_last=drop_last)
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
    trainer = L.Trainer(max_steps=cfg.train.steps - start, callbacks=[ckpt], accelerator=cfg.train.accelerator,
                        devices=cfg.train.devices, strategy=cfg.train.strategy, use_distributed_sampler=False,
                        logger=logger, enable_checkpointing=False, num_sanity_val_steps=0,
                        val_check_interval=cfg.train.val_every, check_val_every_n_epoch=None,
                        gradient_clip_val=cfg.train.grad_clip, log_every_n_steps=1,
                        limit_val_batches=cfg.train.val_batches or None,
                        enable_model_summary=False, default_root_dir=str(run_dir), precision=cfg.train.precision)
    t_fit = time.time()
    if start < cfg.train.steps:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            trainer.fit(system, train_loader, val_loader)
        except TrainingError as e:
            sys.exit(f"training error: {e}. Nothing of this run's training was saved"
                     + (" (its last checkpoint is kept)" if interrupted(run_dir) else ""))
        except SIGTERMException:  # Lightning stops after the step in flight; keep it, and say we stopped
            step = start + trainer.global_step
            if zero and 0 < step:
                save_checkpoint(run_dir, step, adapter, trainer.optimizers[0], fingerprint, cfg.train.seed,
                                system.base_cache.state_tensors())
            print(f"stopped by SIGTERM after step {step} of {cfg.train.steps}; checkpoint kept: continue with "
                  f"`python train.py --resume {run_dir}`", file=sys.stderr)
            sys.exit(143)
    t_fit = time.time() - t_fit
    if not trainer.is_global_zero:  # the other ranks trained; rank 0 saves and evaluates, once
        return run_dir
    print(f"trained {cfg.train.steps - start} steps [{time.time() - t0:.0f}s]")

    # 5. save (the base must be untouched), then evaluate
    checksum.verify(model, "before saving")
    save_adapter(run_dir, adapter, fingerprint)
    checksum.verify(model, "after saving")
    shutil.rmtree(run_dir / CKPT, ignore_errors=True)  # the saved adapter supersedes it
    t_eval = time.time()
    if cfg.eval.enabled:
        try:
            report = evaluate.evaluate_run(model, tok, directions, train_pairs, val_pairs, cfg)
        except evaluate.NonFiniteOutputs as e:
            sys.exit(f"evaluation error: {e}. The adapter is saved in {run_dir}; evaluate it at other coefficients "
                     f"with `python -m adapters eval --run {run_dir} --coeffs ...`")
        report.examples = bh.examples(run_dir)
        checksum.verify(model, "after evaluation")
        paths = evaluate.write_report(report, run_dir, title=f"Evaluation of {name}")
        print(evaluate.markdown(report, title=f"Evaluation of {name}"))
        if logger:
            logger.experiment.log(evaluate.wandb_payload(report, paths["png"]))
    write_json(run_dir / "timing.json", {
        "seconds": time.time() - t0, "fit_seconds": t_fit, "step_seconds": t_fit / max(cfg.train.steps - start, 1),
        "eval_seconds": time.time() - t_eval, "trainable_parameters": n_train, "kind": cfg.adapter.kind,
        "dtype": str(model.dtype).removeprefix("torch.")})
    if logger:
        logger.experiment.finish()
    print(f"done in {time.time() - t0:.0f}s: {run_dir}")
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except Refused as refused:
        print(refused.message, file=sys.stderr)
        sys.exit(2)
