"""One training run as an object, and the stages every entry point shares.

    run = prepare(cfg, folder)   # inputs checked, base model, checksum, fingerprint, directions,
                                 # behaviour targets, adapter attached (resumed when asked)
    fit(run)                     # the Lightning fit
    finish(run)                  # save the adapter, evaluate, write the report and timing.json
    run = load(folder)           # a finished run folder back: base model + adapter, checksum on the Run

``main(argv)`` is ``train.py`` and ``python -m adapters train``: the command line, the run-folder
lock, then the stages. ``base(cfg)`` is the set-up that every command shares (preflight, base
model, checksum, fingerprint, tokenised pairs); ``sweep`` and ``eval`` start from it too.

Bad input (config, inputs, model, run folder) stops before any work with ``Refused``: the
message names the key, file and reason, and the process exits with status 2. Training and
evaluation errors exit 1; SIGTERM keeps a checkpoint and exits 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .quiet import BARS, add_flags, configure, log, verbosity


class Refused(SystemExit):
    """A start refused for bad input (config, inputs, model, run folder): the message names the
    key, file and reason; the process prints it and exits with status 2, as the other commands do."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass
class Run:
    """Everything one run holds in memory; the stages fill it in turn."""

    cfg: Config
    folder: Path
    model: Any
    tokenizer: Any
    checksum: Any
    """``models.BaseChecksum`` of the frozen base weights, verified after every stage."""
    fingerprint: str
    train_pairs: list = dataclasses.field(default_factory=list)
    val_pairs: list = dataclasses.field(default_factory=list)
    encoded: list = dataclasses.field(default_factory=list)
    """Tokenised training pairs (``data.encode_pairs``); ``val_encoded`` the validation ones."""
    val_encoded: list = dataclasses.field(default_factory=list)
    directions: Any = None
    adapter: Any = None
    rank: int = 0
    """Data-parallel rank; only rank 0 writes the run folder, saves and evaluates."""
    resume: bool = False
    start: int = 0
    """The step training starts from (> 0 when resumed from a checkpoint)."""
    optimizer_state: dict | None = None
    base_cache: dict | None = None
    behaviour: list = dataclasses.field(default_factory=list)
    neutral: dict | None = None
    system: Any = None
    logger: Any = None
    t0: float = dataclasses.field(default_factory=time.time)
    fit_seconds: float = 0.0
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per stage (load, plan, directions, behaviour, attach, fit, save, evaluate), for timing.json."""
    lap_at: float = 0.0
    calibration: float | None = None
    """``plan.calibrate``'s seconds on this machine (the plan's speed measure), for timing.json."""

    @property
    def zero(self) -> bool:
        return self.rank == 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.adapter.trainable_parameters())

    def say(self, text: str) -> None:
        log.info(f"{text} [{time.time() - self.t0:.0f}s]")

    def lap(self, stage: str) -> None:
        """Book the time since the last lap (or the start) to ``stage``."""
        now = time.time()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - (self.lap_at or self.t0)
        self.lap_at = now


# --------------------------------------------------------------------------- the command line


def parse(argv: list[str] | None) -> tuple[Config, Path, bool, bool]:
    """(config, run folder, resume, overwrite) from ``train.py``'s arguments."""
    from .config import keys_help

    argv = sys.argv[1:] if argv is None else list(argv)
    keys = keys_help() if {"-h", "--help"} & set(argv) else ""  # 0.1 s: only when asked for
    ap = argparse.ArgumentParser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Train a signed contrastive adapter, then evaluate it against baselines "
                                             "(configs/honesty.yaml is the main job).",
                                 epilog="Every config key is an override, --section.key VALUE (YAML values: "
                                        "--train.steps 40, --eval.baselines '[base, pca_vector]').\nThe keys, "
                                        "their defaults and what they do:\n\n" + keys)
    ap.add_argument("--config", default=None, help="YAML file with the values that differ from the defaults")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR",
                    help="continue the interrupted run in RUN_DIR (its config.yaml, directions, checkpoint)")
    ap.add_argument("--overwrite", action="store_true",
                    help="train into runs/<log.name> even though it holds a run: its files are deleted first")
    add_flags(ap)
    args, rest = ap.parse_known_args(argv)
    configure(verbosity(args))

    from .config import ConfigError, load_config, parse_overrides

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
        return cfg, Path(args.resume), True, False
    name = cfg.log.name or f"{cfg.adapter.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, Path(cfg.log.runs_dir) / name, False, args.overwrite


def main(argv: list[str] | None = None) -> Path:
    """Train and evaluate one run from the command line; the run folder is returned."""
    cfg, folder, resume, overwrite = parse(argv)
    # data-parallel runs: Lightning starts ranks 1.. as copies of this command with LOCAL_RANK
    # set; every rank prepares the same inputs, and only rank 0 writes (and locks) the run folder
    rank = int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0")) * cfg.train.devices
    if rank:
        return train(cfg, folder, rank, resume)

    from .checkpoint import interrupted
    from .run import RunError, RunLock, run_files

    try:
        with RunLock(folder):
            if not resume and not overwrite:
                if interrupted(folder):
                    raise RunError(f"{folder} holds an interrupted run (its checkpoint/ folder); continue it with "
                                   f"`python train.py --resume {folder}`, choose another log.name, or start "
                                   "again with --overwrite")
                if run_files(folder):
                    raise RunError(f"{folder} already holds a run ({', '.join(p.name for p in run_files(folder))})"
                                   f"; finish or re-evaluate it with `python train.py --resume {folder}`, choose "
                                   "another log.name, or replace it with --overwrite (its files are deleted)")
            return train(cfg, folder, rank, resume, overwrite)
    except RunError as e:
        raise Refused(f"run folder error: {e}")
    except OSError as e:  # a full disk, a folder made read-only, ...: say so, and what survived
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        kept = (f"; the last complete checkpoint is kept: continue with `python train.py --resume {folder}` once "
                "there is room") if interrupted(folder) else ""
        sys.exit(f"file system error: {e.strerror or e}{where}{kept}")


def cli(argv: list[str] | None = None) -> int:
    """``main`` as a process: a refused start prints its message alone on stderr, status 2."""
    from .quiet import install

    install()  # the libraries' expected warnings, one by one (adapters/quiet.py)
    try:
        main(argv)
    except Refused as refused:
        print(refused.message, file=sys.stderr)
        return 2
    return 0


def train(cfg: Config, folder: Path, rank: int = 0, resume: bool = False, overwrite: bool = False) -> Path:
    """The pipeline on a resolved config, into ``folder`` (which the caller has locked)."""
    run = prepare(cfg, folder, rank, resume, overwrite)
    if fit(run):  # the other ranks trained; rank 0 saves and evaluates, once
        finish(run)
    return folder


# --------------------------------------------------------------------------- the stages


def base(cfg: Config, rank: int = 0) -> Run:
    """Preflight (every input file, all problems at once, before any model loads), the frozen base
    model, its checksum and fingerprint, and the tokenised pairs; ``Refused`` on bad input."""
    import lightning as L
    import torch

    from .inputs import InputError, check_inputs, check_model_inputs
    from .models import BaseChecksum, ModelLoadError, base_fingerprint, enable_gradient_checkpointing, load_base

    torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    t0 = time.time()
    try:
        train_pairs, val_pairs = check_inputs(cfg)
    except InputError as e:
        raise Refused(str(e))
    try:
        model, tok = load_base(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.quantization)
    except ModelLoadError as e:
        raise Refused(f"model error: {e}")
    if cfg.train.gradient_checkpointing:  # replays the steering coefficient in the recompute
        enable_gradient_checkpointing(model)
    run = Run(cfg, Path(), model, tok, BaseChecksum(model), base_fingerprint(model), train_pairs, val_pairs,
              rank=rank, t0=t0)
    try:
        run.encoded, run.val_encoded = check_model_inputs(cfg, model, tok, train_pairs, val_pairs)
    except InputError as e:
        raise Refused(str(e))
    run.lap("load")
    return run


def prepare(cfg: Config, folder: Path, rank: int = 0, resume: bool = False, overwrite: bool = False) -> Run:
    """``base``, then the run folder (written only now: bad input never touches it), the
    reference directions and loss layers, the behaviour targets and the adapter."""
    run = base(cfg, rank)
    run.folder, run.resume = Path(folder), resume
    if run.zero and not resume:
        _open_folder(run, overwrite)
    log.info(f"run folder: {run.folder}")
    if log.isEnabledFor(logging.DEBUG):
        import yaml

        from .config import config_to_dict

        log.debug("config:\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    run.say(f"model {cfg.model.name} ({run.model.dtype}, "
            f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.0f}M) loaded; "
            f"{len(run.train_pairs)} train / {len(run.val_pairs)} val pairs")
    if run.zero and not resume:
        _plan(run)
        run.lap("plan")
    reused = _directions(run)
    run.lap("directions")
    _behaviour(run)
    run.lap("behaviour")
    _attach(run)
    if resume:
        _resume(run, reused)
    run.lap("attach")
    return run


def _plan(run: Run) -> None:
    """What the run is about to do, one line a stage, with the time each should take here."""
    from . import behaviour as bh
    from .plan import REFERENCE, calibrate, lines, machine_line

    try:
        n_prompts, cached = bh.planned(run.cfg, run.model, run.train_pairs, run.fingerprint)
    except bh.BehaviourError as e:
        raise Refused(f"behaviour error: {e}")
    log.info(machine_line(run.model.dtype))
    run.calibration = calibrate(run.model)
    speed = run.calibration / REFERENCE["calibration"]
    log.debug(f"calibration: {run.calibration:.3f} s for 8 x 64 tokens ({REFERENCE['calibration']} s on the "
              f"reference: {REFERENCE['machine']})")
    for line in lines(run.cfg, len(run.train_pairs) + len(run.val_pairs), n_prompts, cached, speed):
        log.info(line)


def _open_folder(run: Run, overwrite: bool) -> None:
    from .config import dump_config
    from .run import clear_run

    if overwrite:
        cleared = clear_run(run.folder)
        if cleared:
            log.info(f"--overwrite: deleted the old run's {', '.join(p.name for p in cleared)} in {run.folder}")
    run.folder.mkdir(parents=True, exist_ok=True)
    dump_config(run.cfg, run.folder / "config.yaml")


def _directions(run: Run) -> bool:
    """Reference directions, frozen, and the loss layers; a resumed run reuses its own (True)."""
    from . import directions as dirs

    reused = bool(run.resume and (run.folder / "directions.safetensors").is_file())
    if reused:
        run.directions = dirs.Directions.load(run.folder, run.fingerprint)
    else:
        run.directions = dirs.compute(run.model, run.tokenizer, run.train_pairs, run.val_pairs, run.cfg.directions,
                                      run.cfg.data.max_length, run.fingerprint)
        run.checksum.verify(run.model, "after computing directions")
        if run.zero:
            run.directions.save(run.folder)
    for layer in run.directions.selected:
        st = run.directions.stats[layer]
        log.info(f"  loss layer {layer}: corr {st['corr']:+.2f} val agreement {st['val_agreement']:.2f} "
                 f"scale {st['scale']:.2f}")
    return reused


def _behaviour(run: Run) -> None:
    """Behaviour targets (loss.w_pref / w_distill / w_kl): the base model's own completions under
    each persona and its log-probs on them, from the cache when seen before."""
    from . import behaviour as bh

    try:
        run.behaviour, run.neutral = bh.prepare(run.cfg, run.model, run.tokenizer, run.train_pairs, run.fingerprint,
                                                run.folder if run.zero else None)
    except bh.BehaviourError as e:
        raise Refused(f"behaviour error: {e}")
    run.checksum.verify(run.model, "after the behaviour targets")


def _attach(run: Run) -> None:
    from .hidden import layer_index
    from .tuners import attach

    run.model, run.adapter = attach(run.model, run.cfg.adapter, run.directions)
    last_loss = max(layer_index(layer) for layer in run.directions.selected)
    late = sorted({layer_index(t) for t in run.adapter.steered_modules()} - {-1})
    late = [i for i in late if i > last_loss]
    if late:
        log.warning(f"adapter layers {late} come after the last loss layer ({last_loss}); they get gradient "
                    "only from the NLL barrier and mostly stay at the identity. Lower adapter.depth or select later "
                    "loss layers.")
    run.say(f"adapter {run.cfg.adapter.kind}: {run.trainable} trainable parameters")


def _resume(run: Run, reused: bool) -> None:
    """The checkpoint's step, optimiser and base cache, or the finished adapter (then only the
    evaluation is left)."""
    from .checkpoint import CheckpointError, interrupted, load_checkpoint
    from .errors import UserError
    from .run import read_adapter

    try:
        if interrupted(run.folder):
            run.start, run.optimizer_state, cache = load_checkpoint(run.folder, run.adapter, run.fingerprint)
            run.base_cache = cache if reused else None  # projections on the old directions
        elif (run.folder / "adapter.safetensors").is_file():  # training had finished: evaluate
            run.adapter.load_state_tensors(read_adapter(run.folder / "adapter.safetensors")[0])
            run.start = run.cfg.train.steps
        else:
            raise CheckpointError(f"{run.folder} has neither a checkpoint nor an adapter: it stopped before its "
                                  "first checkpoint; start it again without --resume")
    except UserError as e:
        raise Refused(f"cannot resume: {e}")
    log.info(f"resuming {run.folder} at step {run.start} of {run.cfg.train.steps}")


def _loaders(run: Run):
    import torch

    from . import data
    from .checkpoint import ResumableSampler

    tcfg = run.cfg.train
    collate = data.PairCollator(run.tokenizer.pad_token_id)
    world = tcfg.devices  # 1 unless strategy=ddp (the config refuses devices > 1 otherwise)
    drop_last = len(run.encoded) > tcfg.batch_size or world > 1
    epoch, offset = ResumableSampler.position(run.start, len(run.encoded), tcfg.batch_size, drop_last)
    sampler = ResumableSampler(len(run.encoded), tcfg.seed, epoch, offset, run.rank, world, tcfg.batch_size)
    train = torch.utils.data.DataLoader(run.encoded, batch_size=tcfg.batch_size // world, collate_fn=collate,
                                        sampler=sampler, drop_last=drop_last)
    val = torch.utils.data.DataLoader(run.val_encoded, batch_size=tcfg.batch_size, collate_fn=collate)
    return train, val


def _logger(run: Run):
    """The wandb logger (offline by default), or False. Rank 0 starts the wandb run itself (so no
    setting wandb has deprecated is passed) under the id of the run folder's earlier wandb run,
    if any: ``--resume`` continues the same wandb run, its steps counted on from the checkpoint's;
    ``--overwrite`` deletes it and starts anew. An online run honours WANDB_MODE."""
    if run.cfg.log.wandb == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    from .config import config_to_dict
    from .models import hub_id, numerics

    class StepLogger(WandbLogger):
        """Lightning's wandb logger, its steps shifted by the resumed run's first step (the
        resumed Trainer counts from 0)."""

        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, None if step is None else step + run.start)

    os.environ.setdefault("WANDB_SILENT", "true")
    offline = run.cfg.log.wandb == "offline"
    where = dict(project=run.cfg.log.project, name=run.folder.name, save_dir=str(run.folder))
    if not run.zero:  # Lightning logs from rank 0 only; the other ranks' logger never starts a run
        return StepLogger(**where, offline=offline)
    import wandb

    experiment = wandb.init(project=run.cfg.log.project, name=run.folder.name, dir=str(run.folder),
                            id=_wandb_id(run.folder), resume="allow", mode="offline" if offline else None,
                            config=config_to_dict(run.cfg), allow_val_change=True)
    # the step axis Lightning's logger sets up when it starts the run itself
    experiment.define_metric("trainer/global_step")
    experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    experiment.summary.update({f"directions/{k}/{layer}": v for layer, st in run.directions.stats.items()
                               for k, v in st.items()})
    experiment.config.update({"run": {
        "base_model": hub_id(run.cfg.model.name), "base_fingerprint": run.fingerprint, **numerics(run.model),
        "trainable_parameters": run.trainable, "loss_layers": list(run.directions.selected),
        "behaviour_prompts": sum(it is not None for it in run.behaviour)}}, allow_val_change=True)
    return StepLogger(**where, experiment=experiment)


def _wandb_id(folder: Path) -> str | None:
    """The id of the newest wandb run in ``folder``/wandb, or None: each run's folder
    (``[offline-]run-<date>-<id>``, with ``-1``, ``-2`` appended when a run of that id started in
    the same second) holds ``run-<id>.wandb``."""
    runs = sorted((p for p in (folder / "wandb").glob("*run-*") if p.is_dir() and not p.is_symlink()),
                  key=lambda p: p.name.split("run-", 1)[1])
    for p in reversed(runs):
        for f in p.glob("run-*.wandb"):
            return f.stem.removeprefix("run-")
    return None


def _progress_bar():
    """Lightning's own bar (rich where installed, as Lightning picks) counting this process's
    optimiser steps out of its ``max_steps`` (a resumed run: the steps left), across epochs, with
    elapsed time and ETA (Lightning's rich bar counts batches per epoch and, with ``max_steps``,
    reads 'Epoch 0/-2')."""
    import importlib.util

    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if importlib.util.find_spec("rich") is None:
        return TQDMProgressBar()

    class StepBar(RichProgressBar):
        @property
        def total_train_batches(self):
            steps = self.trainer.max_steps
            return steps if steps > 0 else super().total_train_batches

        def _get_train_description(self, current_epoch: int) -> str:
            return f"{'steps':{len(self.validation_description)}}"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._update(self.train_progress_bar_id, trainer.global_step)

    return StepBar()


def _trainer(run: Run):
    import lightning as L

    from .checkpoint import CheckpointCallback

    tcfg = run.cfg.train
    callbacks = [CheckpointCallback(run.folder, tcfg.checkpoint_every, tcfg.steps, run.fingerprint, tcfg.seed)]
    callbacks += [_progress_bar()] if BARS["on"] else []
    if run.logger:
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(max_steps=tcfg.steps - run.start, callbacks=callbacks,
                     accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy,
                     use_distributed_sampler=False,
                     logger=run.logger, enable_checkpointing=False, num_sanity_val_steps=0,
                     val_check_interval=tcfg.val_every, check_val_every_n_epoch=None,
                     gradient_clip_val=tcfg.grad_clip, log_every_n_steps=1,
                     limit_val_batches=tcfg.val_batches or None,
                     enable_model_summary=False, enable_progress_bar=BARS["on"], default_root_dir=str(run.folder),
                     precision=tcfg.precision)


def fit(run: Run) -> bool:
    """Train from ``run.start`` to ``train.steps`` (nothing when the run had finished training).
    True on the process that saves and evaluates (global rank 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .checkpoint import interrupted, save_checkpoint
    from .module import ContrastiveModule, TrainingError

    cfg = run.cfg
    run.system = ContrastiveModule(run.model, run.adapter, run.directions, cfg.loss, cfg.train, run.checksum,
                                   start_step=run.start, optimizer_state=run.optimizer_state,
                                   base_cache=run.base_cache, behaviour=run.behaviour, neutral=run.neutral,
                                   behaviour_cfg=cfg.behaviour, pad_id=run.tokenizer.pad_token_id)
    train_loader, val_loader = _loaders(run)
    run.logger = _logger(run)
    trainer = _trainer(run)
    t_fit = time.time()
    if run.start < cfg.train.steps:
        try:
            trainer.fit(run.system, train_loader, val_loader)
        except TrainingError as e:
            sys.exit(f"training error: {e}. Nothing of this run's training was saved"
                     + (" (its last checkpoint is kept)" if interrupted(run.folder) else ""))
        except SIGTERMException:  # Lightning stops after the step in flight; keep it, and say we stopped
            step = run.start + trainer.global_step
            if run.zero and 0 < step:
                save_checkpoint(run.folder, step, run.adapter, trainer.optimizers[0], run.fingerprint, cfg.train.seed,
                                run.system.base_cache.state_tensors())
            print(f"stopped by SIGTERM after step {step} of {cfg.train.steps}; checkpoint kept: continue with "
                  f"`python train.py --resume {run.folder}`", file=sys.stderr)
            sys.exit(143)
    run.fit_seconds = time.time() - t_fit
    run.lap("fit")
    if trainer.is_global_zero:
        run.say(f"trained {cfg.train.steps - run.start} steps")
    return trainer.is_global_zero


def finish(run: Run) -> None:
    """Save the adapter (the base must be untouched), drop the checkpoint, evaluate, write the
    report and timing.json."""
    from .card import write_card
    from .checkpoint import FOLDER as CKPT
    from .io import write_json
    from .run import save_adapter

    run.checksum.verify(run.model, "before saving")
    save_adapter(run.folder, run.adapter, run.fingerprint)
    run.checksum.verify(run.model, "after saving")
    shutil.rmtree(run.folder / CKPT, ignore_errors=True)  # the saved adapter supersedes it
    if run.logger:
        _log_adapter(run)
    run.lap("save")
    t_eval = time.time()
    if run.cfg.eval.enabled:
        evaluate(run)
    run.lap("evaluate")
    write_card(run.folder)  # README.md: a model card with the evaluation, for the Hub as it is
    steps = run.cfg.train.steps - run.start
    write_json(run.folder / "timing.json", {
        "seconds": time.time() - run.t0, "fit_seconds": run.fit_seconds,
        "step_seconds": run.fit_seconds / max(steps, 1), "eval_seconds": time.time() - t_eval,
        "trainable_parameters": run.trainable, "kind": run.cfg.adapter.kind, "calibration": run.calibration,
        "dtype": str(run.model.dtype).removeprefix("torch."),
        "stages": {k: round(v, 2) for k, v in run.stages.items()}})
    if run.logger:
        run.logger.experiment.finish()
    print(f"done in {time.time() - run.t0:.0f}s: {run.folder}")


def evaluate(run: Run):
    """The dose-response evaluation of the trained adapter against the baselines, written into
    the run folder (report.md/.csv/.json/.png) and to wandb; returns the Report."""
    from . import behaviour as bh
    from .evaluate.report import markdown, write_report
    from .evaluate.scoring import NonFiniteOutputs
    from .evaluate.sweep import evaluate_run

    title = f"Evaluation of {run.folder.name}"
    try:
        report = evaluate_run(run.model, run.tokenizer, run.directions, run.train_pairs, run.val_pairs, run.cfg)
    except NonFiniteOutputs as e:
        sys.exit(f"evaluation error: {e}. The adapter is saved in {run.folder}; evaluate it at other coefficients "
                 f"with `python -m adapters eval --run {run.folder} --coeffs ...`")
    report.examples = bh.examples(run.folder)
    run.checksum.verify(run.model, "after evaluation")
    paths = write_report(report, run.folder, title=title)
    log.info(markdown(report, title=title))
    if run.logger:
        _log_evaluation(run, report, paths["png"])
    return report


GENERATION_PROMPTS = ("Describe yourself in one sentence.", "Did you ever lie to me?")
"""The fixed prompts of the wandb generations table (at the sweep's coefficients among -2, -1, 0, 1, 2)."""


def generations(model, tokenizer, prompts, coeffs: list[float]) -> list[list]:
    """[prompt, c, text] for each prompt at each coefficient (32 greedy tokens): the coefficients of
    a prompt in one call (one batch where the adapter takes per-example c); where one breaks,
    each on its own, so the others keep their text."""
    from .steer import CoefficientError, generate

    def texts(prompt: str, cs: list[float]) -> dict[float, str]:
        try:
            return generate(model, tokenizer, prompt, cs, max_new_tokens=32)
        except CoefficientError:
            if len(cs) == 1:
                return {cs[0]: "(outputs not finite at this coefficient)"}
            return {c: texts(prompt, [c])[c] for c in cs}

    return [[prompt, c, text] for prompt in prompts for c, text in texts(prompt, coeffs).items()]


def _log_adapter(run: Run) -> None:
    """The saved adapter, its directions and config as a versioned wandb artifact (type model).
    A failure is reported and skipped: the run folder holds the same files."""
    import re

    import wandb

    from .models import hub_id

    try:
        art = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"adapter-{run.folder.name}")[:128], type="model", metadata={
            "base_model": hub_id(run.cfg.model.name), "base_fingerprint": run.fingerprint,
            "kind": run.cfg.adapter.kind, "trainable_parameters": run.trainable, "steps": run.cfg.train.steps})
        for name in ("adapter.safetensors", "directions.safetensors", "directions.json", "config.yaml"):
            if (run.folder / name).is_file():
                art.add_file(str(run.folder / name))
        run.logger.experiment.log_artifact(art)
    except (OSError, ValueError, wandb.errors.Error) as e:
        log.warning(f"wandb: the adapter artifact was not logged ({e}); {run.folder} holds its files")


def _log_evaluation(run: Run, report, png: Path) -> None:
    """The report (tables and plot), its headline figures in the run summary, and a table of
    generations at the coefficients for a few fixed prompts (a coefficient whose outputs are not
    finite gets that written instead of a text)."""
    import wandb

    from .evaluate.report import wandb_payload

    coeffs = [c for c in run.cfg.eval.coeffs if c in (-2.0, -1.0, 0.0, 1.0, 2.0)]
    rows = generations(run.model, run.tokenizer, GENERATION_PROMPTS, coeffs)
    run.logger.experiment.log({**wandb_payload(report, png),
                               "eval/generations": wandb.Table(columns=["prompt", "coeff", "text"], data=rows)})
    run.logger.experiment.summary.update({f"eval/{r['method']}/{r['probe']}/{k}": r[k] for r in report.summary
                                          for k in ("slope", "r2", "score", "shift_up", "shift_down") if k in r})


def load(folder: str | Path, device: str = "auto", dtype: str | None = None) -> Run:
    """A finished run folder (or a Hub repo id holding one: ``run.resolve``) back: its config, the
    base model with the run's adapter attached (fingerprint and base weights checked) and the
    checksum of the base weights. The directions are read on demand
    (``directions.Directions.load(run.folder, run.fingerprint)``)."""
    from .config import load_config
    from .models import BaseChecksum, base_fingerprint, load_base
    from .run import RunError, is_finished, load_adapter, resolve

    folder = resolve(folder)
    if not folder.exists():
        raise RunError(f"{folder} does not exist: give a run folder (runs/<name>) or a Hub repo id (user/name)")
    if not is_finished(folder):
        raise RunError(f"{folder} is not a finished run folder (needs config.yaml and adapter.safetensors)")
    cfg = load_config(folder / "config.yaml")
    model, tok = load_base(cfg.model.name, dtype or cfg.model.dtype, device, cfg.model.quantization)
    checksum = BaseChecksum(model)
    fingerprint = base_fingerprint(model)
    model, adapter = load_adapter(model, folder / "adapter.safetensors")
    checksum.verify(model, "after loading the adapter")
    return Run(cfg, folder, model, tok, checksum, fingerprint, adapter=adapter)


def load_run(folder: str | Path, device: str = "auto", dtype: str | None = None):
    """(model, tokenizer) = base model + the run's adapter, fingerprint checked
    (``pipeline.load`` gives the whole run: config, checksum, fingerprint, adapter).

        model, tokenizer = load_run("runs/honesty")
        with steer(model, -1.0):
            model.generate(...)
    """
    run = load(folder, device, dtype)
    return run.model, run.tokenizer
