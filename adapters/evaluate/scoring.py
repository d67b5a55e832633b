"""Scoring rows (probe item, coefficient) with forward passes: next-token and continuation
log-probabilities, a probe's y and answer mass, and neutral-text NLL.

A sweep scores rows (item i, coefficient c). Rows are laid out item-major, so one forward pass
holds every coefficient of a group for the same items (same lengths, same padding).
``ctx(coeffs)`` is entered around each forward with that pass's per-row coefficients: a
per-example method steers each row at its own c; a looped method passes ctx=None and is entered
once per coefficient by the caller.
"""

from __future__ import annotations

import contextlib

import torch

from ..data import encode, pad_left
from ..errors import UserError
from ..probes import ContinuationProbe, Probe


class NonFiniteOutputs(UserError):
    """The model's outputs are not finite at some coefficient of the sweep."""


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _rows(n_items: int, coeffs, system) -> tuple[list[int], list[float], list[str]]:
    """Item index, coefficient and system prompt of each row, item-major."""
    idx = [i for i in range(n_items) for _ in coeffs]
    cs = [float(c) for _ in range(n_items) for c in coeffs]
    return idx, cs, [system(c) for c in cs]


def _logits(model, seqs, pad_id, keep, ctx, coeffs):
    device = next(model.parameters()).device
    ids, attn = pad_left(seqs, pad_id)
    with ctx(coeffs) if ctx else contextlib.nullcontext():
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=keep).logits
    flat = logits.flatten(1)  # a row is finite where its largest and smallest logits are (NaN propagates)
    bad = ~(torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1)))
    if bool(bad.any()):
        cs = sorted({float(c) for c, b in zip(coeffs, bad.tolist()) if b})
        raise NonFiniteOutputs(f"the model's outputs are not finite at coefficient {', '.join(f'{c:+g}' for c in cs)}")
    return ids.to(device), logits


@torch.no_grad()
def next_token_logprobs(model, tokenizer, systems, users, prefixes, coeffs, batch_size=16, ctx=None) -> torch.Tensor:
    """(N, V) log-probabilities of the token after each rendered row."""
    seqs = [encode(tokenizer, u, p, s)[0] for s, u, p in zip(systems, users, prefixes)]
    out = []
    for sl in _batches(len(seqs), batch_size):
        _, logits = _logits(model, seqs[sl], tokenizer.pad_token_id, 1, ctx, coeffs[sl])
        out.append(torch.log_softmax(logits[:, -1].float(), -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, systems, users, prefixes, conts, coeffs, batch_size=16, ctx=None):
    """Sum of log P(continuation tokens | prompt + prefix), and token counts, each (N,)."""
    seqs, n_cont = [], []
    for s, u, p, c in zip(systems, users, prefixes, conts):
        ids, n_full = encode(tokenizer, u, p + c, s)
        n_prefix = encode(tokenizer, u, p, s)[1] if p else 0
        seqs.append(ids)
        n_cont.append(max(1, n_full - n_prefix))
    total, count = [], []
    for sl in _batches(len(seqs), batch_size):
        k = max(n_cont[sl]) + 1
        ids, logits = _logits(model, seqs[sl], tokenizer.pad_token_id, k, ctx, coeffs[sl])
        tgt = ids[:, -(k - 1):]  # logits predict the last k-1 tokens
        x = logits[:, :-1].float()  # log-softmax at the targets only, without the full (rows, k-1, V) log-probs
        lp = (x.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)).cpu()
        for j, n in enumerate(n_cont[sl]):
            total.append(float(lp[j, -n:].sum()))
            count.append(n)
    return torch.tensor(total), torch.tensor(count)


def _no_system(c) -> str:
    return ""


def probe_scores(model, tokenizer, probe: Probe | ContinuationProbe, coeffs=(0.0,), system=_no_system,
                 batch_size: int = 16, ctx=None):
    """y (positive minus negative log-prob) and the answer mass P(pos) + P(neg), each
    (len(coeffs), n_items). One forward pass holds ``batch_size`` items at every coefficient."""
    idx, cs, systems = _rows(len(probe.user), coeffs, system)
    users, prefixes = [probe.user[i] for i in idx], [probe.prefix[i] for i in idx]
    rows = batch_size * len(coeffs)
    shape = (len(probe.user), len(coeffs))
    if isinstance(probe, ContinuationProbe):
        lp_t, _ = continuation_logprobs(model, tokenizer, systems, users, prefixes, [probe.pos[i] for i in idx],
                                        cs, rows, ctx)
        lp_f, _ = continuation_logprobs(model, tokenizer, systems, users, prefixes, [probe.neg[i] for i in idx],
                                        cs, rows, ctx)
        return (lp_t - lp_f).view(shape).T, (lp_t.exp() + lp_f.exp()).view(shape).T
    logp = next_token_logprobs(model, tokenizer, systems, users, prefixes, cs, rows, ctx)
    lp_pos = torch.stack([torch.logsumexp(logp[r, probe.pos[i]], 0) for r, i in enumerate(idx)])
    lp_neg = torch.stack([torch.logsumexp(logp[r, probe.neg[i]], 0) for r, i in enumerate(idx)])
    return (lp_pos - lp_neg).view(shape).T, (lp_pos.exp() + lp_neg.exp()).view(shape).T


def neutral_nll(model, tokenizer, texts: list[str], coeffs=(0.0,), system=_no_system, batch_size: int = 8,
                ctx=None) -> torch.Tensor:
    """Mean per-token NLL of neutral paragraphs as an assistant answer, per coefficient (len(coeffs),)."""
    idx, cs, systems = _rows(len(texts), coeffs, system)
    lp, n = continuation_logprobs(model, tokenizer, systems, ["Write a short paragraph."] * len(idx),
                                  [""] * len(idx), [texts[i] for i in idx], cs, batch_size * len(coeffs), ctx)
    shape = (len(texts), len(coeffs))
    return -lp.view(shape).sum(0) / n.view(shape).sum(0)

