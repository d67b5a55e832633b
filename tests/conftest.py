"""Shared fixtures: the bundled tokenizer, tiny random Llamas saved to disk, the bundled model.

Everything is offline. The tiny models are built from a config (random weights, fp32,
seeded), saved once per session together with the bundled SmolLM2 tokenizer, so anything
that takes ``model.name`` (load_base, train.py, load_run) can point at their folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# Before anything imports transformers / datasets / wandb: nothing may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from adapters import models
from adapters.config import AdapterConfig, DirectionsConfig, LoraOptions, load_config
from adapters.data import PairCollator, builtin_suffixes, encode_pairs, persona_pairs

torch.set_num_threads(2)

TEMPLATE = "Pretend you're {persona} person making statements about the world."
POSITIVE, NEGATIVE = "an honest", "a dishonest"

# Adapter layers for the tiny model, per kind. Kinds not listed here (peft-style kinds that
# act on Linear modules) get LINEAR_LAYERS; a new residual-stream kind must add itself.
LINEAR_LAYERS = ["model.layers.{N}.self_attn.o_proj", "model.layers.{N}.mlp.down_proj"]
TINY_ADAPTER_LAYERS = {"additive": ["model.layers.{N}"], "lora": LINEAR_LAYERS}


REPRPO_LOSS = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "recipes", "reprpo.yaml")).loss
"""The card's loss (ReprPO + NLL margin, no behaviour terms), for systems built without behaviour data."""


def tiny_adapter_cfg(kind: str, targets: list[str] | None = None, depth=(0.0, 1.0), **options) -> AdapterConfig:
    """A ``kind`` adapter over the tiny model's layers; ``options`` set the kind's own options."""
    cfg = AdapterConfig(kind=kind, targets=targets or TINY_ADAPTER_LAYERS.get(kind, LINEAR_LAYERS), depth=list(depth),
                        lora=LoraOptions(r=4, alpha=8.0))
    return dataclasses.replace(cfg, **{kind: dataclasses.replace(cfg.options, **options)})


def tiny_directions_cfg(**kw) -> DirectionsConfig:
    kw = {"candidates": ["model.layers.{N}"], "depth": [0.0, 1.0], "n_layers": 2, "batch_size": 8,
          "max_pairs": 0, **kw}
    return DirectionsConfig(**kw)


def tiny_config(tiny_dir: str, runs_dir, kind: str) -> dict:
    """A train.py config for the tiny model (2 steps, a 3-item evaluation)."""
    return {
        "model": {"name": tiny_dir, "dtype": "float32", "device": "cpu"},
        "data": {"max_pairs": 24},
        "directions": {"candidates": ["model.layers.{N}"], "depth": [0.0, 1.0], "n_layers": 2},
        "adapter": {"kind": kind, "targets": TINY_ADAPTER_LAYERS.get(kind, LINEAR_LAYERS), "depth": [0.0, 1.0]},
        "behaviour": {"max_prompts": 6, "openings": 2, "max_new_tokens": 6},
        "train": {"steps": 2, "val_every": 1, "batch_size": 4, "warmup": 0, "accelerator": "cpu"},
        "eval": {"coeffs": [-1.0, 0.0, 1.0], "max_items": 3, "neutral_items": 2, "n_boot": 50},
        "log": {"wandb": "disabled", "runs_dir": str(runs_dir), "name": f"tiny-{kind}"},
    }


def make_pairs(n: int, start: int = 0):
    return persona_pairs(builtin_suffixes()[start:start + n], TEMPLATE, POSITIVE, NEGATIVE)


def make_batch(tokenizer, n: int = 3, start: int = 0) -> dict[str, torch.Tensor]:
    """A real left-padded [pos; neg] batch of n pairs (2n rows)."""
    enc = encode_pairs(tokenizer, make_pairs(n, start), max_length=96)
    return PairCollator(tokenizer.pad_token_id)(enc)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def randomize(adapter, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter parameter a random non-zero value (LoRA's B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter.trainable_parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    # multiplicative factors (BOFT's s, RoAd's α) start at 1 and must stay positive: 1 + noise
    factors = [p for n, p in adapter.model.named_parameters() if n.split(".")[-2] in ("boft_s", "road_alpha")]
    for p in factors:
        p.add_(1.0)


def attach_random(model, kind: str, seed: int = 0, std: float = 0.05, **cfg):
    """Attach a ``kind`` adapter for the tiny model with random, non-identity parameters."""
    from adapters.tuners import attach

    model, adapter = attach(model, tiny_adapter_cfg(kind, **cfg))
    randomize(adapter, std=std, seed=seed)
    return model, adapter


def base_clone(model) -> dict[str, torch.Tensor]:
    """A copy of every base tensor under the base model's own names (peft prefixes removed)."""
    return {models.BaseChecksum._key(n): t.detach().clone() for n, t in models.base_tensors(model).items()}


def build_tiny(folder, tokenizer, seed: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2 tokenizer (converts the bundled GGUF once into the cache)."""
    from transformers import AutoTokenizer

    folder = models.resolve_source("bundled")
    return models.prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory, tokenizer) -> str:
    """Same architecture as tiny_dir, different random weights: a different base model."""
    return build_tiny(tmp_path_factory.mktemp("tiny-llama-other"), tokenizer, seed=1)


@pytest.fixture
def tiny(tiny_dir):
    """(model, tokenizer): a fresh frozen fp32 copy of the tiny random Llama."""
    return models.load_base(tiny_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_directions(tiny_dir):
    """Reference directions of the tiny model (16 train / 8 val pairs, all 4 residual layers)."""
    from adapters import directions as dirs

    model, tok = models.load_base(tiny_dir, dtype="float32", device="cpu")
    fp = models.base_fingerprint(model)
    return dirs.compute(model, tok, make_pairs(16), make_pairs(8, start=16), tiny_directions_cfg(),
                        max_length=96, fingerprint=fp)


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer): the bundled SmolLM2-135M-Instruct in fp32, loaded once."""
    return models.load_base("bundled", dtype="float32", device="cpu")


def read_wandb_records(path) -> list:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    framing (32 KiB blocks; each piece: crc32c, length, type FULL/FIRST/MIDDLE/LAST) around
    serialised ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero fill: the end of what was written
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out
