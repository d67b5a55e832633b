"""Loss terms: ReprPO projection (contrast + shift) on frozen directions, plus an NLL barrier.

For a coefficient c in {+1, -1}, at each loss layer l with reference v_l and scale s_l, on
the suffix tokens (README, "Loss"):

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

``c`` may be a float or a tensor with one coefficient per pair (training samples |c| per pair).
With ``target = linear`` the projection terms ask for a move proportional to c instead of
the largest bounded one (the representation moves with the dose, and no further):

    shift^c    = Huber(((h^c - h^base)(l) · v_l) / s_l - κ·c)
    contrast^c = Huber((Δ_l^c - Δ_l^base) · v_l / s_l - κ·c)

Behaviour terms, on completions y_h / y_d that the base model wrote under the positive /
negative persona, scored by the adapter with the persona removed from the input (π_c: the
adapter at c; π_0 = the base model, the DPO reference, cached):

    Δ_c        = (log π_c(y_h) - log π_0(y_h)) - (log π_c(y_d) - log π_0(y_d))
    pref(c)    = -log σ(β·(sign(c)·Δ_c - γ·|c|))                 BiPO, margin growing with |c|
    distill(c) = KL(softmax(z*(c)) ‖ p_c)  per completion token, on the teacher's support S plus
                 one bucket for the rest of the vocabulary; z*(c) = z_0 + (c/2)·(z_pos - z_neg)
                 (contrast) or z_0 + |c|·(z_P(sign c) - z_0) (persona)
    kl(c)      = relu(KL(p_c ‖ p_0) - m)                          neutral text, per sequence

Each behaviour term reverses under c -> -c (the negative persona's target and the negated
preference), distill(0) targets the base distribution, and kl and distill are 0 when p_c = p_0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig


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


def _per_row(c, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a (rows,) tensor of coefficients as a (rows,) float tensor on ``like``'s device."""
    c = torch.as_tensor(c, dtype=torch.float32, device=like.device)
    return c.expand(rows) if c.dim() == 0 else c.float()


def projection_terms(h: torch.Tensor, p_base: torch.Tensor, v: torch.Tensor, s: float,
                     mask: torch.Tensor, c, k: float, how: str, aggregate: str, target: str = "clamp",
                     kappa: float = 1.0) -> dict[str, torch.Tensor]:
    """contrast^c and shift^c at one layer. h (2B, T, D) as [pos; neg]; p_base (2B, T) the base
    model's projections ``project(h_base, v, s)`` (all the shift term needs of the base, so it
    can be cached per example); mask (2B, T); c a float or (B,) per pair."""
    p_tok = project(h, v, s)  # (2B, T) projection of each token
    shift_tok = p_tok - p_base.float()
    pos, neg = p_tok.chunk(2)
    m = mask[: mask.shape[0] // 2]  # the suffix sits at the same (right-aligned) positions in both
    delta_tok = pos - neg  # (B, T)
    cp = _per_row(c, m.shape[0], p_tok)  # (B,)
    c2 = torch.cat([cp, cp])  # (2B,) both members of a pair share its coefficient
    contrast_p = masked_mean(delta_tok, m, 1)  # (B,)
    shift_p = masked_mean(shift_tok, mask, 1)  # (2B,)
    if target == "linear":
        base_pos, base_neg = p_base.float().chunk(2)
        moved = contrast_p - masked_mean(base_pos - base_neg, m, 1)  # change of the separation
        contrast = F.huber_loss(moved, kappa * cp)
        shift = F.huber_loss(shift_p, kappa * c2)
    elif target != "clamp":
        raise ValueError(f"unknown projection target {target!r}; use clamp or linear")
    elif aggregate == "pair":
        contrast = -(cp * bound(contrast_p, k, how)).mean()
        shift = -(c2 * bound(shift_p, k, how)).mean()
    elif aggregate == "token":
        contrast = -(cp * masked_mean(bound(delta_tok, k, how), m, 1)).mean()
        shift = -(c2 * masked_mean(bound(shift_tok, k, how), mask, 1)).mean()
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
                     scale: dict[str, float], c: float, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """All terms at coefficient c, averaged over the loss layers; ``loss`` is the weighted sum.
    ``p_base`` holds the base model's projections per layer (see ``project``)."""
    layers = list(vectors)
    per = [projection_terms(h[layer], p_base[layer], vectors[layer], scale[layer], mask, c, loss_cfg.clamp,
                            loss_cfg.bound, loss_cfg.aggregate, loss_cfg.target, loss_cfg.kappa) for layer in layers]
    out = {key: torch.stack([p[key] for p in per]).mean() for key in per[0]}
    for layer, p in zip(layers, per):
        out[f"proj_contrast/{layer}"] = p["proj_contrast"]
        out[f"proj_shift/{layer}"] = p["proj_shift"]
    out.update(nll_barrier(nll, nll_base, mask, loss_cfg.nll_margin, loss_cfg.nll_power))
    out["loss"] = (loss_cfg.w_contrast * out["contrast"] + loss_cfg.w_shift * out["shift"]
                   + loss_cfg.nll_weight * out["nll_barrier"])
    return out


# --------------------------------------------------------------------------- behaviour terms


def completion_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """(R, K, V) logits of the last K positions -> (R, K-1, V) log-probs of the last K-1 tokens."""
    return torch.log_softmax(logits[:, :-1].float(), -1)


def preference_terms(lp_h: torch.Tensor, lp_d: torch.Tensor, ref_h: torch.Tensor, ref_d: torch.Tensor, c,
                     beta: float, gamma: float) -> dict[str, torch.Tensor]:
    """BiPO-style signed preference. lp_* (M,) log π_c of each prompt's two completions, ref_*
    (M,) log π_0 of them, c (M,) or a float (never 0)."""
    cm = _per_row(c, lp_h.shape[0], lp_h)
    delta = (lp_h - ref_h) - (lp_d - ref_d)  # (M,)
    z = beta * (torch.sign(cm) * delta - gamma * cm.abs())
    return {"pref": -F.logsigmoid(z).mean(), "pref_delta": (torch.sign(cm) * delta).mean().detach(),
            "pref_acc": (torch.sign(cm) * delta > 0).float().mean().detach()}


def distill_target(lp: torch.Tensor, rest: torch.Tensor, c, how: str = "persona") -> torch.Tensor:
    """Log-probs of the target z_0 + |c|·(z_P(sign c) - z_0) on the support plus a rest bucket
    (``how`` = persona), or z_0 + (c/2)·(z_pos - z_neg) (``how`` = contrast: both signs move along
    the difference between the two personas, as a steering vector does; at c = ±1 it moves as far
    as the personas are apart on average).

    lp (3, R, K, S) teacher log-probs (no persona, positive, negative) on the support, rest
    (3, R, K) log outside mass, c (R,) or a float. Returns (R, K, S + 1). Log-probs differ from
    logits by a per-position constant, which the normalisation removes; the rest bucket
    interpolates the outside mass the same way (exact when the teachers agree on how the
    outside mass is shared). At c = 0 it is the base distribution itself."""
    cr = _per_row(c, lp.shape[1], lp).view(-1, 1, 1)  # (R, 1, 1)
    z = torch.cat([lp, rest.unsqueeze(-1)], -1)  # (3, R, K, S+1)
    if how == "contrast":
        return torch.log_softmax(z[0] + cr / 2 * (z[1] - z[2]), -1)
    if how != "persona":
        raise ValueError(f"unknown distillation target {how!r}; use persona or contrast")
    persona = torch.where(cr.unsqueeze(0) >= 0, z[1:2], z[2:3])[0]  # (R, K, S+1) z_P(sign c)
    return torch.log_softmax(z[0] + cr.abs() * (persona - z[0]), -1)


def support_logprobs(on: torch.Tensor) -> torch.Tensor:
    """The student's log-probs on the support (R, K, S) with its outside bucket -> (R, K, S + 1)."""
    from .behaviour import log1mexp

    return torch.cat([on, log1mexp(torch.logsumexp(on, -1)).unsqueeze(-1)], -1)


def distill_terms(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL(target ‖ student) per completion token, a mean over each row's tokens, then over rows.
    student, target (R, K, S+1) log-probs; mask (R, K)."""
    kl = (target.exp() * (target - student)).sum(-1)  # (R, K)
    return {"distill": masked_mean(kl, mask, 1).mean()}


def kl_barrier(logp: torch.Tensor, logp_base: torch.Tensor, mask: torch.Tensor, margin: float) -> dict[str, torch.Tensor]:
    """relu(KL(p_c ‖ p_0) - m) per sequence (mean over its masked tokens), mean over rows.
    logp, logp_base (R, T, V) log-probs; mask (R, T)."""
    kl = (logp.exp() * (logp - logp_base)).sum(-1)  # (R, T)
    per_row = masked_mean(kl, mask, 1)
    return {"kl_barrier": F.relu(per_row - margin).mean(), "kl_neutral": per_row.mean().detach()}
