"""``steer(model, c)``: the only way to set the adapter's coefficient.

    with steer(model, -1.0):
        model.generate(...)

The coefficient belongs to the thread (``contextvars`` context) that entered the block: each
forward pass of the model sets the adapter (hooks / peft scaling) for its own context's
coefficient and restores it when the pass ends, also after an exception (see
``tuners.base``). ``c == 0`` runs exactly the base model.
``c`` may be a float, a 0-d tensor (which may require grad) or, for per-example
coefficients, a 1-d tensor with one value per batch row.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import queue
import threading
from typing import Iterator

import torch
from torch import nn

from .tuners.base import CoefficientError, Steering, attached_adapter


MAX_COEFF = 1e3
"""Coefficients are multiples of the trained unit (|c| <= a few); far beyond this the model's
activations overflow, so a larger magnitude is a mistake (a typo, a unit confusion), refused."""


def check_coeff(c):
    if isinstance(c, bool) or not (isinstance(c, numbers.Real) or torch.is_tensor(c)):
        raise CoefficientError(f"steering coefficient must be a finite number, got {c!r} ({type(c).__name__})")
    if torch.is_tensor(c):
        if c.dim() > 1 or not c.dtype.is_floating_point and c.dtype not in (torch.int32, torch.int64):
            raise CoefficientError(f"a tensor coefficient must be 0-d or 1-d (one per example), got shape "
                                   f"{tuple(c.shape)} {c.dtype}")
        if c.numel() == 0:
            raise CoefficientError("the coefficient tensor is empty; give one value, or one per batch row")
        if not c.dtype.is_floating_point:
            c = c.float()  # integer coefficients: the same numbers
        if not torch.isfinite(c.detach()).all():
            raise CoefficientError(f"steering coefficient must be finite, got {c.detach().cpu().tolist()}")
        if c.numel() and float(c.detach().abs().max()) > MAX_COEFF:
            raise CoefficientError(f"steering coefficient {float(c.detach().abs().max()):g} is beyond "
                                   f"±{MAX_COEFF:g}; coefficients are multiples of the trained unit (|c| of a few)")
        return c
    if not math.isfinite(float(c)):
        raise CoefficientError(f"steering coefficient must be finite, got {c!r}")
    if abs(float(c)) > MAX_COEFF:
        raise CoefficientError(f"steering coefficient {float(c):g} is beyond ±{MAX_COEFF:g}; coefficients are "
                               "multiples of the trained unit (|c| of a few)")
    return float(c)


def is_zero(c) -> bool:
    return bool((c.detach() == 0).all()) if torch.is_tensor(c) else c == 0.0


@contextlib.contextmanager
def steer(model: nn.Module, coeff) -> Iterator[nn.Module]:
    """Run ``model`` with its adapter at coefficient ``coeff`` inside the block."""
    adapter = attached_adapter(model)
    c = check_coeff(coeff)
    if adapter.active:
        raise RuntimeError("steer() blocks cannot be nested; exit the outer block first (each thread has "
                           "its own steering: other threads may steer the same model at once)")
    if torch.is_tensor(c) and c.dim() == 1 and not adapter.per_example:
        if c.numel() and bool((c.detach() == c.detach()[0]).all()):
            c = c[0]  # one value for every row: the same function
        else:
            from .tuners import KINDS

            batched = sorted(k for k, cls in KINDS.items() if cls.per_example)
            raise CoefficientError(f"adapter kind {adapter.kind!r} takes one coefficient per forward pass, not "
                                   "one per example; loop over the coefficients (kinds with per-example "
                                   f"coefficients: {', '.join(batched)})")
    off = is_zero(c) and not (torch.is_tensor(c) and c.requires_grad)
    token = adapter._steering.set(Steering(c, off))
    try:
        yield model
    finally:
        adapter._steering.reset(token)


def generate(model, tokenizer, prompt: str, coeffs: list[float], max_new_tokens: int = 48,
             system: str = "") -> dict[float, str]:
    """Greedy completions of ``prompt`` (chat template applied) at each coefficient; refuses a
    coefficient where the model's outputs are not finite."""
    texts = {}
    for texts in stream(model, tokenizer, prompt, coeffs, max_new_tokens, system):
        pass
    return texts


def stream(model, tokenizer, prompt: str, coeffs: list[float], max_new_tokens: int = 48, system: str = "",
           stop: threading.Event | None = None) -> Iterator[dict[float, str]]:
    """Greedy completions of ``prompt`` (chat template applied) at each coefficient, yielded as
    they grow: a dict {c: text so far} after every generated token.

    c = 0 runs alone, as the base model (the same call as ``model.generate`` without an
    adapter); the other coefficients run as one batch when the adapter takes per-example
    coefficients, else one after the other. Setting ``stop`` (only read, never set here) or
    closing the generator ends generation after the current token. A coefficient whose outputs
    are not finite raises ``CoefficientError`` once the others are done."""
    from .data import render

    coeffs = list(dict.fromkeys(float(check_coeff(c)) for c in coeffs))
    enc = tokenizer(render(tokenizer, prompt, "", system), return_tensors="pt", add_special_tokens=False)
    steered = [c for c in coeffs if c != 0.0]
    groups = ([[0.0]] if 0.0 in coeffs else []) + (
        [steered] if attached_adapter(model).per_example and steered else [[c] for c in steered])
    texts = {c: "" for c in coeffs}
    bad = []
    halt = threading.Event()  # this call's own: set when it ends, however it ends
    try:
        for group in groups:
            if halt.is_set() or stop is not None and stop.is_set():
                break
            rows = _Rows(tokenizer, model, len(group))
            worker = threading.Thread(target=_generate_rows, args=(model, tokenizer, enc, group, max_new_tokens,
                                                                   rows, (halt, stop)), daemon=True)
            worker.start()
            while (item := rows.queue.get()) is not None:
                texts.update(zip(group, item))
                yield dict(texts)
            worker.join()
            if rows.error is not None:
                raise rows.error
            bad += [c for c, ok in zip(group, rows.finite.tolist()) if not ok]
    finally:
        halt.set()  # a closed generator (a cancelled request) stops its worker after one token
    if bad:
        raise CoefficientError(f"at coefficient {', '.join(f'{c:+g}' for c in bad)} the model's outputs are not "
                               "finite (the adapter overflows the activations there); use a smaller |c|")


class _Rows:
    """A ``generate`` streamer for a batch of rows: decodes each row's new tokens and queues the
    texts; a row ends at its first end-of-sequence token (the generation config's or the
    tokenizer's). Also the logits processor that notes, per unfinished row, whether every
    logit stayed finite (without keeping the logits)."""

    def __init__(self, tokenizer, model, n: int):
        self.tokenizer, self.queue, self.error = tokenizer, queue.SimpleQueue(), None
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {None}
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.done, self.prompt = [False] * n, True
        self.finite = torch.ones(n, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        live = torch.tensor([not d for d in self.done], device=scores.device)
        self.finite &= (torch.isfinite(scores).all(-1) | ~live).cpu()
        return scores

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:  # generate's first call hands over the prompt
            self.prompt = False
            return
        for i, t in enumerate(value.view(-1).tolist()):
            if not self.done[i]:
                self.done[i] = t in self.eos
                self.ids[i].append(t)
        self.queue.put([self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.ids])

    def end(self) -> None:
        pass  # the worker ends the queue, after generate has returned or raised


def _generate_rows(model, tokenizer, enc, group: list[float], max_new_tokens: int, rows: _Rows,
                   stops: tuple[threading.Event, threading.Event | None]) -> None:
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stopped = any(e is not None and e.is_set() for e in stops)
            return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    c = torch.tensor(group, dtype=torch.float32, device=device) if len(group) > 1 else group[0]
    try:
        with steer(model, c), torch.no_grad():
            model.generate(**{k: v.to(device).repeat(len(group), 1) for k, v in enc.items()},
                           max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                           streamer=rows, logits_processor=LogitsProcessorList([rows]),
                           stopping_criteria=StoppingCriteriaList([Stop()]))
    except BaseException as e:  # re-raised in the consumer's thread
        rows.error = e
    finally:
        rows.queue.put(None)
