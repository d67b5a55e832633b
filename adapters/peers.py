"""Independent steering-vector libraries as evaluation baselines: repeng and steering-vectors.

Each is trained by its own code, with its own defaults, on the run's training pairs (each pair
rendered to its two chat texts, assistant turn left open), converted to {decoder-layer module
name: (D,) vector} and swept like the PCA vector (``evaluate.methods.peer_method``): coefficient c
adds c·w_l to the output of each steered decoder layer, on every token. That is how both
libraries apply their vectors at multiplier c (tests/test_peers.py checks the logits against
their own application):

* repeng 0.4.0: ``ControlVector.train`` with its defaults (method "pca_diff", batch size 32):
  the last non-padding token's hidden state of each text at every layer but the first
  (``output_hidden_states[l + 1]``), one sklearn PCA component of the pos-neg differences per
  layer (a unit vector), its sign flipped so that most pairs project higher on the positive
  side. ``ControlModel.set_control(v, c)`` adds c·v to a wrapped decoder layer's output, no
  normalisation (``normalize=False``), on every token from each row's first position id 0
  (i.e. not on left padding, which no real token attends to anyway). Its API has no default
  layers: we steer at its README example's ``range(-5, -18, -1)`` on a 32-layer model (layers
  27 down to 15), taken at the same relative depths of this model (``repeng_layers``).
  Training is given the plain model (its API takes one; a ControlModel without a control
  returns the same hidden states), so nothing is wrapped; a leftover wrapper would be removed.
  Under transformers 5 repeng's own application fails for batches > 1 unless the caller passes
  per-row ``position_ids`` (transformers passes one (1, T) row, repeng reshapes it to (B, T)),
  one more reason to apply its vectors ourselves.
* steering-vectors 0.12.2: ``train_steering_vector`` with its defaults (every decoder layer,
  ``read_token_index=-1``: the last non-padding token, mean aggregator: the mean pos-neg
  difference, not normalised) except the batch size: 32 texts per forward pass instead of 1
  (the library reads each row's last real token whatever the padding, so the vector is the
  same to fp32 rounding; tests/test_peers.py checks it).
  ``SteeringVector.apply(model, multiplier=c)`` adds c·v to every decoder layer's output on
  every token (``min_token_index=0``).

Their coefficient scales differ from ours and from each other (a unit vector, a raw mean
difference); the report's shift within a ΔNLL budget is what makes them comparable. Training
leaves the model as it was: module names, every base tensor (``BaseChecksum``), train/eval
modes, requires_grad flags, and no hooks but transformers' own inert output-capturing ones
(installed once per model by the first ``output_hidden_states=True`` forward, whoever makes it).

Trained vectors are cached across runs (``CONTRASTIVE_ADAPTERS_CACHE``/peers), keyed by the
peer and its version, the base model's fingerprint and dtype, the pairs' texts and the layers.

Install: ``pip install -e '.[peers]'`` then ``pip install --no-deps repeng==0.4.0
steering-vectors==0.12.2``: their pins (NumPy < 2, transformers < 5) conflict with this project's
stack, on which both run (see pyproject.toml).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import time
from pathlib import Path

import torch

from .data import ContrastivePair, render
from .errors import UserError

PEERS = ("repeng", "steering_vectors")
DISTRIBUTIONS = {"repeng": "repeng", "steering_vectors": "steering-vectors"}
SV_BATCH = 32
"""Texts per forward pass when steering-vectors extracts activations (its default is 1)."""
REPENG_LAYERS = range(-5, -18, -1)
"""repeng's example layers, for a 32-layer model."""
INSTALL = "pip install -e '.[peers]' && pip install --no-deps repeng==0.4.0 steering-vectors==0.12.2"


def repeng_layers(n: int) -> list[int]:
    """repeng's example layers (``range(-5, -18, -1)`` of 32: 15..27) at the same relative depths
    of an ``n``-layer model, i.e. round(n·k/32) for k = 15..27 (duplicates merged), kept within
    1..n-2: the example never steers the last layer (whose ``hidden_states`` entry repeng reads
    after the final norm) nor the first (which its training skips)."""
    return sorted({min(n - 2, max(1, round(n * (32 + i) / 32))) for i in REPENG_LAYERS}) if n > 2 else [n - 1]


class PeerError(UserError):
    """A peer baseline that cannot run (unknown name, or its package is missing)."""


def _check_name(name: str) -> None:
    if name not in PEERS:
        raise PeerError(f"unknown peer baseline {name!r}; choose one of {list(PEERS)}")


def _import(name: str):
    """The peer's package, or PeerError with the install hint."""
    _check_name(name)
    try:
        if name == "repeng":
            import numpy as np

            # repeng 0.4.0 annotates ControlVector.__mul__ with np.float_, which NumPy 2 removed; the
            # annotation is only evaluated while the module is imported, so the alias lives no longer
            added = not hasattr(np, "float_")
            if added:
                np.float_ = np.float64
            try:
                import repeng
            finally:
                if added:
                    del np.float_
            return repeng
        import steering_vectors

        return steering_vectors
    except ImportError as e:
        raise PeerError(f"peer baseline {name!r} needs the optional extra: {INSTALL} "
                        f"(or drop it from eval.baselines): {e}") from None


def _texts(tokenizer, pairs: list[ContrastivePair]) -> list[tuple[str, str]]:
    return [(render(tokenizer, p.positive, p.suffix, p.system), render(tokenizer, p.negative, p.suffix, p.system))
            for p in pairs]


def _foreign_hooks(model) -> dict[tuple[int, str, int], torch.nn.Module]:
    """Forward (pre-)hooks on the model's modules other than transformers' output capturing."""
    out = {}
    for m in model.modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks"):
            for hid, fn in getattr(m, kind).items():
                if not getattr(fn, "__module__", "").startswith("transformers.utils.output_capturing"):
                    out[(id(m), kind, hid)] = m
    return out


def _unwrap_repeng(model) -> None:
    """Put back any decoder layer repeng wrapped in a ControlModule (ControlModel.unwrap without
    the ControlModel)."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if type(child).__name__ == "ControlModule" and type(child).__module__.startswith("repeng"):
                parent._modules[key] = child.block


@contextlib.contextmanager
def _untouched(model, who: str):
    """Run a peer's training; then restore train/eval modes and requires_grad flags, remove any
    wrapper or hook it left, and check that module names and every base tensor are as before."""
    from .models import BaseChecksum

    names = [n for n, _ in model.named_modules()]
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    hooks = set(_foreign_hooks(model))
    checksum = BaseChecksum(model)
    try:
        yield
    finally:
        _unwrap_repeng(model)
        for key, m in _foreign_hooks(model).items():
            if key not in hooks:
                getattr(m, key[1]).pop(key[2], None)
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)
    if [n for n, _ in model.named_modules()] != names:
        raise RuntimeError(f"{who} changed the model's modules")
    checksum.verify(model, f"after {who}")


@torch.no_grad()
def _train(name: str, model, tokenizer, pairs: list[ContrastivePair], layers: list[int] | None = None,
           sv_batch: int = SV_BATCH):
    """(the library's own trained vector object, {module name: (D,) vector}) for peer ``name``."""
    lib = _import(name)
    texts = _texts(tokenizer, pairs)
    dtype = next(model.parameters()).dtype
    if name == "repeng":
        from repeng.control import model_layer_list

        blocks = model_layer_list(model)
        n = len(blocks)
        steer = repeng_layers(n) if layers is None else sorted({i % n for i in layers})
        with _untouched(model, "repeng"):
            cv = lib.ControlVector.train(model, tokenizer, [lib.DatasetEntry(positive=a, negative=b) for a, b in texts])
        missing = [i for i in steer if i not in cv.directions]
        if missing:  # repeng trains layers 1..n-1
            raise PeerError(f"repeng trains no vector at layer(s) {missing} (it reads layers 1..{n - 1})")
        name_of = {id(m): k for k, m in model.named_modules()}
        return cv, {name_of[id(blocks[i])]: torch.as_tensor(cv.directions[i]).to(dtype) for i in steer}
    from steering_vectors.layer_matching import collect_matching_layers, guess_and_enhance_layer_config

    with _untouched(model, "steering_vectors"):
        sv = lib.train_steering_vector(model, tokenizer, texts, layers=layers, batch_size=sv_batch,
                                       show_progress=False)
    matcher = guess_and_enhance_layer_config(model, None, sv.layer_type)[sv.layer_type]
    blocks = collect_matching_layers(model, matcher)
    return sv, {blocks[i]: v.detach().to("cpu", dtype) for i, v in sorted(sv.layer_activations.items())}


def cache_key(name: str, model, tokenizer, pairs: list[ContrastivePair], layers: list[int] | None) -> str:
    """What a peer's vector depends on: the peer and its version, the base model (fingerprint and
    numerics), the texts it is trained on and the layers."""
    from .models import base_fingerprint, numerics

    h = hashlib.sha256(json.dumps({
        "peer": name, "version": importlib.metadata.version(DISTRIBUTIONS[name]), "sv_batch": SV_BATCH,
        "fingerprint": base_fingerprint(model), "numerics": numerics(model),
        "layers": layers, "texts": _texts(tokenizer, pairs)}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def peer_vectors(name: str, model, tokenizer, pairs: list[ContrastivePair], layers: list[int] | None = None,
                 cache: Path | None = None, log=None) -> dict[str, torch.Tensor]:
    """{module name: (D,) vector} of peer ``name`` trained on ``pairs`` with its defaults (repeng:
    at ``repeng_layers``, steering_vectors: every layer, unless ``layers`` names decoder-layer
    indices). ``model`` is the plain base model (an attached adapter must be off). With ``cache``
    (a folder), a vector trained before on the same key is read instead of trained again."""
    from safetensors import SafetensorError

    from .io import load_tensors, save_tensors

    _import(name)
    path = cache / f"{name}-{cache_key(name, model, tokenizer, pairs, layers)}.safetensors" if cache else None
    if path is not None and path.is_file():
        try:
            vectors, _ = load_tensors(path)
        except (OSError, ValueError, SafetensorError) as e:  # damaged: train again (and replace it)
            if log:
                log(f"peer {name}: the cached vector {path} is unreadable ({e}); training again")
        else:
            if log:
                log(f"peer {name}: vector from the cache ({path.name})")
            return vectors
    t0 = time.time()
    vectors = _train(name, model, tokenizer, pairs, layers)[1]
    if path is not None:
        save_tensors(path, vectors, {"peer": name})
    if log:
        log(f"peer {name}: trained on {len(pairs)} pairs [{time.time() - t0:.0f}s]"
            + (f", cached as {path.name}" if path is not None else ""))
    return vectors
