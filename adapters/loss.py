"""Loss terms: ReprPO projection (contrast + shift) on frozen directions, plus an NLL barrier.

For a coefficient c in {+1, -1}, at each loss layer l with reference v_l and scale s_l, on
the suffix tokens (DESIGN.md, "Loss"):

    Δ_l^c      = h_pos^c(l) - h_neg^c(l)
    contrast^c = -c · mean bound((Δ_l^c · v_l) / s_l)                 # separate pos from neg
    shift^c    = -c · mean bound(((h^c - h^base)(l) · v_l) / s_l)      # move both along c·v
                 (h^base · v_l / s_l and nll^base are all the loss needs of the base model)
    L_nll^c    = mean_t relu(nll_t^c - nll_t^base - τ)^q               # per-token barrier
    L^c        = w_contrast·contrast^c + w_shift·shift^c + λ·L_nll^c

``bound`` is clamp(p, -k, k) or k·tanh(p/k): the plain linear projection is unbounded and
runs away (measured: 1000x the reference separation, +4 nats NLL). Projections are in units
of s_l, so a bound k means "k typical pos-neg separations". Every term is a mean over pairs /
rows of per-row means over the suffix tokens: each sequence weighs the same whatever its
length, and the mean over data-parallel ranks equals the single-process loss. Every function returns a dict
of named terms so each is logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bound(p: torch.Tensor, k: float, how: str) -> torch.Tensor:
    if how == "clamp":
        return p.clamp(-k, k)
    if how == "tanh":
        return k * torch.tanh(p / k)
    raise ValueError(f"unknown bound {how!r}; use clamp or tanh")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL for the last K-1 tokens from logits of the last K positions.

    logits (B, K, V), input_ids (B, T) -> (B, T) with nll[t] = -log p(x_t | x_<t) for
    t >= T-K+1 and 0 elsewhere.
    """
    B, K, _ = logits.shape
    T = input_ids.shape[1]
    targets = input_ids[:, T - K + 1:]  # (B, K-1)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    out = torch.zeros((B, T), dtype=nll.dtype, device=nll.device)
    out[:, T - K + 1:] = nll
    return out


def project(h: torch.Tensor, v: torch.Tensor, s: float) -> torch.Tensor:
    """(..., T, D) hidden states -> (..., T) projections on v in units of s."""
    return (h.float() @ v) / s


def projection_terms(h: torch.Tensor, p_base: torch.Tensor, v: torch.Tensor, s: float,
                     mask: torch.Tensor, c: float, k: float, how: str, aggregate: str) -> dict[str, torch.Tensor]:
    """contrast^c and shift^c at one layer. h (2B, T, D) as [pos; neg]; p_base (2B, T) the base
    model's projections ``project(h_base, v, s)`` (all the shift term needs of the base, so it
    can be cached per example); mask (2B, T)."""
    p_tok = project(h, v, s)  # (2B, T) projection of each token
    shift_tok = p_tok - p_base.float()
    pos, neg = p_tok.chunk(2)
    m = mask[: mask.shape[0] // 2]  # the suffix sits at the same (right-aligned) positions in both
    delta_tok = pos - neg  # (B, T)
    if aggregate == "pair":
        contrast_p = masked_mean(delta_tok, m, 1)  # (B,)
        shift_p = masked_mean(shift_tok, mask, 1)  # (2B,)
        contrast = -c * bound(contrast_p, k, how).mean()
        shift = -c * bound(shift_p, k, how).mean()
    elif aggregate == "token":
        contrast_p = masked_mean(delta_tok, m, 1)
        shift_p = masked_mean(shift_tok, mask, 1)
        contrast = -c * masked_mean(bound(delta_tok, k, how), m, 1).mean()
        shift = -c * masked_mean(bound(shift_tok, k, how), mask, 1).mean()
    else:
        raise ValueError(f"unknown aggregate {aggregate!r}; use pair or token")
    return {"contrast": contrast, "shift": shift,
            "proj_contrast": contrast_p.mean().detach(), "proj_shift": shift_p.mean().detach()}


def nll_barrier(nll: torch.Tensor, nll_base: torch.Tensor, mask: torch.Tensor, margin: float,
                power: float) -> dict[str, torch.Tensor]:
    """Mean over rows of each row's mean over its suffix tokens (every sequence counts once, as
    in the projection terms, so data-parallel ranks average to the single-process loss)."""
    excess = nll - nll_base  # (2B, T)
    barrier = masked_mean(F.relu(excess - margin) ** power, mask, 1).mean()
    return {"nll_barrier": barrier, "dnll": masked_mean(excess, mask, 1).mean().detach()}


def contrastive_loss(h: dict[str, torch.Tensor], p_base: dict[str, torch.Tensor], nll: torch.Tensor,
                     nll_base: torch.Tensor, mask: torch.Tensor, vectors: dict[str, torch.Tensor],
                     scale: dict[str, float], c: float, cfg) -> dict[str, torch.Tensor]:
    """All terms at coefficient c, averaged over the loss layers; ``loss`` is the weighted sum.
    ``p_base`` holds the base model's projections per layer (see ``project``)."""
    layers = list(vectors)
    per = [projection_terms(h[l], p_base[l], vectors[l], scale[l], mask, c, cfg.clamp, cfg.bound,
                            cfg.aggregate) for l in layers]
    out = {key: torch.stack([p[key] for p in per]).mean() for key in per[0]}
    for l, p in zip(layers, per):
        out[f"proj_contrast/{l}"] = p["proj_contrast"]
        out[f"proj_shift/{l}"] = p["proj_shift"]
    out.update(nll_barrier(nll, nll_base, mask, cfg.nll_margin, cfg.nll_power))
    out["loss"] = cfg.w_contrast * out["contrast"] + cfg.w_shift * out["shift"] + cfg.nll_weight * out["nll_barrier"]
    return out
