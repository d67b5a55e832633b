"""The LightningModule: bidirectional contrastive training of one signed adapter.

Each step, on a batch [pos; neg] of pairs:
  1. the base model's reference for each pair (its hidden states projected on v_l at the loss
     layers, and its per-token NLL over the suffix) comes from ``BaseCache``: computed by one
     no-grad pass the first time a pair is seen, reused every later time (it never changes);
  2. each pair draws a magnitude |c| from ``loss.coeffs`` (seeded by step and pair, so every
     data-parallel rank and a resumed run draw the same); at +|c| and -|c| the policy (adapter
     at c) gives hidden states and NLL, and ``loss.contrastive_loss`` turns them into named
     terms; the two losses are summed. A kind with per-example coefficients runs both signs in
     one forward pass of 4B rows, the others one pass per sign at one |c| per step;
  3. with behaviour terms on, ``behaviour.batch_size`` prompts (each with its y_h and y_d, half
     of them at +|c| and half at -|c|; a prompt's two completions share one row, the prompt
     computed once, ``behaviour.pack``) give the preference and distillation terms, and
     ``behaviour.neutral_batch`` neutral passages (signed the same way) give the KL barrier
     against the base model's log-probs: its output layer on the final hidden states of each
     passage, kept for the run (one no-grad pass per chunk of passages, not one per step).
Only adapter parameters are in the optimiser. The base-weights checksum is verified at fit
start, after every validation and at fit end.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Callable

import lightning as L
import torch

from . import behaviour as bh
from . import hidden
from .loss import (completion_logprobs, contrastive_loss, distill_target, distill_terms, kl_barrier, masked_mean,
                   preference_terms, project, support_logprobs, token_nll)
from .config import BehaviourConfig, LossConfig, TrainConfig
from .models import BaseChecksum
from .quiet import log
from .steer import steer

COEFFS = (1.0, -1.0)  # the two signs every step trains
NEUTRAL_CHUNK = 8  # neutral passages whose base states one no-grad pass computes (``_neutral_chunk``)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (no dropout, and no draw from the random stream) for the block, every
    module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class TrainingError(RuntimeError):
    """Training diverged (a non-finite loss or adapter weight); nothing of it is saved."""


class BaseCache:
    """Per pair (by dataset index): the base model's suffix projections on each loss layer's
    reference, in units of s_l, and its suffix token NLL, each (2, S) for [pos; neg]. Kept on
    the model's device; saved in checkpoints so a resumed run reuses exactly the same values.
    A pair's reference is computed in the batch it first appears in; with rotary position
    embeddings (the supported architectures) its padding there does not change it (6e-7
    measured against a fresh pass at another width), a model with absolute position
    embeddings would need position ids from the attention mask."""

    def __init__(self, layers: list[str]):
        self.layers = list(layers)
        self.entries: dict[int, dict[str, torch.Tensor]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self.entries

    def put(self, index: int, proj: dict[str, torch.Tensor], nll: torch.Tensor) -> None:
        self.entries[index] = {"nll": nll.float(), **{f"proj.{layer}": proj[layer].float() for layer in self.layers}}

    def assemble(self, index: list[int], suffix: list[int], T: int, device) -> tuple[dict, torch.Tensor]:
        """({layer: (2B, T)}, (2B, T)): the cached values right-aligned into a batch of width T."""
        B = len(index)
        proj = {layer: torch.zeros(2 * B, T, device=device) for layer in self.layers}
        nll = torch.zeros(2 * B, T, device=device)
        for j, (i, n) in enumerate(zip(index, suffix)):
            e, rows = self.entries[i], [j, B + j]
            if e["nll"].shape[-1] != n or any(f"proj.{layer}" not in e for layer in self.layers):
                raise ValueError(f"the cached base reference of pair {i} does not fit this batch (suffix of "
                                 f"{e['nll'].shape[-1]} tokens cached, {n} now, or other loss layers): the pairs "
                                 "or directions changed since the checkpoint; start the run again")
            nll[rows, T - n:] = e["nll"].to(device)
            for layer in self.layers:
                proj[layer][rows, T - n:] = e[f"proj.{layer}"].to(device)
        return proj, nll

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": t.detach().cpu().contiguous() for i, e in self.entries.items() for k, t in e.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            i, k = key.split(".", 1)
            self.entries.setdefault(int(i), {})[k] = t


class ContrastiveModule(L.LightningModule):
    def __init__(self, model, adapter, directions, loss_cfg: LossConfig, train_cfg: TrainConfig,
                 checksum: BaseChecksum, start_step: int = 0, optimizer_state: dict | None = None,
                 base_cache: dict | None = None, behaviour: list | None = None, neutral: dict | None = None,
                 behaviour_cfg: BehaviourConfig | None = None, pad_id: int = 0):
        """``behaviour``: (y_h, y_d) teacher items per prompt, None for a prompt the steps never
        draw (``behaviour.prepare``); ``neutral``:
        the neutral passages for the KL barrier as one batch (``behaviour.neutral_batch``)."""
        super().__init__()
        self.behaviour, self.neutral, self.behaviour_cfg, self.pad_id = behaviour or [], neutral, behaviour_cfg, pad_id
        if loss_cfg.behaviour and not self.behaviour:
            raise ValueError("loss.w_pref / loss.w_distill > 0 need behaviour items (behaviour.teacher)")
        if loss_cfg.w_kl > 0 and not self.neutral:
            raise ValueError("loss.w_kl > 0 needs neutral passages (behaviour.neutral_lines)")
        self.start_step = start_step  # > 0 when resuming from a checkpoint at that step
        self.optimizer_state = optimizer_state
        self.model = model
        self.adapter = adapter
        self.loss_cfg, self.train_cfg = loss_cfg, train_cfg
        self.checksum = checksum
        self.layers = list(directions.selected)
        self.scale = {layer: directions.scale[layer] for layer in self.layers}
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"ref_{i}", directions.v(layer).float().clone(), persistent=False)
        self.base_cache = BaseCache(self.layers)
        self._neutral_states: dict[int, torch.Tensor] | None = {}
        self._val_cache: dict[bytes, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
        self._packing: bool | None = None  # behaviour rows packed one per prompt (None: not yet compared)
        if base_cache:
            self.base_cache.load_state_tensors(base_cache)

    @property
    def prefix(self) -> int:
        """Decoder layers below this one are the same at every coefficient (none when a loss layer
        lies below the adapter: its hidden state is recorded there)."""
        first = hidden.first_layer(list(self.adapter.steered_modules()))
        return first if all(hidden.layer_index(layer) >= first for layer in self.layers) else 0

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        return {layer: getattr(self, f"ref_{i}") for i, layer in enumerate(self.layers)}

    # ------------------------------------------------------------------ forward passes

    def _forward(self, batch, c):
        """Hidden states at the loss layers, (rows, T, D) each, and per-token NLL (rows, T).
        ``c`` may be a 1-d tensor with one coefficient per row (per-example kinds)."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        keep = int(batch["suffix_mask"].sum(1).max()) + 1  # logits only where the suffix is predicted
        with steer(self.model, c), hidden.record(self.model, self.layers) as hs:
            logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
        return dict(hs), token_nll(logits, ids)

    @torch.no_grad()
    def base_reference(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The base model's projections {layer: (2B, T)} and suffix NLL (2B, T) for the batch;
        pairs not yet in the cache go through one no-grad base pass together."""
        index = [int(i) for i in batch["index"]]
        B, T = len(index), batch["input_ids"].shape[1]
        suffix = [int(n) for n in batch["suffix_mask"][:B].sum(1)]  # pos and neg share the suffix
        missing = [j for j, i in enumerate(index) if i not in self.base_cache]
        if missing:
            rows = torch.tensor(missing + [B + j for j in missing], device=batch["input_ids"].device)
            h, nll = self._forward({k: batch[k][rows] for k in ("input_ids", "attention_mask", "suffix_mask")}, 0.0)
            m = len(missing)
            for n, j in enumerate(missing):
                pair, s = [n, m + n], suffix[j]
                proj = {layer: project(h[layer][pair, T - s:], self.vectors[layer], self.scale[layer])
                        for layer in self.layers}
                self.base_cache.put(index[j], proj, nll[pair, T - s:].float())
        return self.base_cache.assemble(index, suffix, T, batch["input_ids"].device)

    def magnitudes(self, index: list[int], step: int) -> torch.Tensor:
        """|c| per pair at this step, drawn from loss.coeffs by (seed, step, pair): the same on every
        rank and after a resume. Kinds without per-example coefficients draw one per step."""
        choices, seed = self.loss_cfg.coeffs, self.train_cfg.seed
        if len(choices) == 1 or not self.adapter.per_example:
            return torch.full((len(index),), self._step_magnitude(step))
        return torch.tensor([float(random.Random(f"{seed}:{step}:{i}").choice(choices)) for i in index])

    def _step_magnitude(self, step: int) -> float:
        """The one |c| of a step for kinds without per-example coefficients."""
        return float(random.Random(f"{self.train_cfg.seed}:{step}").choice(self.loss_cfg.coeffs))

    def policy_passes(self, batch, mags: torch.Tensor) -> dict[float, tuple[dict, torch.Tensor, torch.Tensor]]:
        """Hidden states, NLL and the per-pair coefficients at +|c| and -|c|: one forward pass of
        [batch; batch] with per-row coefficients where the adapter kind takes them, else one pass
        per sign (``mags`` then holds one value)."""
        device = batch["input_ids"].device
        mags = mags.to(device)
        if not self.adapter.per_example:
            return {s: (*self._forward(batch, s * float(mags[0])), s * mags) for s in COEFFS}
        # each row twice in a row, at +|c| then -|c|: the decoder layers below the first adapted one
        # see the same input in both, so they run once per row (hidden.shared_prefix)
        both = {k: batch[k].repeat_interleave(2, 0) for k in ("input_ids", "attention_mask", "suffix_mask")}
        per_row = torch.cat([mags, mags])  # [pos; neg] rows of a pair share its |c|
        coeff = torch.stack([COEFFS[0] * per_row, COEFFS[1] * per_row], 1).flatten()
        with hidden.shared_prefix(self.model, self.prefix, 2):
            h, nll = self._forward(both, coeff)
        return {s: ({layer: t[k::2] for layer, t in h.items()}, nll[k::2], s * mags) for k, s in enumerate(COEFFS)}

    def step_terms(self, batch, step: int | None = None) -> dict[str, torch.Tensor]:
        step = self.global_step + self.start_step if step is None else step
        terms, total = {}, 0.0
        lc = self.loss_cfg
        if lc.w_contrast + lc.w_shift + lc.nll_weight > 0:
            mask = batch["suffix_mask"]
            p_base, nll_base = self.base_reference(batch)
            mags = self.magnitudes([int(i) for i in batch["index"]], step)
            for s, (h, nll, c) in self.policy_passes(batch, mags).items():
                t = contrastive_loss(h, p_base, nll, nll_base, mask, self.vectors, self.scale, c, lc)
                total = total + t["loss"]
                tag = "pos" if s > 0 else "neg"
                terms.update({f"{k}@{tag}": v for k, v in t.items()})
        if lc.behaviour:
            t = self.behaviour_terms(step)
            total = total + lc.w_pref * t.get("pref", 0.0) + lc.w_distill * t.get("distill", 0.0)
            terms.update(t)
        if lc.w_kl > 0:
            t = self.neutral_terms(step)
            total = total + lc.w_kl * t["kl_barrier"]
            terms.update(t)
        terms["loss"] = total
        return terms

    # ------------------------------------------------------------------ behaviour terms

    def _shard(self, what: str, pool: int, n: int, step: int) -> tuple[list[int], list[float]]:
        """This rank's share of the step's sample: n of ``pool`` indices and a signed coefficient
        each (the first half of the sample at +|c|, the second at -|c|, so every batch holds both
        signs), drawn by (seed, what, step): the same global sample on every rank and on resume.
        Kinds without per-example coefficients use one |c| per step."""
        picks, rng = bh.draw(self.train_cfg.seed, what, step, pool, n)
        if self.adapter.per_example:
            mags = [float(rng.choice(self.loss_cfg.coeffs)) for _ in picks]
        else:
            mags = [self._step_magnitude(step)] * len(picks)
        half = (len(picks) + 1) // 2
        signed = [m if k < half else -m for k, m in enumerate(mags)]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        return picks[rank::world], signed[rank::world]

    def _logits_at(self, inputs: dict[str, torch.Tensor], c_rows: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits (R, keep, V) at the last ``keep`` positions of ``inputs`` (input_ids, attention_mask
        and maybe position_ids, R rows), row r run at coefficient c_rows[r]: one pass with per-row
        coefficients, or one pass per distinct value."""
        if self.adapter.per_example:
            with steer(self.model, c_rows):
                return self.model(**inputs, logits_to_keep=keep).logits
        out = [None] * len(c_rows)
        for c in sorted(set(c_rows.tolist())):
            rows = (c_rows == c).nonzero()[:, 0]
            with steer(self.model, c):
                logits = self.model(**{k: v[rows] for k, v in inputs.items()}, logits_to_keep=keep).logits
            for k, r in enumerate(rows.tolist()):
                out[r] = logits[k]
        return torch.stack(out)

    def _row_logprobs(self, b: dict[str, torch.Tensor], c: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The step's 2m completions from one row each (``collate``), each prompt's two at its
        coefficient c (m,), as ``at``: token ids (2m, K-1, X) -> their log-probs (2m, K-1, X) at
        ``collate``'s completion positions."""
        logp = completion_logprobs(self._logits_at({k: b[k] for k in ("input_ids", "attention_mask")},
                                                   c.repeat_interleave(2), b["mask"].shape[1] + 1))
        return lambda tokens: logp.gather(-1, tokens)

    def _packed_logprobs(self, packed: dict, c: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``_row_logprobs`` from one row per prompt (``behaviour.pack``)."""
        logits = self._logits_at({"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
                                  "attention_mask": self._attention_mask(packed["allowed"])}, c, packed["keep"])
        logp = completion_logprobs(logits)  # (m, keep - 1, V): the last position predicts nothing
        rows = torch.arange(len(c), device=c.device).repeat_interleave(2)[:, None, None]
        pos = packed["pick"][..., None]
        return lambda tokens: logp[rows, pos, tokens]  # only the asked entries (not whole rows) are copied

    def _packed_rows(self, items: list, b: dict[str, torch.Tensor], c: torch.Tensor) -> dict | None:
        """``behaviour.pack`` of the step's items on the model's device, or None where the run does not
        pack: an attention implementation other than sdpa or eager (flash takes no custom mask),
        prompts whose two items differ before their completions, or a first comparison
        (``_packing_agrees``) that found packing unequal to one row per completion."""
        attention = hidden.base_model_of(self.model).config._attn_implementation
        packed = bh.pack(items, self.pad_id) if self._packing is not False and attention in ("sdpa", "eager") else None
        if packed is None:
            return None
        packed = {k: v.to(b["input_ids"].device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
        if self._packing is None:
            self._packing = self._packing_agrees(b, packed, c)
        return packed if self._packing else None

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` (m, T, T) as the (m, 1, T, T) mask the model's attention takes as given: as it
        is for sdpa, additive for eager (the two implementations ``behaviour_terms`` packs for)."""
        if hidden.base_model_of(self.model).config._attn_implementation == "sdpa":
            return allowed[:, None]
        dtype = hidden.base_model_of(self.model).get_input_embeddings().weight.dtype
        return torch.zeros(allowed[:, None].shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min)

    @torch.no_grad()
    def _packing_agrees(self, b: dict[str, torch.Tensor], packed: dict, c: torch.Tensor) -> bool:
        """Whether packed rows give each completion token the log-prob of one row per completion,
        compared once, in eval mode, on the completion tokens: y_d's log-probs must not move when
        y_h's tokens change (an attention that ignores the custom mask lets y_d see y_h), and the
        packed log-probs must match one row per completion within 3x (at least 1e-3) what 8 more
        padding tokens change there (rounding: about 2e-5 in fp32, 0.3 in bf16 on SmolLM2)."""
        target = b["input_ids"][:, -b["mask"].shape[1]:, None]
        pads = torch.full((len(target), 8), self.pad_id, dtype=torch.long, device=target.device)
        wide = {**b, "input_ids": torch.cat([pads, b["input_ids"]], 1),
                "attention_mask": torch.cat([torch.zeros_like(pads), b["attention_mask"]], 1)}
        vocab = hidden.base_model_of(self.model).get_input_embeddings().num_embeddings
        other = {**packed, "input_ids": torch.where(packed["y_h"], (packed["input_ids"] + 1) % vocab,
                                                    packed["input_ids"])}
        with _eval_mode(self.model):
            got = [self._row_logprobs(b, c)(target), self._row_logprobs(wide, c)(target),
                   self._packed_logprobs(packed, c)(target), self._packed_logprobs(other, c)(target)]
        one, padded, both, changed = (x[..., 0] for x in got)
        mask = b["mask"]
        y_d = mask.clone()
        y_d[0::2] = False
        most = lambda x, where: float(torch.where(where, x.abs(), 0.0).max())  # noqa: E731
        leak, diff, noise = most(changed - both, y_d), most(both - one, mask), most(padded - one, mask)
        ok = leak <= 1e-4 and diff <= max(1e-3, 3 * noise)
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank packs alike, or none does
            ok = bool(self.trainer.strategy.reduce_boolean_decision(ok, all=True))
        if not math.isfinite(leak + diff + noise):
            log.info("behaviour terms: a completion token's log-prob is not finite in the packing check; "
                     "one row per completion")
        elif leak > 1e-4:
            log.info(f"behaviour terms: in one row per prompt, y_d's log-probs moved by {leak:.3g} when y_h changed "
                     "(the model's attention does not take a custom mask); one row per completion")
        elif diff > max(1e-3, 3 * noise):
            log.info(f"behaviour terms: one row per prompt changed a completion token's log-prob by {diff:.3g}, "
                     f"more than 3x the {noise:.3g} of 8 more padding tokens; one row per completion")
        return ok

    def behaviour_terms(self, step: int) -> dict[str, torch.Tensor]:
        """Preference and distillation on this step's behaviour prompts (persona-free input), each
        prompt's two completions at its own signed coefficient."""
        picks, cs = self._shard("behaviour", len(self.behaviour), self.behaviour_cfg.batch_size, step)
        device = self.ref_0.device
        if any(self.behaviour[j] is None for j in picks):
            raise TrainingError(f"step {step} draws behaviour prompts that were not prepared (behaviour.prepare "
                                "prepares those that train.seed, train.steps and behaviour.batch_size draw)")
        items = [it for j in picks for it in self.behaviour[j]]  # y_h0, y_d0, y_h1, ...
        b = {k: v.to(device) for k, v in bh.collate(items, self.pad_id).items()}
        c = torch.tensor(cs, device=device)  # (m,) per prompt
        c_rows = c.repeat_interleave(2)  # (2m,) both completions of a prompt
        packed = self._packed_rows(items, b, c)
        at = self._row_logprobs(b, c) if packed is None else self._packed_logprobs(packed, c)
        out = {}
        if self.loss_cfg.w_pref > 0:
            tok = at(b["input_ids"][:, -b["mask"].shape[1]:, None])[..., 0]  # (2m, K-1)
            seq = (tok * b["mask"]).sum(1).view(-1, 2)  # (m, h/d)
            ref = (b["tok_lp0"] * b["mask"]).sum(1).view(-1, 2)
            out.update(preference_terms(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], c,
                                        self.loss_cfg.pref_beta, self.loss_cfg.pref_gamma))
        if self.loss_cfg.w_distill > 0:
            target = distill_target(b["lp"], b["rest"], c_rows, self.loss_cfg.distill_target)
            out.update(distill_terms(support_logprobs(at(b["idx"])), target, b["mask"]))
        return out

    def neutral_terms(self, step: int) -> dict[str, torch.Tensor]:
        """The KL barrier on this step's neutral passages, each at its own signed coefficient,
        against the base model's log-probs (``_neutral_base``)."""
        picks, cs = self._shard("neutral", self.neutral["input_ids"].shape[0], self.behaviour_cfg.neutral_batch, step)
        ids, attn, mask, keep = self._neutral_rows(picks)
        base = self._neutral_base(picks, keep)
        if base is None:  # a model whose logits are not its output layer's
            with torch.no_grad(), steer(self.model, 0.0):
                base = completion_logprobs(self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits)
        logp = completion_logprobs(self._logits_at({"input_ids": ids, "attention_mask": attn},
                                                   torch.tensor(cs, device=ids.device), keep))
        return kl_barrier(logp, base, mask[:, -(keep - 1):], self.loss_cfg.kl_margin)

    def _neutral_rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Input ids, attention mask and text mask (R, T) of neutral passages ``rows`` on the
        model's device, without the padding every row has, and the logits to keep (the longest
        text + 1)."""
        b = {k: v[rows].to(self.ref_0.device) for k, v in self.neutral.items()}
        cut = b["input_ids"].shape[1] - int(b["attention_mask"].sum(1).max())
        keep = int(b["mask"].sum(1).max()) + 1
        return b["input_ids"][:, cut:], b["attention_mask"][:, cut:], b["mask"][:, cut:], keep

    def _neutral_chunk(self, j: int) -> None:
        """Keep the base model's final hidden states (its output layer's input) at the last n + 1
        positions of each neutral passage of chunk j (n: its text tokens), from one no-grad pass;
        give up keeping (``_neutral_states`` None) for a model whose logits are not that layer's
        output on them."""
        n_all = self.neutral["input_ids"].shape[0]
        rows = list(range(j * NEUTRAL_CHUNK, min(n_all, (j + 1) * NEUTRAL_CHUNK)))
        ids, attn, mask, keep = self._neutral_rows(rows)
        head = hidden.base_model_of(self.model).get_output_embeddings()
        if head is None:
            self._neutral_states = None
            return
        name = next(n for n, m in hidden.base_model_of(self.model).named_modules() if m is head)
        got = {}
        # eval mode, no dropout: the same states whenever a chunk is first drawn
        with (_eval_mode(self.model), torch.no_grad(), steer(self.model, 0.0),
              hidden.hooks(self.model, {name: lambda h: got.__setitem__("h", h.detach())}, on="input")):
            logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
            h = got.get("h")
            exact = h is not None and h.shape[:2] == logits.shape[:2] and torch.equal(head(h), logits)
        if not exact:
            self._neutral_states = None
            return
        for r, (i, n) in enumerate(zip(rows, mask.sum(1).tolist())):
            self._neutral_states[i] = h[r, keep - n - 1:]

    def _neutral_base(self, picks: list[int], keep: int) -> torch.Tensor | None:
        """The base model's log-probs (R, keep - 1, V) on neutral passages ``picks``, right-aligned
        as ``neutral_terms`` lays them out: its output layer on the final hidden states kept per
        passage (``_neutral_chunk``). The states are computed in fixed chunks of NEUTRAL_CHUNK
        passages, the first time one of a chunk is drawn (a base pass over that chunk, not one per
        step): a resumed or data-parallel run gets the same values. None where they cannot be kept
        (no output layer, or logits that are not its output): the step then runs a base pass."""
        for j in sorted({i // NEUTRAL_CHUNK for i in picks}):
            if self._neutral_states is not None and (j * NEUTRAL_CHUNK) not in self._neutral_states:
                self._neutral_chunk(j)
        if self._neutral_states is None:
            return None
        states = [self._neutral_states[i] for i in picks]
        hs = states[0].new_zeros(len(picks), keep, states[0].shape[-1])  # zeros before a shorter passage's text
        for r, h in enumerate(states):
            hs[r, keep - h.shape[0]:] = h
        with torch.no_grad(), steer(self.model, 0.0):
            return completion_logprobs(hidden.base_model_of(self.model).get_output_embeddings()(hs))

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        """Data-parallel runs: every rank computed the directions from the same pairs; rank 0's
        loss layers, references and scales are broadcast so all ranks train against identical
        ones (GPU kernels need not agree bit for bit, so a near-tie could select other layers)."""
        if self.trainer is None or self.trainer.world_size <= 1:
            return
        ref = self.trainer.strategy.broadcast({"layers": self.layers, "v": [t.cpu() for t in self.vectors.values()],
                                               "scale": self.scale}, src=0)
        for i, v in enumerate(ref["v"]):
            getattr(self, f"ref_{i}").copy_(v)
        self.layers, self.scale = list(ref["layers"]), ref["scale"]
        self.base_cache = BaseCache(self.layers)

    def on_fit_start(self):
        self.checksum.verify(self.model, "fit start")

    def training_step(self, batch, batch_idx):
        terms = self.step_terms(batch)
        if not torch.isfinite(terms["loss"].detach()):
            bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
            raise TrainingError(f"the loss is not finite at step {self.start_step + self.global_step + 1} (terms: "
                                f"{', '.join(bad)}); lower train.lr (now {self.train_cfg.lr:g}) or the loss weights")
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, prog_bar=False,
                      batch_size=batch["index"].numel())
        self.log("loss", terms["loss"].detach(), prog_bar=True, batch_size=batch["index"].numel())
        return terms["loss"]

    def _val_base(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The base model's last-token hidden states {layer: (2B, D)} and NLL (2B, T) of a validation
        batch: computed at the first validation, reused by every later one (the base never changes
        and the validation batches are the same every time)."""
        key = hidden.PrefixStore.key(batch["input_ids"], batch["attention_mask"])
        if key not in self._val_cache:
            h, nll = self._forward(batch, 0.0)
            self._val_cache[key] = ({layer: t[:, -1].float().clone() for layer, t in h.items()}, nll)
        return self._val_cache[key]

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        """Held-out pairs: the contrast projection (Δ·v)/s on the last token, and the suffix
        ΔNLL, at c = 0, -1, +1 (+1 and -1 in one pass where the kind takes per-row coefficients)."""
        n = batch["index"].numel()
        last0, nll0 = self._val_base(batch)
        rows = {0.0: (last0, None)}
        for s, (h, nll, _) in self.policy_passes(batch, torch.ones(n)).items():
            rows[s] = ({layer: t[:, -1].float() for layer, t in h.items()}, nll)
        for c in (0.0, -1.0, 1.0):
            last, nll = rows[c]
            for layer in self.layers:
                pos, neg = last[layer].chunk(2)
                sep = ((pos - neg) @ self.vectors[layer]) / self.scale[layer]
                self.log(f"val/sep@{c:+g}/{layer}", sep.mean(), batch_size=n)
            if c != 0.0:
                self.log(f"val/dnll@{c:+g}", masked_mean(nll - nll0, batch["suffix_mask"], (0, 1)), batch_size=n)

    def on_validation_epoch_end(self):
        self.checksum.verify(self.model, f"validation at step {self.global_step}")

    def on_fit_end(self):
        self.checksum.verify(self.model, "fit end")

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # before any callback (the checkpoint) sees the new weights
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.adapter.trainable_parameters()):
            raise TrainingError(f"the adapter's weights became non-finite at step "
                                f"{self.start_step + self.global_step + 1}"
                                f"; lower train.lr (now {self.train_cfg.lr:g})")

    def configure_optimizers(self):
        params = self.adapter.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay)
        warm, total = self.train_cfg.warmup, self.train_cfg.steps

        def schedule(step):  # linear warm-up, then cosine down to 10%
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        if self.optimizer_state is not None:  # resumed: AdamW moments and step counts as saved
            opt.load_state_dict({"state": self.optimizer_state, "param_groups": opt.state_dict()["param_groups"]})
        start = self.start_step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(step + start))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
