"""Every YAML under configs/ (sub-folders included) loads and validates offline, and the
configs for real models in configs/models/ name the intended model, quantization and kind,
hold only deltas, and use layer patterns that exist in that architecture (checked on a tiny
random model of the same class and depth: no hub access)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from adapters import hidden
from adapters.config import QUANTIZED_KINDS, Config, config_to_dict, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
MODELS = sorted((CONFIGS / "models").glob("*.yaml"))

# file -> (model id, model.quantization, adapter.kind)
EXPECTED = {
    "qwen3-4b-instruct.yaml": ("Qwen/Qwen3-4B-Instruct-2507", "4bit", "lora"),
    "qwen3-0.6b.yaml": ("Qwen/Qwen3-0.6B", "none", "lora"),
    "gemma-3-1b-it.yaml": ("google/gemma-3-1b-it", "none", "lora"),
    "llama-3.1-8b-instruct.yaml": ("meta-llama/Llama-3.1-8B-Instruct", "4bit", "lora"),
}
# model id -> (transformers config / model class names, decoder layers of the real model)
ARCH = {
    "Qwen/Qwen3-4B-Instruct-2507": ("Qwen3Config", "Qwen3ForCausalLM", 36),
    "Qwen/Qwen3-0.6B": ("Qwen3Config", "Qwen3ForCausalLM", 28),
    "google/gemma-3-1b-it": ("Gemma3TextConfig", "Gemma3ForCausalLM", 26),
    "meta-llama/Llama-3.1-8B-Instruct": ("LlamaConfig", "LlamaForCausalLM", 32),
}


def load_any(path: Path):
    """A run config through load_config; a comparison / sweep spec through its own loader (which
    loads every run config it names)."""
    folder = path.parent.name
    if folder == "compare":
        from adapters.compare import load_spec

        return load_spec(path)
    if folder == "sweep":
        from adapters.sweep import load_spec

        return load_spec(path)
    return load_config(path)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates(path, tmp_path):
    out = load_any(path)
    if isinstance(out, Config):  # run configs also round-trip
        dump_config(out, tmp_path / "c.yaml")
        assert load_config(tmp_path / "c.yaml") == out


def test_the_model_configs_are_the_intended_ones():
    assert {p.name for p in MODELS} == set(EXPECTED), "add new model configs to EXPECTED (and ARCH)"
    for path in MODELS:
        cfg = load_config(path)
        name, quantization, kind = EXPECTED[path.name]
        assert (cfg.model.name, cfg.model.quantization, cfg.adapter.kind) == (name, quantization, kind), path.name
        assert quantization == "none" or kind in QUANTIZED_KINDS


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_model_configs_hold_only_deltas_and_estimates(path):
    text = path.read_text()
    defaults = dict(_leaves(config_to_dict(Config())))
    same = [k for k, v in _leaves(yaml.safe_load(text)) if defaults.get(k) == v and k != "adapter.kind"]
    assert not same, f"{path.name} repeats defaults: {same}"
    assert "ESTIMATE" in text and "GB" in text, "the expected GPU memory, marked as an estimate"


def tiny_of(model_id: str):
    """A tiny random model of the real architecture class, with the real number of layers."""
    import transformers

    config_cls, model_cls, n_layers = ARCH[model_id]
    cfg = getattr(transformers, config_cls)(vocab_size=128, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=n_layers, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg)


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_model_config_layer_patterns_exist_in_the_architecture(path):
    cfg = load_config(path)
    model = tiny_of(cfg.model.name)
    n = ARCH[cfg.model.name][2]
    text = path.read_text()
    assert f"{n} layers" in text and f"{{N}} = 0..{n - 1}" in text, "the comment gives the layer count and range"
    candidates = hidden.resolve(model, cfg.directions.candidates, cfg.directions.depth)
    targets = hidden.resolve(model, cfg.adapter.targets, cfg.adapter.depth)
    assert candidates and targets
    # every pattern the comment lists resolves too
    for pat in ("model.layers.{N}", "model.layers.{N}.self_attn.o_proj", "model.layers.{N}.mlp.down_proj",
                "model.layers.{N}.self_attn.q_proj", "model.layers.{N}.mlp.gate_proj"):
        assert hidden.resolve(model, [pat], (0.0, 1.0))
    # the comment's "o_proj + down_proj of layers A-B" is what adapter.depth selects
    m = re.search(r"down_proj of layers (\d+)-(\d+)", text)
    assert m, "say which layers the adapter acts on"
    assert sorted({hidden.layer_index(t) for t in targets}) == list(range(int(m[1]), int(m[2]) + 1))
