"""Scale and speed options on the tiny random Llama, on CPU: bitsandbytes 4-bit / 8-bit bases
(model.quantization), Lightning precision (train.precision) and gradient checkpointing
(train.gradient_checkpointing).

On a quantized base every supported kind must keep the contract: c = 0 is bitwise the
quantized base, c = ±1 moves the output, training reaches every adapter parameter, the base
(packed weights and their bnb scales) never changes, and the adapter saves and loads back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from adapters import hidden
from adapters.config import PRECISIONS, QUANTIZED_KINDS, ConfigError, TrainConfig, config_from_dict
from adapters.io import load_tensors
from adapters.models import BaseChecksum, base_fingerprint, enable_gradient_checkpointing, load_base
from adapters.steer import steer
from adapters.tuners import KINDS
from adapters.tuners.base import ATTR
from adapters import pipeline
from conftest import REPRPO_LOSS, attach_random, logits, make_batch, tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUANTIZATIONS = ["4bit", "8bit"]
# RoAd pairs outputs in groups (default 64) and OFT rotates input blocks (default 32): both fit
# the tiny model's o_proj / down_proj; these smaller values fit every Linear of it.
SMALL = {"oft": {"block_size": 16}, "road": {"group_size": 16}}
IDENTITY_INIT = {"lora": "lora_B", "oft": "oft_R", "road": "road_theta", "additive": "additive_vectors"}
"""The tensor of each kind that starts at zero (the identity) and must move in training."""


def train_main(argv):
    return pipeline.main(argv)


def run_train(tiny_dir, tmp_path, kind, model=None, train=None, name=None) -> Path:
    """train.py on the tiny model: 2 steps, a validation after each (checksum verified), no eval."""
    cfg = tiny_config(tiny_dir, tmp_path / "runs", kind)
    cfg["model"].update(model or {})
    cfg["train"].update({"threads": 1, **(train or {})})
    cfg["eval"]["enabled"] = False
    cfg["log"]["name"] = name or f"q-{kind}"
    path = tmp_path / f"{cfg['log']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Path(train_main(["--config", str(path)]))


def qload(tiny_dir, quantization, dtype="float32"):
    return load_base(tiny_dir, dtype=dtype, device="cpu", quantization=quantization)


def forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_load_base_quantizes_the_decoder_linears(tiny_dir, quantization):
    import bitsandbytes as bnb

    model, _ = qload(tiny_dir, quantization)
    layer_cls = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in linears.items() if isinstance(m, layer_cls)}
    assert quantized == set(linears) - {"lm_head"}, "every decoder Linear, not the output head"
    w = model.model.layers[0].mlp.down_proj.weight
    if quantization == "4bit":
        assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # NF4, double quantization
        assert model.model.layers[0].mlp.down_proj.compute_dtype == torch.float32  # = model.dtype
    else:
        assert w.dtype == torch.int8
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # the fingerprint says which model this is, whatever its storage: a quantized run's adapter
    # is accepted by the full-precision base (QLoRA practice) and vice versa
    full, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    assert base_fingerprint(model) == base_fingerprint(full)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_forward_passes_leave_the_quantized_base_intact(tiny_dir, tokenizer, quantization):
    """bnb rewrites its own tensors in forward unless settled at load: 8-bit moves CB/SCB into
    layer.state on the first call; 4-bit on an AVX512-BF16 CPU repacks the weight in an eval,
    no-grad call and then returns no input gradient. Neither may happen."""
    model, _ = qload(tiny_dir, quantization)
    checksum = BaseChecksum(model)
    batch = make_batch(tokenizer, 2)
    with torch.no_grad():
        first = forward(model, batch)  # eval mode, no grad
    checksum.verify(model, "after an eval forward")
    assert torch.equal(forward(model, batch).detach(), first)
    # a gradient still reaches the input through every quantized layer
    model.train()
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits.float().pow(2).mean().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    model.eval()
    checksum.verify(model, "after a training forward and backward")


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_kind_on_a_quantized_base(tiny_dir, tokenizer, kind, quantization):
    model, _ = qload(tiny_dir, quantization)
    checksum = BaseChecksum(model)
    batch = make_batch(tokenizer, 2)
    base = logits(model, batch)
    model, adapter = attach_random(model, kind, **SMALL.get(kind, {}))
    with steer(model, 0.0):
        assert torch.equal(logits(model, batch), base), "c = 0 must be bitwise the quantized base"
    for c in (1.0, -1.0):
        with steer(model, c):
            moved = logits(model, batch)
        assert moved.dtype == base.dtype
        assert (moved - base).abs().max() > 1e-3, f"c = {c} does not move the output"
    model.train()  # training mode, as in fit
    with steer(model, -1.0):
        forward(model, batch).float().pow(2).mean().backward()
    params = adapter.trainable_parameters()
    no_grad = [i for i, p in enumerate(params) if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{len(no_grad)} of {len(params)} {kind} parameters got no gradient"
    own = {id(p) for p in params}
    assert not [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in own]
    model.eval()
    checksum.verify(model, f"{kind} on {quantization}")


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_road_keeps_the_dtype_on_a_bf16_quantized_base(tiny_dir, tokenizer, quantization):
    """peft 0.21.2's RoAd bnb layers return float32 for a bf16 input (they cast x, not the
    result, back); attach fixes the output dtype, else the bf16 output head fails at c != 0."""
    model, _ = qload(tiny_dir, quantization, dtype="bfloat16")
    batch = make_batch(tokenizer, 2)
    base = logits(model, batch)
    model, adapter = attach_random(model, "road", **SMALL["road"])
    with steer(model, 1.0):
        out = logits(model, batch)
    assert out.dtype == torch.bfloat16 and (out.float() - base.float()).abs().max() > 0
    with steer(model, 0.0):
        assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_train_py_on_a_quantized_base(tiny_dir, tokenizer, tmp_path, kind, quantization):
    """The real entry point: 2 steps with a validation after each; train.py verifies the base
    checksum at fit start, after each validation, at fit end and around saving."""
    run_dir = run_train(tiny_dir, tmp_path, kind, model={"quantization": quantization})
    saved, meta = load_tensors(run_dir / "adapter.safetensors")
    assert meta["kind"] == kind
    moved = [k for k, t in saved.items() if IDENTITY_INIT[kind] in k and t.abs().sum() > 0]
    assert moved, "training left the adapter at its initial (identity) value"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["quantization"] == quantization

    # load it back onto a freshly quantized base: the same tensors, the same contract
    from adapters.run import load_adapter

    model, _ = qload(tiny_dir, quantization)
    checksum = BaseChecksum(model)
    batch = make_batch(tokenizer, 2)
    base = logits(model, batch)
    model, adapter = load_adapter(model, run_dir / "adapter.safetensors")
    for k, t in adapter.state_tensors().items():
        assert torch.equal(t.detach().cpu(), saved[k]), k
    with steer(model, 0.0):
        assert torch.equal(logits(model, batch), base)
    with steer(model, 1.0):
        plus = logits(model, batch)
    with steer(model, -1.0):
        minus = logits(model, batch)
    assert (plus - base).abs().max() > 0 and (minus - base).abs().max() > 0
    checksum.verify(model, "after loading the trained adapter")


def test_load_run_uses_the_runs_quantization(tiny_dir, tmp_path):
    import bitsandbytes as bnb

    from adapters.pipeline import load_run

    run_dir = run_train(tiny_dir, tmp_path, "lora", model={"quantization": "4bit"}, name="q-load-run")
    model, _ = load_run(run_dir, device="cpu")
    assert isinstance(hidden.get_module(model, "model.layers.0.mlp.up_proj"), bnb.nn.Linear4bit)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(QUANTIZED_KINDS)))
def test_config_refuses_other_kinds_on_a_quantized_base(kind, quantization):
    assert kind in ("boft", "ether")
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"quantization": quantization}, "adapter": {"kind": kind}})
    msg = str(e.value)
    assert f"adapter.kind={kind!r}" in msg and "quantized" in msg
    assert all(repr(k) in msg for k in QUANTIZED_KINDS), "the error names the kinds that work"
    config_from_dict({"model": {"quantization": "none"}, "adapter": {"kind": kind}})  # fine unquantized


@pytest.mark.parametrize("data,match", [
    ({"model": {"quantization": "3bit"}}, "model.quantization='3bit' is not valid"),
    ({"train": {"precision": "64-true"}}, "train.precision='64-true' is not valid"),
    ({"train": {"precision": "bf16-true"}}, "inv_freq"),
    ({"train": {"precision": "bf16-mixed"}, "model": {"dtype": "bfloat16"}}, "needs model.dtype=float32"),
    ({"train": {"precision": "bf16-mixed"}}, "not 'auto'"),
    ({"train": {"precision": "16-mixed"}, "model": {"dtype": "float32", "device": "cpu"}}, "needs a GPU"),
    ({"train": {"gradient_checkpointing": "sometimes"}}, "true/false"),
])
def test_bad_scale_options_raise(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_scale_option_defaults_keep_the_previous_behaviour():
    import lightning as L

    cfg = config_from_dict({})
    assert cfg.model.quantization == "none" and cfg.train.gradient_checkpointing is False
    assert cfg.train.precision == "32-true" and cfg.train.precision in PRECISIONS
    before = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False)  # the Trainer as train.py built it before
    now = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, precision=cfg.train.precision)
    assert now.precision == before.precision == "32-true"
    assert type(now.precision_plugin) is type(before.precision_plugin)
    cfg = config_from_dict({"model": {"quantization": "8bit", "dtype": "float32"}, "adapter": {"kind": "road"},
                            "train": {"precision": "bf16-mixed", "gradient_checkpointing": True}})
    assert cfg.train.gradient_checkpointing is True


# --------------------------------------------------------------------------- precision


def test_train_py_bf16_mixed(tiny_dir, tmp_path):
    """bf16 autocast over the float32 tiny model (Lightning's MixedPrecision, on CPU too)."""
    run_dir = run_train(tiny_dir, tmp_path, "lora", train={"precision": "bf16-mixed"}, name="bf16-mixed")
    saved, _ = load_tensors(run_dir / "adapter.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


# --------------------------------------------------------------------------- gradient checkpointing


def _step(tiny_dir, tiny_directions, tokenizer, kind, checkpointing, quantization="none"):
    """One training step's loss and adapter gradients, through ContrastiveModule.step_terms:
    forward inside steer(model, c), backward() after the block has exited (as in fit)."""
    from adapters.module import ContrastiveModule

    model, _ = load_base(tiny_dir, dtype="float32", device="cpu", quantization=quantization)
    if checkpointing:
        enable_gradient_checkpointing(model)
    layers = (["model.layers.{N}", "model.layers.{N}.self_attn.o_proj"] if kind == "additive"
              else ["model.layers.{N}.self_attn.o_proj", "model.layers.{N}.mlp.down_proj"])
    model, adapter = attach_random(model, kind, targets=layers, std=0.2)
    system = ContrastiveModule(model, adapter, tiny_directions, REPRPO_LOSS, TrainConfig(), BaseChecksum(model))
    system.train()
    terms = system.step_terms(make_batch(tokenizer, 3))
    terms["loss"].backward()
    return model, terms["loss"].detach(), [p.grad.clone() for p in adapter.trainable_parameters()]


@pytest.mark.parametrize("kind", ["lora", "additive"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dir, tiny_directions, tokenizer, kind):
    _, loss, grads = _step(tiny_dir, tiny_directions, tokenizer, kind, checkpointing=False)
    model, loss_ckpt, grads_ckpt = _step(tiny_dir, tiny_directions, tokenizer, kind, checkpointing=True)
    decoder = hidden.base_model_of(model).model.layers
    assert all(layer.gradient_checkpointing for layer in decoder)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_recomputes_at_the_coefficient(tiny_dir, tiny_directions, tokenizer):
    """Without the replay of c the recompute runs the base model: torch sees the mismatch
    (PEFT_NOTES.md §3). So the layers really are recomputed, and the replay is what fixes it."""
    from torch.utils.checkpoint import CheckpointError

    from adapters.module import ContrastiveModule

    model, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    enable_gradient_checkpointing(model)
    model, adapter = attach_random(model, "lora")
    hidden.base_model_of(model).__dict__.pop(ATTR)  # forget the adapter: no replay
    system = ContrastiveModule(model, adapter, tiny_directions, REPRPO_LOSS, TrainConfig(), BaseChecksum(model))
    system.train()
    with pytest.raises(CheckpointError):
        system.step_terms(make_batch(tokenizer, 3))["loss"].backward()


def test_gradient_checkpointing_on_a_4bit_base(tiny_dir, tiny_directions, tokenizer):
    _, loss, grads = _step(tiny_dir, tiny_directions, tokenizer, "lora", False, quantization="4bit")
    _, loss_ckpt, grads_ckpt = _step(tiny_dir, tiny_directions, tokenizer, "lora", True, quantization="4bit")
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-4, atol=1e-7)


def test_train_py_qlora_recipe(tiny_dir, tmp_path):
    """4-bit base computing in bf16, LoRA, gradient checkpointing, 32-true: the
    configs/models/*.yaml setup, through train.py."""
    run_dir = run_train(tiny_dir, tmp_path, "lora", model={"quantization": "4bit", "dtype": "bfloat16"},
                        train={"gradient_checkpointing": True}, name="qlora")
    saved, _ = load_tensors(run_dir / "adapter.safetensors")
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
