"""What a run is about to do and how long each stage should take on this machine: the lines the
first screen shows (``lines``), and the machine line every timing is quoted with.

The estimate scales a reference run (the main job, measured stage by stage) by two ratios:
how fast this machine runs this model (``calibrate``: one no-grad forward pass of 8 x 64
tokens, timed against the same pass on the reference machine), and how much work this config
asks for against the main job's (prompts to complete, steps and their rows, methods x
coefficients x probe items). Cached stages (completions seen before) are said to be cached.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import Config

REFERENCE = {
    "machine": "2-core Intel Xeon with AMX, fp32, bundled SmolLM2-135M-Instruct",
    "calibration": 0.61,  # seconds for calibrate()'s pass there, in that run
    "seconds": {"directions": 24.4, "behaviour": 153.7, "fit": 176.2, "evaluate": 188.6, "peer": 150.0},
    # peer: one independent library's vector, trained and swept (README: both add about 5 minutes)
    "work": {"directions": 390, "behaviour": 118 * 72, "step": 8 * 72 + 2 * 3 * 40, "steps": 50,
             "evaluate": 3 * 15 * 34 + 3 * 34 + 34},
}
"""The main job (configs/honesty.yaml, fp32, wandb offline, first run from an empty cache; 567 s
in all) as measured: its stages in seconds and its work in the units ``lines`` counts. Two runs
of the same job an hour apart on that machine differed by up to 25% per stage: the estimates are
no finer than that."""

PROBE_ROWS = {"self_report": 26, "facts": 58, "yes_no": 50}
"""Scored rows per coefficient of each built-in probe (others count as 50)."""


def machine_line(dtype=None) -> str:
    """Where a figure was measured: CPU model, cores, AMX or not, torch threads, dtype, GPU."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
    return (f"machine: {cpu}, {os.cpu_count()} cores, {'AMX' if 'amx' in flags else 'no AMX'}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads"
            f"{f', dtype {dtype}' if dtype is not None else ''}, {gpu}")


@torch.no_grad()
def calibrate(model) -> float:
    """Seconds for a no-grad forward pass of 8 x 64 tokens (the faster of two, after a small
    warm-up pass). Measured inside a run, after ``pipeline.base``, as the reference was: on the
    reference machine a bare script (``load_base`` then this) measured 0.86-1.14 s where runs
    measured 0.61-0.69 s (cause not found)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids[:2, :16], logits_to_keep=1)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _minutes(seconds: float) -> str:
    return f"~{seconds:.0f} s" if seconds < 90 else f"~{seconds / 60:.1f} min" if seconds < 600 else \
        f"~{seconds / 60:.0f} min"


def lines(cfg: Config, n_pairs: int, n_prompts: int, cached_prompts: int, speed: float) -> list[str]:
    """One line per stage, what it does and its estimated time, then the total. ``speed`` =
    calibrate() here / the reference's; ``n_prompts`` the behaviour prompts training draws,
    ``cached_prompts`` how many of them the completions cache already holds."""
    ref, out = REFERENCE, []
    sec, work = ref["seconds"], ref["work"]
    total = sec["directions"] * speed * n_pairs / work["directions"]
    out.append(f"plan: reference directions from {n_pairs} pairs, {_minutes(total)}")
    b, loss = cfg.behaviour, cfg.loss
    if loss.behaviour:
        todo = n_prompts - cached_prompts
        est = sec["behaviour"] * speed * todo * (b.max_new_tokens + 40) / work["behaviour"]
        total += est
        out.append(f"plan: behaviour targets for {n_prompts} prompts ({b.max_new_tokens}-token completions under "
                   f"each persona, and the teacher's log-probs), "
                   + (f"{_minutes(est)}" + (f" ({cached_prompts} cached)" if cached_prompts else "") if todo else
                      "from the cache"))
    rows = (2 * b.batch_size * (b.max_new_tokens + 40) if loss.behaviour else 0) \
        + (3 * b.neutral_batch * 40 if loss.w_kl > 0 else 0) \
        + (4 * cfg.train.batch_size * 30 if loss.w_contrast + loss.w_shift + loss.nll_weight > 0 else 0)
    fit = sec["fit"] * speed * cfg.train.steps / work["steps"] * rows / work["step"]
    total += fit
    out.append(f"plan: {cfg.train.steps} training steps of the {cfg.adapter.kind} adapter, {_minutes(fit)}")
    if cfg.eval.enabled:
        ev = cfg.eval
        per_coeff = ev.neutral_items + sum(PROBE_ROWS.get(p, 50) for p in ev.probes)
        ours = [m for m in ev.baselines if m in ("pca_vector", "mean_diff", "random")]
        peers = [m for m in ev.baselines if m not in ("pca_vector", "mean_diff", "random", "prompting", "base")]
        scaled = (1 + len(ours)) * (len(ev.coeffs) + 4) * per_coeff  # + the ΔNLL budget's search
        fixed = (3 if "prompting" in ev.baselines else 0) + (1 if "base" in ev.baselines else 0)
        est = speed * (sec["evaluate"] * (scaled + fixed * per_coeff) / work["evaluate"] + sec["peer"] * len(peers))
        total += est
        out.append(f"plan: evaluation of the adapter and {len(ev.baselines)} baselines at {len(ev.coeffs)} "
                   f"coefficients on {', '.join(ev.probes)}, {_minutes(est)}")
    out.append(f"plan: {_minutes(total)} in all on this machine (estimated from a calibration pass against "
               f"the main job measured on a {ref['machine']})")
    return out
