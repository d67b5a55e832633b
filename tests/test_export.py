"""Exports for serving: merged full models (every kind), peft folders, llama.cpp control vectors;
and merging as a check of the algebra (exact inverse where the kind has one)."""

from __future__ import annotations

import json

import pytest
import torch

from adapters import export, hidden
from adapters.models import base_fingerprint, load_base
from adapters.steer import steer
from adapters.tuners import KINDS, attach
from conftest import attach_random, logits, make_batch, randomize, tiny_adapter_cfg

ALL_KINDS = pytest.mark.parametrize("kind", sorted(KINDS))
EXACT_INVERSE = sorted(kind for kind, cls in KINDS.items() if cls.exact_inverse)


@pytest.fixture
def batch(tokenizer):
    return make_batch(tokenizer, n=2)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in hidden.base_model_of(model).state_dict().items()}


@ALL_KINDS
@pytest.mark.parametrize("c", [1.0, -0.7])
def test_merged_model_matches_steer(tiny, batch, kind, c):
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    merged = export.merged_model(model, c)
    assert not hasattr(merged, "peft_config") and "_contrastive_adapter" not in merged.__dict__
    with steer(model, c):
        want = logits(model, batch)
    got = logits(merged, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    with steer(model, 0.0):  # the source model is untouched by the export
        base = logits(model, batch)
    assert (got[real] - base[real]).abs().max() > 1e-3


@ALL_KINDS
def test_save_merged_reloads_with_transformers_alone(tiny, tokenizer, batch, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    fp = base_fingerprint(model)
    model, adapter = attach_random(model, kind)
    folder = export.save_merged(model, tokenizer, tmp_path / "merged", c=-1.0, fingerprint=fp)
    info = json.loads((folder / "contrastive_adapter.json").read_text())
    assert info["kind"] == kind and info["coefficient"] == -1.0 and info["base_fingerprint"] == fp
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with steer(model, -1.0):
        want = logits(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(reloaded, batch)[real], want[real], rtol=1e-4, atol=1e-4)
    # exporting again is refused without force, and with it replaces the earlier export atomically
    with pytest.raises(export.ExportError, match="already exists"):
        export.save_merged(model, tokenizer, folder, c=0.0)
    export.save_merged(model, tokenizer, folder, c=0.0, force=True)
    assert json.loads((folder / "contrastive_adapter.json").read_text())["coefficient"] == 0.0
    assert not list(tmp_path.glob(".merged*"))


@pytest.mark.parametrize("kind", EXACT_INVERSE)
def test_minus_c_exactly_inverts_plus_c_on_the_weights(tiny, kind):
    """f(c) then f(-c) applied to the weights gives the weights back."""
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    target = export.plain_copy(model)
    before = weights(target)
    adapter.merge_into(target, 0.8)
    moved = weights(target)
    adapter.merge_into(target, -0.8)
    after = weights(target)
    changed = [k for k in moved if k not in before or not torch.equal(before[k], moved[k])]
    assert changed, "merging at c = 0.8 changed nothing"
    for k in after:  # an additive merge adds biases: back to zero
        torch.testing.assert_close(after[k], before.get(k, torch.zeros_like(after[k])), rtol=0, atol=2e-6, msg=k)


def test_ether_is_a_first_order_mirror_only(tiny):
    """H(c)H(-c) = I - c²D²: not the identity, and the error shrinks as c²."""
    model, _ = tiny
    model, adapter = attach_random(model, "ether")
    name = adapter.targets[0]
    D = adapter.matrix(name, 1.0) - torch.eye(adapter.matrix(name, 1.0).shape[0])
    for c in (1.0, 0.1):
        Hp, Hm = adapter.matrix(name, c), adapter.matrix(name, -c)
        torch.testing.assert_close(Hp @ Hm, torch.eye(len(D)) - c * c * D @ D, rtol=0, atol=1e-5)
    err = [(adapter.matrix(name, c) @ adapter.matrix(name, -c) - torch.eye(len(D))).abs().max() for c in (1.0, 0.1)]
    assert err[0] > 1e-3
    assert err[1] / err[0] == pytest.approx(0.01, rel=1e-3)
    torch.testing.assert_close(adapter.matrix(name, 0.3), adapter.matrix(name, 0.3).T)  # symmetric


def test_lora_peft_folder_loads_in_vanilla_peft(tiny, tiny_dir, batch, tmp_path):
    from peft import PeftModel
    from peft.helpers import rescale_adapter_scale

    model, _ = tiny
    model, adapter = attach_random(model, "lora")
    folder = export.save_peft(model, tmp_path / "peft", base_name=tiny_dir)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    fresh, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    served = PeftModel.from_pretrained(fresh, folder)
    for c in (1.0, -1.0, 0.5):
        with steer(model, c):
            want = logits(model, batch)
        with rescale_adapter_scale(served, c):  # the coefficient is peft's scale
            got = logits(served, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["boft", "oft", "road"])
def test_other_peft_kinds_export_at_plus_one(tiny, tiny_dir, batch, tmp_path, kind):
    from peft import PeftModel

    model, _ = tiny
    model, adapter = attach_random(model, kind)
    folder = export.save_peft(model, tmp_path / "peft")
    fresh, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    served = PeftModel.from_pretrained(fresh, folder)
    with steer(model, 1.0):
        want = logits(model, batch)
    torch.testing.assert_close(logits(served, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["additive", "ether"])
def test_non_peft_kinds_refuse_peft_export(tiny, tmp_path, kind):
    model, _ = tiny
    model, _ = attach_random(model, kind)
    with pytest.raises(export.ExportError, match="not a peft adapter"):
        export.save_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_control_vector_gguf_round_trip(tiny, tmp_path):
    model, _ = tiny
    model, adapter = attach(model, tiny_adapter_cfg("additive", depth=[0.25, 1.0]))
    randomize(adapter, seed=5)
    path = export.save_control_vector(model, tmp_path / "honesty.gguf", c=-2.0)
    vectors, meta = export.read_control_vector(path)
    assert meta == {"arch": "controlvector", "model_hint": "llama", "layer_count": 3}
    assert sorted(vectors) == [1, 2, 3]  # direction.N = output of model.layers.N
    for n in adapter.targets:
        torch.testing.assert_close(vectors[hidden.layer_index(n)], -2.0 * adapter.vector(n).detach(), rtol=0, atol=0)


def test_control_vector_refusals(tiny, tmp_path):
    model, _ = tiny
    model, _ = attach(model, tiny_adapter_cfg("additive"))  # includes layer 0
    with pytest.raises(export.ExportError, match="layer 0"):
        export.save_control_vector(model, tmp_path / "a.gguf")
    fresh = load_base(hidden.base_model_of(model).name_or_path, dtype="float32", device="cpu")[0]
    fresh, _ = attach(fresh, tiny_adapter_cfg("additive", targets=["model.layers.{N}.mlp.down_proj"], depth=[0.5, 1.0]))
    with pytest.raises(export.ExportError, match="decoder-layer outputs"):
        export.save_control_vector(fresh, tmp_path / "b.gguf")
    other = load_base(hidden.base_model_of(model).name_or_path, dtype="float32", device="cpu")[0]
    other, _ = attach(other, tiny_adapter_cfg("lora"))
    with pytest.raises(export.ExportError, match="only additive"):
        export.save_control_vector(other, tmp_path / "c.gguf")
    assert not list(tmp_path.iterdir())


def test_peft_export_names_the_bundled_model_by_its_hub_id():
    """`export --format peft` writes base_model_name_or_path = hub_id(model.name): AutoPeftModel
    cannot load 'bundled'."""
    from adapters.models import hub_id

    assert hub_id("bundled") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("/models/llama") == "/models/llama" and hub_id("org/model") == "org/model"
