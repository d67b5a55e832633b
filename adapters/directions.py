"""Frozen reference directions: per-layer directions from pos/neg pairs, sign-aligned, with stats.

For each candidate layer l, ``D_l = H_pos - H_neg`` (n_pairs, D) from the hidden state of the
last suffix token (or the mean of the last k). Methods (``METHODS``; an unknown name is an
error that lists them):

* ``pca_diff``: top right-singular vectors of ``D_l`` **uncentred** (the mean difference is
  the signal); ``mean_diff``: mean(D_l).
* ``pca_diff_weighted``: pairs weighted by w = n·softmax(l), l_i = mean over both members of
  the mean log-prob of the suffix tokens; top right-singular vectors of sqrt(w)[:, None]·D_l
  (a constant factor on w, such as 2·softmax, gives the same vectors).
* Gradient methods use g_i = g_pos_i - g_neg_i, the gradient of the pair's log-prob margin
  lp_pos_i - lp_neg_i w.r.t. one vector added to the layer's output of both members
  (``collect_grads``). ``svd_grad``: top right-singular vectors of G (n, D), uncentred.
* ``fisher_steer_reg{k}``: v = solve(F + λI, mean(g)), F = GᵀG / n (empirical Fisher);
  ``fisher_steer_cov_reg{k}``: F = the centred covariance of g. λ = 10^-k · tr(F)/D, i.e.
  relative to F's mean eigenvalue, so v does not change when the gradients are rescaled.
* Dual variants, λ = 1e-2 relative: ``fisher_steer_dual_pos`` / ``_neg`` solve with
  (F_pos, mean g_pos) / (F_neg, mean g_neg); ``_diff`` = unit(v_pos) - unit(v_neg);
  ``fisher_steer_dual`` = solve((F_pos + F_neg)/2 + λI, mean(g_pos - g_neg)); ``_cov`` the
  same with covariances.

pca_diff, pca_diff_weighted and svd_grad give k >= 1 components; the others give one vector
and raise for k > 1. Every component is flipped so that ``mean(D_l @ v) > 0``, and we record:

* agreement  = mean(D_l @ v > 0) on the training pairs;
* scale s_l  = mean(|D_l @ v|), the typical separation (layers become comparable);
* on held-out pairs: separation = mean(D @ v) / s_l, val agreement, and the Pearson
  correlation between the projection h @ v and the label (pos = 1, neg = 0).

Loss layers are then selected by |correlation| (top-k, or the best of each of k depth bands),
every k-th, or an explicit list.

``fit_direction(D, method, k, grads, logp)`` is a pure function on tensors: ``grads`` is
{"g_pos": (n, D), "g_neg": (n, D)} at one layer and ``logp`` is (lp_pos, lp_neg), each (n,),
as returned per layer by ``collect_grads``. ``fit_methods`` fits many methods from one pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional import pearson_corrcoef

from . import hidden
from .config import DirectionsConfig
from .data import PairCollator, encode_pairs
from .errors import UserError
from .io import load_tensors, read_json, save_tensors, write_json
from .loss import masked_mean, token_nll
from .quiet import progress

_RIDGE = {**{f"fisher_steer_reg{k}": 10.0 ** -k for k in range(1, 6)},
          **{f"fisher_steer_cov_reg{k}": 10.0 ** -k for k in range(1, 6)}}
DUAL = ("fisher_steer_dual", "fisher_steer_dual_cov", "fisher_steer_dual_pos", "fisher_steer_dual_neg",
        "fisher_steer_dual_diff")
GRAD_METHODS = ("svd_grad", *_RIDGE, *DUAL)
METHODS = ("pca_diff", "mean_diff", "pca_diff_weighted", *GRAD_METHODS)
MULTI = ("pca_diff", "pca_diff_weighted", "svd_grad")  # methods that give k > 1 components
DUAL_RIDGE = 1e-2


class DirectionsError(UserError):
    pass


@dataclass
class Directions:
    method: str
    layers: list[str]
    vectors: dict[str, torch.Tensor]  # name -> (k, D), unit rows, sign-aligned
    scale: dict[str, float]
    stats: dict[str, dict] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def v(self, name: str) -> torch.Tensor:
        """The first (loss) direction of a layer, (D,)."""
        return self.vectors[name][0]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = {"method": self.method, "layers": self.layers, "scale": self.scale,
                "selected": self.selected, "fingerprint": self.fingerprint}
        save_tensors(folder / "directions.safetensors", self.vectors, meta)
        write_json(folder / "directions.json", {**meta, "stats": self.stats})

    @classmethod
    def load(cls, folder: str | Path, fingerprint: str | None = None) -> "Directions":
        path = Path(folder) / "directions.safetensors"
        tensors, meta = load_tensors(path)
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise DirectionsError(f"{path} was computed on a different base model (fingerprint "
                                  f"{meta.get('fingerprint')} != {fingerprint}); recompute the directions")
        stats_path = Path(folder) / "directions.json"
        stats = read_json(stats_path).get("stats", {}) if stats_path.is_file() else {}
        return cls(meta["method"], meta["layers"], tensors, {k: float(v) for k, v in meta["scale"].items()},
                   stats, meta["selected"], meta["fingerprint"])


def _loader(tokenizer, pairs, max_length: int, batch_size: int) -> DataLoader:
    encoded = encode_pairs(tokenizer, pairs, max_length)
    return DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=PairCollator(tokenizer.pad_token_id))


def _batches(tokenizer, pairs, max_length: int, batch_size: int):
    """The pairs' batches, with a progress bar on a terminal (a bar updated by hand, around the
    loader rather than wrapping it)."""
    loader = _loader(tokenizer, pairs, max_length, batch_size)
    bar = progress(None, "directions", total=len(loader))
    try:
        for batch in loader:
            yield batch
            bar.update()
    finally:
        bar.close()


@torch.no_grad()
def collect(model, tokenizer, pairs, layers: list[str], max_length: int, batch_size: int = 16,
            token: str = "last", last_k: int = 4, around=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states of the pairs at ``layers``: name -> (H_pos, H_neg), each (n, D) float32 on CPU.
    ``around(rows)``, if given, is a context entered around each batch's forward (rows: the
    batch's row count, [pos; neg])."""
    device = next(model.parameters()).device
    pos = {n: [] for n in layers}
    neg = {n: [] for n in layers}
    for batch in _batches(tokenizer, pairs, max_length, batch_size):
        rows = batch["input_ids"].shape[0]
        with around(rows) if around else contextlib.nullcontext(), hidden.record(model, layers) as hs:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  logits_to_keep=1)  # only hidden states are used: skip the full-vocabulary logits
        for n in layers:
            h = pool(hs[n].float(), batch["suffix_mask"].to(device), token, last_k)  # (2B, D)
            p, q = h.chunk(2)
            pos[n].append(p.cpu())
            neg[n].append(q.cpu())
    return {n: (torch.cat(pos[n]), torch.cat(neg[n])) for n in layers}


def collect_grads(model, tokenizer, pairs, layers: list[str], max_length: int, batch_size: int = 16,
                  token: str = "last", last_k: int = 4, grads: bool = True
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, torch.Tensor]] | None,
                             tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states (equal to ``collect``'s), suffix log-probs and per-member gradients, one pass.

    lp = mean log-prob of a member's suffix tokens. A zero δ (2B, D_l) is added to the output
    of every layer, h ← h + δ[:, None, :], and one backward of Σ_i (lp_pos_i - lp_neg_i) gives
    g_pos_i = ∂lp_pos_i/∂δ_pos_i and g_neg_i = ∂lp_neg_i/∂δ_neg_i (autograd returns -g_neg_i
    on the neg rows). Rows do not interact, so each pair's gradient is its own. Only δ needs a
    gradient (``torch.autograd.grad``): no ``.grad`` is written and the model is not changed.

    Returns (hidden {l: (H_pos, H_neg)}, grads {l: {"g_pos", "g_neg"}} each (n, D_l) or None
    when ``grads`` is False, logp (lp_pos, lp_neg) each (n,)), float32 on CPU.
    """
    device = next(model.parameters()).device
    hs_pos, hs_neg = {n: [] for n in layers}, {n: [] for n in layers}
    g_pos, g_neg = {n: [] for n in layers}, {n: [] for n in layers}
    lp_pos, lp_neg = [], []
    for batch in _batches(tokenizer, pairs, max_length, batch_size):
        ids, mask = batch["input_ids"].to(device), batch["suffix_mask"].to(device)
        deltas: dict[str, torch.Tensor] = {}

        def add(name):
            def fn(h):
                deltas[name] = torch.zeros(h.shape[0], h.shape[-1], dtype=h.dtype, device=h.device,
                                           requires_grad=True)  # (2B, D_l)
                return h + deltas[name][:, None, :]

            return fn

        edits = {n: add(n) for n in layers} if grads else {}
        with torch.set_grad_enabled(grads), hidden.hooks(model, edits), hidden.record(model, layers) as hs:
            out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                        logits_to_keep=int(mask.sum(1).max()) + 1)  # the suffix tokens' logits only
            lp = -masked_mean(token_nll(out.logits, ids), mask, 1)  # (2B,)
            p, q = lp.chunk(2)
            if grads:
                dl = torch.autograd.grad((p - q).sum(), [deltas[n] for n in layers])
                for n, d in zip(layers, dl):
                    gp, gn = d.float().chunk(2)
                    g_pos[n].append(gp.cpu())
                    g_neg[n].append(-gn.cpu())
        lp_pos.append(p.detach().float().cpu())
        lp_neg.append(q.detach().float().cpu())
        for n in layers:
            h = pool(hs[n].detach().float(), mask, token, last_k)  # (2B, D)
            hp, hn = h.chunk(2)
            hs_pos[n].append(hp.cpu())
            hs_neg[n].append(hn.cpu())
    H = {n: (torch.cat(hs_pos[n]), torch.cat(hs_neg[n])) for n in layers}
    G = {n: {"g_pos": torch.cat(g_pos[n]), "g_neg": torch.cat(g_neg[n])} for n in layers} if grads else None
    return H, G, (torch.cat(lp_pos), torch.cat(lp_neg))


def pool(h: torch.Tensor, suffix_mask: torch.Tensor, token: str, last_k: int) -> torch.Tensor:
    """(B, T, D) -> (B, D): the last token (left padding puts it at T-1), or the mean of the
    last ``last_k`` suffix tokens."""
    if token == "last":
        return h[:, -1]
    T = h.shape[1]
    recent = torch.arange(T, device=h.device) >= T - last_k
    m = (suffix_mask.bool() & recent).float()
    m[:, -1] = 1.0  # at least the last token
    return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)


def check_method(method: str, k: int = 1) -> None:
    if method not in METHODS:
        raise DirectionsError(f"unknown direction method {method!r}; valid methods: {list(METHODS)}")
    if k > 1 and method not in MULTI:
        raise DirectionsError(f"direction method {method!r} gives one vector, not components={k}; use "
                              f"components=1 or one of {list(MULTI)}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def _top(X: torch.Tensor, k: int) -> torch.Tensor:
    """(n, D) -> (k, D): the top right-singular vectors of X, uncentred."""
    return torch.linalg.svd(X.double(), full_matrices=False)[2][:k]


def ridge(X: torch.Tensor, m: torch.Tensor, rel: float) -> torch.Tensor:
    """solve(F + λI, m) with F = XᵀX / len(X) and λ = rel · tr(F)/D (relative to F's mean eigenvalue).

    Exact through the thin SVD X = U S Vᵀ (F has rank <= len(X)): with e = S²/len(X),
    (F + λI)⁻¹ m = V diag(1/(e + λ)) Vᵀ m + (m - V Vᵀ m)/λ; O(n²D) instead of O(D³).
    """
    X, m = X.double(), m.double()
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    e = S ** 2 / len(X)
    lam = rel * float(e.sum()) / X.shape[1]
    if lam <= 0:
        raise DirectionsError("the per-pair gradients are all zero: the layer does not affect the suffix log-probs")
    c = Vh @ m
    return Vh.T @ (c / (e + lam)) + (m - Vh.T @ c) / lam


def _fisher(method: str, g_pos: torch.Tensor, g_neg: torch.Tensor) -> torch.Tensor:
    """(D,) solution of a fisher_steer method (see the module docstring)."""
    g = g_pos - g_neg  # (n, D) per-pair gradients of the log-prob margin
    m = g.mean(0)
    if method.startswith("fisher_steer_reg"):
        return ridge(g, m, _RIDGE[method])
    if method.startswith("fisher_steer_cov_reg"):
        return ridge(g - m, m, _RIDGE[method])
    if method == "fisher_steer_dual":  # (F_pos + F_neg)/2 = [g_pos; g_neg]ᵀ[g_pos; g_neg] / 2n
        return ridge(torch.cat([g_pos, g_neg]), m, DUAL_RIDGE)
    if method == "fisher_steer_dual_cov":
        return ridge(torch.cat([g_pos - g_pos.mean(0), g_neg - g_neg.mean(0)]), m, DUAL_RIDGE)
    v_pos = ridge(g_pos, g_pos.mean(0), DUAL_RIDGE)
    v_neg = ridge(g_neg, g_neg.mean(0), DUAL_RIDGE)
    return {"fisher_steer_dual_pos": v_pos, "fisher_steer_dual_neg": v_neg,
            "fisher_steer_dual_diff": _unit(v_pos) - _unit(v_neg)}[method]


def fit_direction(D: torch.Tensor, method: str, k: int = 1, grads: dict[str, torch.Tensor] | None = None,
                  logp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(n, D) differences -> (k, D) unit directions, each flipped so that mean(D @ v) > 0.

    ``grads`` {"g_pos", "g_neg"} (n, D) for the gradient methods, ``logp`` (lp_pos, lp_neg)
    (n,) for pca_diff_weighted (see the module docstring).
    """
    check_method(method, k)
    if method in GRAD_METHODS and grads is None:
        raise DirectionsError(f"direction method {method!r} needs the per-pair gradients (grads=...)")
    if method == "pca_diff_weighted" and logp is None:
        raise DirectionsError("direction method 'pca_diff_weighted' needs the suffix log-probs (logp=...)")
    if method == "pca_diff":
        V = _top(D, k)
    elif method == "mean_diff":
        V = _unit(D.mean(0))[None]
    elif method == "pca_diff_weighted":
        mean_lp = (logp[0].double() + logp[1].double()) / 2  # (n,) mean suffix log-prob of each pair
        w = len(mean_lp) * torch.softmax(mean_lp, 0)
        V = _top(w.sqrt()[:, None] * D.double(), k)
    elif method == "svd_grad":
        V = _top(grads["g_pos"] - grads["g_neg"], k)
    else:
        V = _unit(_fisher(method, grads["g_pos"].double(), grads["g_neg"].double()))[None]
    V = V.float()
    signs = torch.sign((D @ V.T).mean(0))
    signs[signs == 0] = 1.0
    return V * signs.unsqueeze(1)


def layer_stats(v: torch.Tensor, train: tuple[torch.Tensor, torch.Tensor],
                val: tuple[torch.Tensor, torch.Tensor]) -> dict:
    D = train[0] - train[1]
    proj = D @ v
    s = float(proj.abs().mean().clamp_min(1e-8))
    Dv = (val[0] - val[1]) @ v
    h = torch.cat([val[0], val[1]]) @ v
    labels = torch.cat([torch.ones(len(val[0])), torch.zeros(len(val[1]))])
    corr = float(pearson_corrcoef(h, labels)) if h.std() > 0 else 0.0
    energy = float((proj ** 2).sum() / (D ** 2).sum().clamp_min(1e-12))
    return {"agreement": float((proj > 0).float().mean()), "scale": s, "explained": energy,
            "val_agreement": float((Dv > 0).float().mean()), "val_separation": float(Dv.mean() / s),
            "corr": corr if corr == corr else 0.0}


def select_layers(stats: dict[str, dict], layers: list[str], how: str, n: int = 3, every: int = 4,
                  explicit: list[str] = ()) -> list[str]:
    if how == "top_k":
        ranked = sorted(layers, key=lambda layer: (-abs(stats[layer]["corr"]), -stats[layer]["val_agreement"]))
        chosen = ranked[:n]
    elif how == "bands":  # the best layer in each of n contiguous, near-equal depth bands
        order = sorted(layers, key=lambda layer: (hidden.layer_index(layer), layer))
        bounds = [round(i * len(order) / n) for i in range(n + 1)]
        chosen = [max(order[a:b], key=lambda layer: (abs(stats[layer]["corr"]), stats[layer]["val_agreement"]))
                  for a, b in zip(bounds, bounds[1:]) if b > a]
    elif how == "every_k":
        chosen = layers[::-1][::every][::-1]
    elif how == "explicit":
        unknown = [layer for layer in explicit if layer not in layers]
        if unknown:
            raise DirectionsError(f"explicit loss layers {unknown} are not candidate layers {layers}")
        chosen = list(explicit)
    else:
        raise DirectionsError(f"unknown layer selection {how!r}; use top_k, bands, every_k or explicit")
    return sorted(chosen, key=lambda layer: (hidden.layer_index(layer), layer))


def fit_methods(model, tokenizer, train_pairs, val_pairs, directions_cfg: DirectionsConfig, max_length: int,
                methods: list[str], fingerprint: str = "", layers: list[str] | None = None) -> dict[str, Directions]:
    """Directions of every method in ``methods`` at ``layers`` (default: directions_cfg's candidate layers).

    Hidden states are collected once; suffix log-probs and gradients once, in the same pass, and
    only if a method needs them. Each method gets its own vectors, stats and selected layers.
    """
    for m in methods:
        check_method(m, directions_cfg.components)
    if layers is None:
        layers = hidden.resolve(model, directions_cfg.candidates, directions_cfg.depth)
        if directions_cfg.explicit:
            layers += [layer for layer in hidden.resolve(model, directions_cfg.explicit) if layer not in layers]
    else:
        layers = hidden.resolve(model, layers)
    kw = dict(max_length=max_length, batch_size=directions_cfg.batch_size, token=directions_cfg.token,
              last_k=directions_cfg.last_k)
    train_pairs = train_pairs[: directions_cfg.max_pairs or None]
    if any(m in GRAD_METHODS or m == "pca_diff_weighted" for m in methods):
        h_train, grads, logp = collect_grads(model, tokenizer, train_pairs, layers,
                                             grads=any(m in GRAD_METHODS for m in methods), **kw)
    else:
        h_train, grads, logp = collect(model, tokenizer, train_pairs, layers, **kw), None, None
    h_val = collect(model, tokenizer, val_pairs, layers, **kw)
    out = {}
    for m in methods:
        vectors, scale, stats = {}, {}, {}
        for layer in layers:
            vectors[layer] = fit_direction(h_train[layer][0] - h_train[layer][1], m, directions_cfg.components,
                                           grads[layer] if grads else None, logp)
            stats[layer] = layer_stats(vectors[layer][0], h_train[layer], h_val[layer])
            scale[layer] = stats[layer]["scale"]
        selected = select_layers(stats, layers, directions_cfg.select, directions_cfg.n_layers, directions_cfg.every,
                                 directions_cfg.explicit)
        out[m] = Directions(m, layers, vectors, scale, stats, selected, fingerprint)
    return out


def compute(model, tokenizer, train_pairs, val_pairs, directions_cfg: DirectionsConfig, max_length: int,
            fingerprint: str = "") -> Directions:
    """Reference directions of ``directions_cfg.method`` for every candidate layer, with stats, and the
    selected loss layers."""
    method = directions_cfg.method
    fitted = fit_methods(model, tokenizer, train_pairs, val_pairs, directions_cfg, max_length, [method], fingerprint)
    return fitted[method]
