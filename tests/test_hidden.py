"""Layer patterns and the one hook context manager."""

from __future__ import annotations

import pytest
import torch

from adapters import hidden
from adapters.hidden import LayerError
from adapters.tuners import attach
from conftest import logits, make_batch, tiny_adapter_cfg


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("depth,layers", [([0.0, 1.0], [0, 1, 2, 3]), ([0.5, 1.0], [2, 3]),
                                          ([0.25, 0.5], [1]), ([0.0, 0.1], [0])])
def test_resolve_expands_within_depth(tiny, depth, layers):
    model, _ = tiny
    got = hidden.resolve(model, ["model.layers.{N}.mlp.down_proj"], depth)
    assert got == [f"model.layers.{i}.mlp.down_proj" for i in layers]


def test_resolve_orders_by_layer_and_deduplicates(tiny):
    model, _ = tiny
    got = hidden.resolve(model, ["model.layers.{N}.self_attn.o_proj", "model.layers.{N}", "model.layers.3",
                                 "model.norm"], [0.5, 1.0])
    assert got == ["model.norm", "model.layers.2", "model.layers.2.self_attn.o_proj", "model.layers.3",
                   "model.layers.3.self_attn.o_proj"]


def test_unknown_pattern_lists_valid_patterns(tiny):
    model, _ = tiny
    with pytest.raises(LayerError) as e:
        hidden.resolve(model, ["model.layers.{N}.mlp.down"], [0.0, 1.0])
    msg = str(e.value)
    assert "'model.layers.{N}.mlp.down'" in msg
    for valid in ("model.layers.{N}", "model.layers.{N}.mlp.down_proj", "model.layers.{N}.self_attn.o_proj"):
        assert valid in msg
    with pytest.raises(LayerError, match="does not exist"):
        hidden.get_module(model, "model.layers.9")


def test_resolve_sees_through_peft(tiny):
    model, _ = tiny
    before = hidden.resolve(model, ["model.layers.{N}.mlp.down_proj"], [0.0, 1.0])
    wrapped, _ = attach(model, tiny_adapter_cfg("lora"))
    assert hidden.resolve(wrapped, ["model.layers.{N}.mlp.down_proj"], [0.0, 1.0]) == before
    assert hidden.num_layers(wrapped) == 4


def test_layer_index():
    assert hidden.layer_index("model.layers.12.mlp.down_proj") == 12
    assert hidden.layer_index("transformer.h.3") == 3
    assert hidden.layer_index("lm_head") == -1


def test_output_dim(tiny):
    model, _ = tiny
    assert hidden.output_dim(model, "model.layers.1") == 64
    assert hidden.output_dim(model, "model.layers.1.mlp.up_proj") == 128
    assert hidden.output_dim(model, "model.layers.1.self_attn.k_proj") == 32  # 2 kv heads x 16


def test_record_collects_hidden_states(tiny, tokenizer):
    model, _ = tiny
    batch = make_batch(tokenizer, n=2)
    names = ["model.layers.0", "model.layers.3.mlp.up_proj"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True)
    hooks_before = n_hooks(model)  # transformers keeps hooks of its own for output_hidden_states
    with torch.no_grad(), hidden.record(model, names) as hs:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert n_hooks(model) == hooks_before + 2
    B, T = batch["input_ids"].shape
    assert hs["model.layers.0"].shape == (B, T, 64)
    assert hs["model.layers.3.mlp.up_proj"].shape == (B, T, 128)
    # the output of decoder layer 0 is hidden_states[1]
    assert torch.equal(hs["model.layers.0"], out.hidden_states[1])
    assert n_hooks(model) == hooks_before


def test_hook_replaces_output_and_is_removed(tiny, tokenizer):
    model, _ = tiny
    batch = make_batch(tokenizer, n=2)
    base = logits(model, batch)
    with hidden.hooks(model, {"model.layers.1": lambda h: h * 0}):
        zeroed = logits(model, batch)
    with hidden.hooks(model, {"model.layers.1": lambda h: None}):  # None keeps the output
        same = logits(model, batch)
    assert not torch.equal(zeroed, base)
    assert torch.equal(same, base)
    assert torch.equal(logits(model, batch), base)
    assert n_hooks(model) == 0


def test_hooks_removed_after_exception(tiny, tokenizer):
    model, _ = tiny
    batch = make_batch(tokenizer, n=2)
    base = logits(model, batch)

    def bad(h):
        raise ArithmeticError("inside the hook")

    with pytest.raises(ArithmeticError):
        with hidden.hooks(model, {"model.layers.0": lambda h: h + 1, "model.layers.2": bad}):
            logits(model, batch)
    assert n_hooks(model) == 0
    with pytest.raises(ZeroDivisionError):
        with hidden.hooks(model, {"model.layers.0": lambda h: h + 1}):
            1 / 0
    assert n_hooks(model) == 0
    # registration failing half way (second name unknown) leaves nothing behind either
    with pytest.raises(LayerError):
        with hidden.hooks(model, {"model.layers.0": lambda h: h + 1, "model.layers.99": lambda h: h}):
            pass
    assert n_hooks(model) == 0
    assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("kind", ["lora", "additive"])
def test_shared_prefix_equals_the_full_forward_and_runs_the_prefix_once_per_item(tiny, kind):
    """Each item at three coefficients (item-major rows, left padding): layers below the adapter's
    first layer run on one row per item, and the logits equal the unshared pass's (fp32)."""
    from conftest import attach_random

    from adapters.steer import steer

    model, tok = tiny
    model, adapter = attach_random(model, kind, std=0.3, depth=[0.5, 1.0])
    first = hidden.first_layer(adapter.steered_modules())
    assert first == 2  # the upper half of the 4-layer model
    batch = make_batch(tok, 2)  # 4 rows of different lengths
    ids, attn = (batch[k].repeat_interleave(3, 0) for k in ("input_ids", "attention_mask"))
    c = torch.tensor([-1.0, 0.0, 2.0]).repeat(4)
    seen = []
    layers = hidden.decoder_layers(model)
    own = sum(len(m._forward_pre_hooks) for m in layers)  # the adapter's (additive: on its layers)
    handles = [layers[i].input_layernorm.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].shape[0])))
               for i in (0, first - 1, first, 3)]
    try:
        with torch.no_grad(), steer(model, c):
            full = model(input_ids=ids, attention_mask=attn).logits
            seen.clear()
            with hidden.shared_prefix(model, first, 3):
                shared = model(input_ids=ids, attention_mask=attn).logits
    finally:
        for h in handles:
            h.remove()
    assert seen == [(0, 4), (first - 1, 4), (first, 12), (3, 12)]
    assert torch.allclose(shared, full, atol=1e-5), (shared - full).abs().max()
    with pytest.raises(ValueError, match="does not divide into runs of 5"):
        with torch.no_grad(), hidden.shared_prefix(model, first, 5):
            model(input_ids=ids, attention_mask=attn)
    assert sum(len(m._forward_pre_hooks) for m in layers) == own  # removed, also after the error


def test_first_layer_follows_the_modules():
    assert hidden.first_layer(["model.layers.7.mlp.down_proj", "model.layers.3.self_attn.o_proj"]) == 3
    assert hidden.first_layer(["model.layers.2", "model.norm"]) == 0  # outside the layers: nothing shared
    assert hidden.first_layer([]) == 0
