"""Frozen reference directions: per-layer PCA of pos-neg differences, sign-aligned, with stats.

For each candidate layer l, ``D_l = H_pos - H_neg`` (n_pairs, D) from the hidden state of the
last suffix token (or the mean of the last k). ``pca_diff`` takes the top right-singular
vectors of ``D_l`` **uncentred** (the mean difference is the signal), flips each so that
``mean(D_l @ v) > 0``, and records:

* agreement  = mean(D_l @ v > 0) on the training pairs;
* scale s_l  = mean(|D_l @ v|), the typical separation (layers become comparable);
* on held-out pairs: separation = mean(D @ v) / s_l, val agreement, and the Pearson
  correlation between the projection h @ v and the label (pos = 1, neg = 0).

Loss layers are then selected by |correlation| (top-k), every k-th, or an explicit list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional import pearson_corrcoef

from . import hidden
from .data import PairCollator, encode_pairs
from .io import load_tensors, read_json, save_tensors, write_json

METHODS = ("pca_diff", "mean_diff")


class DirectionsError(ValueError):
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


@torch.no_grad()
def collect(model, tokenizer, pairs, layers: list[str], max_length: int, batch_size: int = 16,
            token: str = "last", last_k: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states of the pairs at ``layers``: name -> (H_pos, H_neg), each (n, D) float32 on CPU."""
    encoded = encode_pairs(tokenizer, pairs, max_length)
    loader = DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=PairCollator(tokenizer.pad_token_id))
    device = next(model.parameters()).device
    pos = {n: [] for n in layers}
    neg = {n: [] for n in layers}
    for batch in loader:
        with hidden.record(model, layers) as hs:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  logits_to_keep=1)  # only hidden states are used: skip the full-vocabulary logits
        for n in layers:
            h = pool(hs[n].float(), batch["suffix_mask"].to(device), token, last_k)  # (2B, D)
            p, q = h.chunk(2)
            pos[n].append(p.cpu())
            neg[n].append(q.cpu())
    return {n: (torch.cat(pos[n]), torch.cat(neg[n])) for n in layers}


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


def fit_direction(D: torch.Tensor, method: str, k: int = 1) -> torch.Tensor:
    """(n, D) differences -> (k, D) unit directions, each flipped so that mean(D @ v) > 0."""
    if method == "pca_diff":
        _, _, Vh = torch.linalg.svd(D.double(), full_matrices=False)  # uncentred
        V = Vh[:k].float()
    elif method == "mean_diff":
        m = D.mean(0)
        V = (m / m.norm().clamp_min(1e-12)).unsqueeze(0)
    else:
        raise DirectionsError(f"unknown direction method {method!r}; valid methods: {list(METHODS)}")
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
        ranked = sorted(layers, key=lambda l: (-abs(stats[l]["corr"]), -stats[l]["val_agreement"]))
        chosen = ranked[:n]
    elif how == "every_k":
        chosen = layers[::-1][::every][::-1]
    elif how == "explicit":
        unknown = [l for l in explicit if l not in layers]
        if unknown:
            raise DirectionsError(f"explicit loss layers {unknown} are not candidate layers {layers}")
        chosen = list(explicit)
    else:
        raise DirectionsError(f"unknown layer selection {how!r}; use top_k, every_k or explicit")
    return sorted(chosen, key=lambda l: (hidden.layer_index(l), l))


def compute(model, tokenizer, train_pairs, val_pairs, cfg, max_length: int, fingerprint: str = "") -> Directions:
    """Reference directions for every candidate layer, with stats, and the selected loss layers."""
    layers = hidden.resolve(model, cfg.candidates, cfg.depth)
    layers += [l for l in hidden.resolve(model, cfg.explicit) if l not in layers] if cfg.explicit else []
    kw = dict(max_length=max_length, batch_size=cfg.batch_size, token=cfg.token, last_k=cfg.last_k)
    h_train = collect(model, tokenizer, train_pairs[: cfg.max_pairs or None], layers, **kw)
    h_val = collect(model, tokenizer, val_pairs, layers, **kw)
    vectors, scale, stats = {}, {}, {}
    for l in layers:
        V = fit_direction(h_train[l][0] - h_train[l][1], cfg.method, cfg.components)
        vectors[l] = V
        stats[l] = layer_stats(V[0], h_train[l], h_val[l])
        scale[l] = stats[l]["scale"]
    selected = select_layers(stats, layers, cfg.select, cfg.n_layers, cfg.every, cfg.explicit)
    return Directions(cfg.method, layers, vectors, scale, stats, selected, fingerprint)
