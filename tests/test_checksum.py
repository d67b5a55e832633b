"""Base-weights checksum (any change to any element is caught and named) and fingerprint."""

from __future__ import annotations

import pytest
import torch

from adapters.models import BaseChecksum, BaseModelChanged, base_fingerprint, load_base, tensor_checksum
from conftest import randomize, tiny_adapter_cfg
from adapters.tuners import attach


def plant(model, name: str, index=(0, 0), delta: float = 1e-3) -> None:
    """Add `delta` to one element of the named tensor, in place."""
    t = dict(model.named_parameters())[name]
    with torch.no_grad():
        t[index] += delta


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight",
                                  "model.layers.3.input_layernorm.weight", "lm_head.weight"])
def test_checksum_catches_one_element(tiny, name):
    model, _ = tiny
    checksum = BaseChecksum(model)
    checksum.verify(model)  # clean
    t = dict(model.named_parameters())[name]
    index = (5,) if t.dim() == 1 else (7, 3)
    plant(model, name, index)
    with pytest.raises(BaseModelChanged, match="changed: " + name.replace(".", r"\.")) as e:
        checksum.verify(model, "after planting")
    msg = str(e.value)
    assert "after planting" in msg
    named = msg.split("changed: ")[1].split(". Something")[0]
    assert named == name, f"only the planted tensor should be named: {msg}"


def test_checksum_catches_tiny_changes_and_swaps():
    t = torch.randn(1000)
    base = tensor_checksum(t)
    assert tensor_checksum(t.clone()) == base
    u = t.clone()
    u[17] = torch.nextafter(u[17], torch.tensor(float("inf")))  # one ulp
    assert tensor_checksum(u) != base
    w = t.clone()
    w[[2, 3, 600, 601]] = w[[600, 601, 2, 3]]  # 8-byte words 1 and 300 swap across chunks: same plain sum
    assert tensor_checksum(w)[0] == base[0]
    assert tensor_checksum(w) != base
    w = t.clone()  # word 1 (the first of 64 chunks of 7 words) and word 450 (in the 52-word tail) swap
    w[[2, 3, 900, 901]] = w[[900, 901, 2, 3]]
    assert tensor_checksum(w) != base
    z = t.clone()
    z[0] = -z[0]  # sign bit
    assert tensor_checksum(z) != base


def test_checksum_through_lora_wrapper(tiny):
    model, _ = tiny
    checksum = BaseChecksum(model)
    model, adapter = attach(model, tiny_adapter_cfg("lora"))
    randomize(adapter)  # adapter tensors are not base tensors: changing them is allowed
    checksum.verify(model, "after attaching LoRA")
    BaseChecksum(model).verify(model)  # a checksum taken on the peft model works too

    wrapped = "base_model.model.model.layers.2.self_attn.o_proj.base_layer.weight"
    assert wrapped in dict(model.named_parameters())
    plant(model, wrapped, (1, 1))
    with pytest.raises(BaseModelChanged, match=r"changed: model\.layers\.2\.self_attn\.o_proj\.weight"):
        checksum.verify(model)


def test_checksum_names_a_missing_tensor(tiny):
    model, _ = tiny
    checksum = BaseChecksum(model)
    del model.model.layers[3].mlp.up_proj.weight
    with pytest.raises(BaseModelChanged, match=r"missing: model\.layers\.3\.mlp\.up_proj\.weight"):
        checksum.verify(model)


def test_fingerprint_is_dtype_independent_and_model_specific(tiny_dir, other_tiny_dir):
    fp32, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    bf16, _ = load_base(tiny_dir, dtype="bfloat16", device="cpu")
    other, _ = load_base(other_tiny_dir, dtype="float32", device="cpu")
    assert bf16.dtype == torch.bfloat16
    assert base_fingerprint(fp32) == base_fingerprint(bf16)
    assert base_fingerprint(fp32) != base_fingerprint(other)
    # attaching an adapter does not change which base model this is
    before = base_fingerprint(fp32)
    wrapped, _ = attach(fp32, tiny_adapter_cfg("lora"))
    assert base_fingerprint(wrapped) == before


@pytest.mark.parametrize("bits", [4, 8])
def test_checksum_covers_quantized_weights_and_their_scales(tmp_path, bits):
    """bitsandbytes on CPU: a flipped bit in a packed weight, or in the scales bnb keeps beside
    it, is caught and named."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
         else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32)
    checksum = BaseChecksum(model)
    w = model.model.layers[0].mlp.up_proj.weight
    scale_name, scale = (("quant_state.absmax", w.quant_state.absmax) if bits == 4 else ("SCB", w.SCB))
    assert f"model.layers.0.mlp.up_proj.weight.{scale_name}" in checksum.sums
    with torch.no_grad():
        w.data.view(-1)[3] += 1  # one quantized element
    with pytest.raises(BaseModelChanged, match=r"changed: model.layers.0.mlp.up_proj.weight[;.]"):
        checksum.verify(model)
    with torch.no_grad():
        w.data.view(-1)[3] -= 1
        scale.view(-1)[0] = torch.nextafter(scale.view(-1)[0], scale.view(-1)[0] + 1)
    with pytest.raises(BaseModelChanged, match=rf"changed: model.layers.0.mlp.up_proj.weight.{scale_name}"):
        checksum.verify(model)
