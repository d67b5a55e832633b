"""What an evaluation sweeps: the trained adapter and the baselines, each a ``Method``.

Baselines (``eval.baselines``; ``BASELINES`` builds each by name, the sweep command shares it):
* prompting: dishonest / no / honest persona system prompt as c = -1 / 0 / +1;
* pca_vector: the additive steering vector v_l · s_l at the loss layers;
* mean_diff: the same from the mean-difference direction;
* random: a random direction of the PCA vector's norm (the control any vector must beat);
* base: the unsteered model, one row at c = 0;
* the independent steering libraries (``peers.PEERS``), trained on the same pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from .. import hidden
from ..config import Config
from ..quiet import log as _log
from ..steer import steer


@dataclass
class Method:
    """Something steerable: ``context(c)`` is active while the probes run at coefficient c;
    ``system(c)`` is the system prompt used at c (prompting baseline). With ``per_example``
    the context takes a 1-d tensor of per-row coefficients, and the sweep runs every
    coefficient in the same forward passes."""

    name: str
    coeffs: list[float]
    context: callable = None
    system: callable = None
    per_example: bool = False
    scalable: bool = False  # c is a continuous dose (adapter, vectors): the shift search may add coefficients
    prefix: int = 0  # decoder layers below this one are the same at every c: computed once per item
    zero_is_base: bool = True
    """At c = 0 it computes the base model with no system prompt (the sweep shares that row)."""

    def ctx(self, c):
        return self.context(c) if self.context else contextlib.nullcontext()

    def sys(self, c):
        return self.system(c) if self.system else ""


def has_adapter(model) -> bool:
    """Whether one of our adapters is attached to ``model``."""
    from ..tuners.base import ATTR

    return ATTR in model.__dict__


def adapter_off(model):
    """A block in which the model's own adapter (if it has one) is at 0: the base model, for the
    baselines."""
    return steer(model, 0.0) if has_adapter(model) else contextlib.nullcontext()


def adapter_method(model, coeffs, name="adapter") -> Method:
    from ..tuners.base import attached_adapter

    adapter = attached_adapter(model)
    return Method(name, list(coeffs), context=lambda c: steer(model, c), per_example=adapter.per_example,
                  scalable=True, prefix=hidden.first_layer(adapter.steered_modules()))


def vector_method(model, vectors: dict[str, torch.Tensor], coeffs, name="pca_vector") -> Method:
    """An additive steering vector (name -> (D,)), added by the maths of an unbound
    AdditiveAdapter (``edit``), with the model's own adapter off."""
    from ..tuners import AdditiveAdapter
    from ..tuners.base import param_key

    dim = next(iter(vectors.values())).numel()
    vec = AdditiveAdapter(model, None, list(vectors), dim).to(next(model.parameters()).device)
    # by name: the ParameterDict orders its keys as text (layers.10 before layers.2), not as given
    vec.load_state_tensors({f"additive_vectors.{param_key(k)}": v for k, v in vectors.items()})

    @contextlib.contextmanager
    def ctx(c):  # the vectors' hooks live only in the block (the model's own hooks belong to its adapter)
        edits = {n: (lambda h, n=n: vec.edit(None, n, h, c)) for n in vec.targets}
        with adapter_off(model), hidden.hooks(model, edits):
            yield

    return Method(name, list(coeffs), context=ctx, per_example=True, scalable=True,
                  prefix=hidden.first_layer(list(vectors)))


def prompting_method(model, positive: str, negative: str, template: str = "You are {persona} person.") -> Method:
    """Persona system prompts as c = -1 / 0 / +1 (the published baseline steering must beat)."""
    systems = {-1.0: template.format(persona=negative), 0.0: "", 1.0: template.format(persona=positive)}
    return Method("prompting", [-1.0, 0.0, 1.0], context=lambda c: adapter_off(model),
                  system=lambda c: systems[float(c)], per_example=True)


def base_method(model) -> Method:
    """The unsteered base model: one row at c = 0."""
    return Method("base", [0.0], context=lambda c: adapter_off(model), per_example=True)


def pca_vectors(directions, layers=None) -> dict[str, torch.Tensor]:
    """A steering vector from directions: v_l scaled by the typical pos-neg separation s_l."""
    layers = layers or directions.selected
    return {layer: directions.v(layer) * directions.scale[layer] for layer in layers}


def random_vectors(like: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random directions with the same norms as ``like`` (the control any steering vector must beat)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, v in like.items():
        r = torch.randn(v.shape, generator=g, dtype=torch.float32)
        out[layer] = (r / r.norm() * v.float().norm()).to(v.dtype)
    return out


def peer_method(name: str, model, tokenizer, pairs, coeffs, layers: list[int] | None = None, cache=None,
                log=None) -> Method:
    """An independent library's vector (``peers.PEERS``), trained on ``pairs`` (or read from
    ``cache``), swept over ``coeffs`` like the PCA vector (c adds c·vector at each steered decoder
    layer's output, on every token)."""
    from ..hidden import base_model_of
    from ..peers import peer_vectors

    with adapter_off(model):
        vectors = peer_vectors(name, base_model_of(model), tokenizer, pairs, layers, cache, log)
    return vector_method(model, vectors, coeffs, name)


@dataclass
class Inputs:
    """What the baselines are built from: the model (with the trained adapter, turned off for
    them), its tokenizer, the run's config, and (for the vectors) its directions and pairs."""

    model: object
    tokenizer: object
    cfg: Config
    directions: object = None
    train_pairs: list = None
    val_pairs: list = None
    log: callable = _log.info


def _pca(x: Inputs) -> Method:
    return vector_method(x.model, pca_vectors(x.directions), x.cfg.eval.coeffs, "pca_vector")


def _mean_diff(x: Inputs) -> Method:
    from ..directions import fit_methods

    with adapter_off(x.model):
        one = dataclasses.replace(x.cfg.directions, components=1)
        md = fit_methods(x.model, x.tokenizer, x.train_pairs, x.val_pairs, one, x.cfg.data.max_length,
                         ["mean_diff"], layers=list(x.directions.selected))["mean_diff"]
    return vector_method(x.model, pca_vectors(md, x.directions.selected), x.cfg.eval.coeffs, "mean_diff")


def _random(x: Inputs) -> Method:
    return vector_method(x.model, random_vectors(pca_vectors(x.directions), x.cfg.train.seed), x.cfg.eval.coeffs,
                         "random")


def _prompting(x: Inputs) -> Method:
    return prompting_method(x.model, x.cfg.data.positive, x.cfg.data.negative, x.cfg.eval.prompt_template)


def _base(x: Inputs) -> Method:
    return base_method(x.model)


BASELINES = {"prompting": _prompting, "pca_vector": _pca, "mean_diff": _mean_diff, "random": _random, "base": _base}
"""Our own baselines by name; every other name in eval.baselines is a peer (``peers.PEERS``)."""
NEEDS_DIRECTIONS = ("pca_vector", "mean_diff", "random")


def baseline_methods(names: list[str], x: Inputs) -> list[Method]:
    """The named baselines, in the order given."""
    from ..models import cache_dir

    return [BASELINES[name](x) if name in BASELINES else
            peer_method(name, x.model, x.tokenizer, x.train_pairs, x.cfg.eval.coeffs, cache=cache_dir() / "peers",
                        log=x.log)
            for name in names]
