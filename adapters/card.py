"""A Hugging Face model card (``README.md`` with YAML metadata) for a run folder, and for the
folders ``export`` writes from it: what the adapter steers, how to run it at a coefficient, and
the run's evaluation (headline table and dose-response plot). ``huggingface-cli upload`` takes
the folder as it is."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import load_config
from .evaluate.report import md_table
from .io import atomic_write_text
from .models import hub_id

COLUMNS = ("method", "slope", "r2", "monotone", "dnll_m1", "dnll_p1", "shift_up", "shift_down")


USAGE = {
    "contrastive-adapters": ["```python", "from adapters import load_run, steer", "",
                             "model, tokenizer = load_run(\"path/to/this/folder\")",
                             "with steer(model, -1.0):  # any coefficient; 0 is the base model",
                             "    ids = tokenizer(\"Tell me about yourself.\", return_tensors=\"pt\")",
                             "    out = model.generate(**ids)",
                             "```"],
    "peft": ["A peft adapter folder: it computes coefficient +1 (for LoRA, "
             "`peft.helpers.rescale_adapter_scale(model, c)` gives coefficient c).", "", "```python",
             "from peft import AutoPeftModelForCausalLM", "",
             "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```"],
    "transformers": ["The base model with the adapter merged in at one coefficient (`contrastive_adapter.json` "
                     "says which).", "", "```python", "from transformers import AutoModelForCausalLM", "",
                     "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```"],
}
"""How to load the folder, by the card's ``library_name`` (the run itself, a peft export, a merged one)."""


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:+.3g}" if isinstance(v, (int, float)) else str(v)


def _on_the_hub(name: str) -> bool:
    """Whether a model name reads as a Hub model id (user/name, optionally @revision) rather than a
    local folder."""
    from .run import HUB_REPO

    return bool(HUB_REPO.fullmatch(name)) and not Path(name).expanduser().exists()


def card_text(run: str | Path, library_name: str = "contrastive-adapters", plot: bool = True) -> str:
    """The card of the run in folder ``run`` (its config.yaml, and report.json when evaluated);
    ``plot`` links the run's report.png (present beside the card)."""
    run = Path(run)
    cfg = load_config(run / "config.yaml")
    base, kind = hub_id(cfg.model.name), cfg.adapter.kind
    meta = {"library_name": library_name, "pipeline_tag": "text-generation",
            "tags": ["steering", "contrastive-adapters", "representation-engineering", kind]}
    if _on_the_hub(base):  # the Hub checks base_model against its model ids: a local path is not one
        meta = {"base_model": base.split("@")[0], **meta}
    if cfg.data.pairs.startswith("hf:"):
        meta["datasets"] = [cfg.data.pairs.removeprefix("hf:")]
    pairs = {"builtin": "the built-in honesty pairs"}.get(cfg.data.pairs, f"`{cfg.data.pairs}`")
    lines = [
        f"# {run.name}: a signed {kind} adapter for {base}"
        + ("" if _on_the_hub(base) else " (a local model: the card names no base_model)"), "",
        f"Trained with contrastive-adapters on {pairs}: "
        f"the persona \"{cfg.data.positive}\" against \"{cfg.data.negative}\" (user turn: "
        f"\"{cfg.data.template}\"). One adapter, three behaviours: coefficient +1 moves the model towards the "
        "first persona, -1 towards the second, and 0 is exactly the base model.", "",
        f"Training: {cfg.train.steps} steps, seed {cfg.train.seed}, loss weights: "
        + ", ".join(f"{k} {getattr(cfg.loss, k):g}" for k in ("w_contrast", "w_shift", "nll_weight", "w_pref",
                                                               "w_distill", "w_kl")) + ".", "",
        "## Use", "", *USAGE[library_name], ""]
    report = run / "report.json"
    if report.is_file():
        summary = json.loads(report.read_text(encoding="utf-8"))["summary"]
        lines += ["## Evaluation", "",
                  "Held-out probes never used in training; shift = the largest move of the probe score away from "
                  "c = 0 within the neutral-text ΔNLL budget (nats/token).", ""]
        for probe in dict.fromkeys(r["probe"] for r in summary):
            lines += [f"### {probe}", ""] + md_table(list(COLUMNS), [[_fmt(r.get(c, "")) for c in COLUMNS]
                                                                  for r in summary if r["probe"] == probe]) + [""]
        if plot:
            lines += ["![dose-response](report.png)", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(lines)


def write_card(run: str | Path, dest: str | Path | None = None, library_name: str = "contrastive-adapters") -> Path:
    """``README.md`` in ``dest`` (default: the run folder itself), the plot linked when it is there."""
    run = Path(run)
    dest = Path(dest) if dest is not None else run
    path = dest / "README.md"
    atomic_write_text(path, card_text(run, library_name, plot=(dest / "report.png").is_file()))
    return path
