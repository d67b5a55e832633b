"""The LightningModule: bidirectional contrastive training of one signed adapter.

Each step, on a batch [pos; neg] of pairs:
  1. the base model (adapter off, no grad) gives the reference hidden states and token NLL;
  2. for c in (+1, -1) the policy (adapter at c) gives hidden states and NLL, and
     ``loss.contrastive_loss`` turns them into named terms; the two losses are summed.
Only adapter parameters are in the optimiser. The base-weights checksum is verified at fit
start, after every validation and at fit end.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from . import hidden
from .loss import contrastive_loss, masked_mean, token_nll
from .models import BaseChecksum
from .steer import steer

COEFFS = (1.0, -1.0)


class ContrastiveModule(L.LightningModule):
    def __init__(self, model, adapter, directions, loss_cfg, train_cfg, checksum: BaseChecksum,
                 start_step: int = 0, optimizer_state: dict | None = None):
        super().__init__()
        self.start_step = start_step  # > 0 when resuming from a checkpoint at that step
        self.optimizer_state = optimizer_state
        self.model = model
        self.adapter = adapter
        self.loss_cfg, self.train_cfg = loss_cfg, train_cfg
        self.checksum = checksum
        self.layers = list(directions.selected)
        self.scale = {l: directions.scale[l] for l in self.layers}
        for i, l in enumerate(self.layers):
            self.register_buffer(f"ref_{i}", directions.v(l).float().clone(), persistent=False)

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        return {l: getattr(self, f"ref_{i}") for i, l in enumerate(self.layers)}

    # ------------------------------------------------------------------ forward passes

    def _forward(self, batch, c):
        """Hidden states at the loss layers, (2B, T, D) each, and per-token NLL (2B, T)."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        keep = int(batch["suffix_mask"].sum(1).max()) + 1  # logits only where the suffix is predicted
        with steer(self.model, c), hidden.record(self.model, self.layers) as hs:
            logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
        return dict(hs), token_nll(logits, ids)

    def step_terms(self, batch) -> dict[str, torch.Tensor]:
        mask = batch["suffix_mask"]
        with torch.no_grad():
            h_base, nll_base = self._forward(batch, 0.0)
        terms, total = {}, 0.0
        for c in COEFFS:
            h, nll = self._forward(batch, c)
            t = contrastive_loss(h, h_base, nll, nll_base, mask, self.vectors, self.scale, c, self.loss_cfg)
            total = total + t["loss"]
            tag = "pos" if c > 0 else "neg"
            terms.update({f"{k}@{tag}": v for k, v in t.items()})
        terms["loss"] = total
        return terms

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self):
        self.checksum.verify(self.model, "fit start")

    def training_step(self, batch, batch_idx):
        terms = self.step_terms(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, prog_bar=False,
                      batch_size=batch["index"].numel())
        self.log("loss", terms["loss"].detach(), prog_bar=True, batch_size=batch["index"].numel())
        return terms["loss"]

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        """Held-out pairs: the contrast projection (Δ·v)/s on the last token, and the suffix
        ΔNLL, at c = 0, -1, +1."""
        n = batch["index"].numel()
        for c in (0.0, -1.0, 1.0):
            h, nll = self._forward(batch, c)
            for l in self.layers:
                pos, neg = h[l][:, -1].float().chunk(2)
                sep = ((pos - neg) @ self.vectors[l]) / self.scale[l]
                self.log(f"val/sep@{c:+g}/{l}", sep.mean(), batch_size=n)
            if c == 0.0:
                nll0 = nll
            else:
                self.log(f"val/dnll@{c:+g}", masked_mean(nll - nll0, batch["suffix_mask"], (0, 1)), batch_size=n)

    def on_validation_epoch_end(self):
        self.checksum.verify(self.model, f"validation at step {self.global_step}")

    def on_fit_end(self):
        self.checksum.verify(self.model, "fit end")

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
