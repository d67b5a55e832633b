"""Every input of a run checked before anything is written: all problems reported at once.

``check_inputs`` reads the pairs, probe and neutral-text files (no model needed);
``check_model_inputs`` checks what depends on the loaded model (layer patterns, context
length, tokenised pairs). Each raises one InputError listing every problem.
"""

from __future__ import annotations

from .config import Config
from .errors import UserError


class InputError(UserError):
    """One or more bad inputs; the message lists each problem and what to fix."""


def _raise_if(problems: list[str]) -> None:
    if len(problems) == 1:
        raise InputError(f"input error: {problems[0]}")
    if problems:
        raise InputError(f"input errors ({len(problems)}):\n  - " + "\n  - ".join(problems))


def device_problems(cfg: Config) -> list[str]:
    """model.device and train.accelerator against what this machine has."""
    import torch

    problems, cuda = [], torch.cuda.is_available()
    dev = cfg.model.device
    if dev.startswith("cuda"):
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if not cuda:
            problems.append(f"model.device={dev!r}, but this machine has no CUDA GPU (torch sees none); use "
                            "auto or cpu")
        elif index >= torch.cuda.device_count():
            problems.append(f"model.device={dev!r}, but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    acc = cfg.train.accelerator
    if acc in ("gpu", "cuda") and not cuda:
        problems.append(f"train.accelerator={acc!r}, but this machine has no CUDA GPU; use auto or cpu")
    elif acc == "mps" and not torch.backends.mps.is_available():
        problems.append("train.accelerator='mps', but MPS is not available here; use auto or cpu")
    elif acc not in ("auto", "cpu", "gpu", "cuda", "mps"):
        problems.append(f"train.accelerator={acc!r} is not valid; choose one of auto, cpu, gpu, cuda, mps")
    if cfg.train.devices > 1 and acc in ("gpu", "cuda", "auto") and cuda and cfg.train.devices > torch.cuda.device_count():
        problems.append(f"train.devices={cfg.train.devices}, but this machine has {torch.cuda.device_count()} "
                        "CUDA device(s)")
    return problems


def check_inputs(cfg: Config):
    """Pairs, probe and neutral-text files, and the devices: (train, val) pairs, or InputError
    listing every problem."""
    from . import data, probes

    problems, split = device_problems(cfg), ([], [])
    try:
        pairs = data.load_pairs(cfg.data)
        split = data.split_pairs(pairs, cfg.data.val_fraction, cfg.train.seed)
    except data.PairsError as e:
        problems.append(str(e))
    from . import behaviour

    checks = [(cfg.loss.behaviour and cfg.behaviour.generate, behaviour.question_lines, cfg.behaviour.prompts),
              (cfg.loss.w_kl > 0, behaviour.neutral_lines, cfg.behaviour.neutral)]
    for needed, read, spec in checks:
        try:
            if needed:
                read(spec)
        except behaviour.BehaviourError as e:
            problems.append(str(e))
    if cfg.eval.enabled:
        from . import peers

        for name in (b for b in cfg.eval.baselines if b in peers.PEERS):
            try:
                peers._import(name)
            except peers.PeerError as e:
                problems.append(str(e))
        for kind in cfg.eval.probes:
            try:
                probes.probe_rows(kind, cfg.eval)
            except probes.ProbeError as e:
                problems.append(str(e))
        try:
            probes.neutral_texts(cfg.eval.neutral)
        except probes.ProbeError as e:
            problems.append(str(e))
    _raise_if(problems)
    return split


def check_model_inputs(cfg: Config, model, tok, train_pairs, val_pairs):
    """What depends on the model: layer patterns, context length, tokenised pairs (all at once)."""
    from . import data, hidden

    problems, encoded = [], ([], [])
    for what, patterns, depth in (("directions.candidates", cfg.directions.candidates, cfg.directions.depth),
                                  ("directions.explicit", cfg.directions.explicit, (0.0, 1.0)),
                                  ("adapter.targets", cfg.adapter.targets, cfg.adapter.depth)):
        if not patterns:
            continue
        try:
            hidden.resolve(model, patterns, depth)
        except hidden.LayerError as e:
            problems.append(f"{what}: {e}")
    context = getattr(hidden.base_model_of(model).config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        problems.append(f"data.max_length={cfg.data.max_length} exceeds the model's context of {context} tokens")
    if cfg.train.devices > 1 and len(train_pairs) < cfg.train.batch_size:
        problems.append(f"{len(train_pairs)} training pairs do not fill one global batch of train.batch_size="
                        f"{cfg.train.batch_size} across {cfg.train.devices} devices: add pairs or lower the batch")
    try:
        encoded = (data.encode_pairs(tok, train_pairs, cfg.data.max_length),
                   data.encode_pairs(tok, val_pairs, cfg.data.max_length))
    except data.PairsError as e:
        problems.append(str(e))
    _raise_if(problems)
    return encoded
