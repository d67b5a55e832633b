"""Independent steering-vector libraries as evaluation baselines: repeng and steering-vectors.

Each is trained by its own code, with its own defaults, on the run's training pairs (each pair
rendered to its two chat texts, assistant turn left open), then swept like the PCA vector:
coefficient c adds c·w_l at the output of each steered decoder layer, on every token, which is
how both libraries apply their vectors by default (tested against their own application).

* repeng 0.4.0: ``ControlVector.train`` (method pca_diff: sklearn PCA of the last-token
  pos-neg differences, a unit vector per layer, sign-aligned), read at every layer; steered at
  the layers of its README's example, ``range(-5, -18, -1)`` on a 32-layer model (layers 27 down
  to 15), taken at the same relative depths of this model.
* steering-vectors 0.12.2: ``train_steering_vector`` (mean last-token pos-neg difference, not
  normalised) at every decoder layer, all of them steered (``layers=None``, its default).

Their coefficient scales differ from ours and from each other; the report's shift within a
ΔNLL budget is what makes them comparable. Install: ``pip install -e '.[peers]'`` and
``pip install --no-deps repeng==0.4.0 steering-vectors==0.12.2`` (their pins conflict with
NumPy 2 and transformers 5, on which both run).
"""

from __future__ import annotations

import torch

from .data import ContrastivePair, render

PEERS = ("repeng", "steering_vectors")
REPENG_LAYERS = range(-5, -18, -1)
"""repeng's example layers, for a 32-layer model."""


def repeng_layers(n: int) -> list[int]:
    """repeng's example layers at the same relative depths of an ``n``-layer model."""
    return sorted({min(n - 1, max(1, round(n * (32 + i) / 32))) for i in REPENG_LAYERS})


class PeerError(ValueError):
    """A peer baseline that cannot run (unknown name, or its package is missing)."""


def _import(name: str):
    try:
        if name == "repeng":
            import numpy as np

            if not hasattr(np, "float_"):  # repeng 0.4.0 annotates with np.float_, which NumPy 2 removed
                np.float_ = np.float64
            import repeng

            return repeng
        import steering_vectors

        return steering_vectors
    except ImportError as e:
        raise PeerError(f"peer baseline {name!r} needs the optional extra: pip install -e '.[peers]' && pip "
                        "install --no-deps repeng==0.4.0 steering-vectors==0.12.2 (or drop it from eval.baselines): "
                        f"{e}") from None


def _texts(tokenizer, pairs: list[ContrastivePair]) -> list[tuple[str, str]]:
    return [(render(tokenizer, p.positive, p.suffix, p.system), render(tokenizer, p.negative, p.suffix, p.system))
            for p in pairs]


@torch.no_grad()
def peer_vectors(name: str, model, tokenizer, pairs: list[ContrastivePair]) -> dict[str, torch.Tensor]:
    """{module name: (D,) vector} of peer ``name`` trained on ``pairs`` with its defaults.
    ``model`` is the plain base model (an attached adapter must be off)."""
    if name not in PEERS:
        raise PeerError(f"unknown peer baseline {name!r}; choose one of {list(PEERS)}")
    lib = _import(name)
    texts = _texts(tokenizer, pairs)
    n = int(model.config.num_hidden_layers)
    dtype = next(model.parameters()).dtype
    if name == "repeng":
        dataset = [lib.DatasetEntry(positive=a, negative=b) for a, b in texts]
        cv = lib.ControlVector.train(model, tokenizer, dataset)
        layers = repeng_layers(n)
        return {f"model.layers.{i}": torch.as_tensor(cv.directions[i]).to(dtype) for i in layers}
    sv = lib.train_steering_vector(model, tokenizer, texts)
    return {f"model.layers.{i}": v.detach().to("cpu", dtype) for i, v in sorted(sv.layer_activations.items())}


def peer_method(name: str, model, tokenizer, pairs: list[ContrastivePair], coeffs):
    """The peer's vector as an evaluation Method (swept like the PCA vector)."""
    from .evaluate import _has_adapter, vector_method
    from .hidden import base_model_of
    from .steer import steer

    plain = base_model_of(model)
    if _has_adapter(model):
        with steer(model, 0.0):
            vectors = peer_vectors(name, plain, tokenizer, pairs)
    else:
        vectors = peer_vectors(name, plain, tokenizer, pairs)
    return vector_method(model, vectors, coeffs, name)
