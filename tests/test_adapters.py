"""The signed-coefficient contract, for every adapter kind in ``adapters.tuners.KINDS``.

1. c = 0 is bitwise the base model;  2. antisymmetric to first order;  3. steer() restores;
4. the coefficient is validated and can sit inside autograd;  5. save/load round-trips and
refuses a different base model.
"""

from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch

from adapters import hidden
from adapters.models import base_fingerprint, load_base
from adapters.run import RunError, load_adapter, save_adapter
from adapters.steer import CoefficientError, steer
from adapters.tuners import KINDS, attach
from adapters.tuners.base import ATTR
from conftest import attach_random, logits, make_batch, tiny_adapter_cfg

ALL_KINDS = pytest.mark.parametrize("kind", sorted(KINDS))


@pytest.fixture
def batch(tokenizer):
    return make_batch(tokenizer, n=3)


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@ALL_KINDS
def test_zero_is_bitwise_base(tiny, batch, kind):
    model, _ = tiny
    base = logits(model, batch)
    model, adapter = attach_random(model, kind)
    with steer(model, 0):
        z = logits(model, batch)
    with steer(model, 0.0):
        z2 = logits(model, batch)
    with steer(model, 1.0):
        one = logits(model, batch)
    assert torch.equal(z, base)
    assert torch.equal(z2, base)
    # the adapter is not trivial: c = 1 moves the logits
    assert (one - base).abs().max() > 1e-3


@ALL_KINDS
def test_first_order_antisymmetry(tiny, batch, kind):
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    real = batch["attention_mask"].bool()  # compare on real tokens, not left padding
    c = 1e-3
    with steer(model, 0.0):
        f0 = logits(model, batch)[real]
    with steer(model, c):
        fp = logits(model, batch)[real]
    with steer(model, -c):
        fm = logits(model, batch)[real]
    dp, dm = fp - f0, fm - f0
    assert dp.abs().max() > 1e-6  # the effect is measurable at this c
    rel = float((dp + dm).abs().max() / dp.abs().max())
    assert rel < 0.05, f"f(+c)-f(0) and f(-c)-f(0) are not mirror images to first order (rel {rel:.3g})"


def _additive_updates(model, adapter, batch, c):
    """Per adapted module: (output after the adapter's edit) - (output before it), at c."""
    layers = adapter.targets
    pre, handles = {}, []
    for n in layers:  # prepended: runs before the adapter's own hook (registered at attach)
        def save(_mod, _inp, out, n=n):
            pre[n] = hidden.output_tensor(out)

        handles.append(hidden.get_module(model, n).register_forward_hook(save, prepend=True))
    try:
        with steer(model, c), hidden.record(model, layers) as post:  # a later recording sees the edit
            logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: post[n] - pre[n] for n in layers}


def _lora_updates(model, adapter, x, c):
    """Per LoRA module: module(x) at c minus module(x) at 0, with the same input x."""
    out = {}
    for name in adapter.targets:
        mod = hidden.get_module(model, name)
        xi = x[: mod.in_features] if x.dim() == 1 else x[..., : mod.in_features]
        with steer(model, 0.0):
            y0 = mod(xi)
        with steer(model, c):
            yc = mod(xi)
        out[name] = (yc - y0, xi, mod)
    return out


def test_additive_exact_mirror(tiny, batch):
    model, _ = tiny
    model, adapter = attach_random(model, "additive")
    up = _additive_updates(model, adapter, batch, 1.0)
    down = _additive_updates(model, adapter, batch, -1.0)
    half = _additive_updates(model, adapter, batch, 0.5)
    for n in adapter.targets:
        w = adapter.vector(n).detach()
        # h <- h + c·w: the update is c·w at every position, exactly linear in c
        torch.testing.assert_close(up[n], w.expand_as(up[n]), rtol=0, atol=1e-6)
        torch.testing.assert_close(down[n], -up[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(half[n], 0.5 * up[n], rtol=0, atol=1e-6)


def test_lora_exact_mirror(tiny):
    model, _ = tiny
    model, adapter = attach_random(model, "lora")
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1))
    up = _lora_updates(model, adapter, x, 1.0)
    down = _lora_updates(model, adapter, x, -1.0)
    half = _lora_updates(model, adapter, x, 0.5)
    assert len(up) == 8  # o_proj + down_proj of 4 layers
    for name, (u, xi, mod) in up.items():
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        s = mod.scaling["default"]
        assert s == pytest.approx(8.0 / 4)  # alpha / r, restored after every steer block
        with torch.no_grad():
            expected = s * (xi @ A.T @ B.T)  # W + c·s·BA  ->  update = c·s·B A x
        torch.testing.assert_close(u, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down[name][0], -u, rtol=0, atol=1e-6)
        torch.testing.assert_close(half[name][0], 0.5 * u, rtol=1e-5, atol=1e-6)
        with steer(model, 0.0), torch.no_grad():  # c = 0: exactly the frozen Linear
            assert torch.equal(mod(xi), mod.base_layer(xi))


@ALL_KINDS
def test_steer_restores_after_block_and_exception(tiny, batch, kind):
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    before, hooks_before = logits(model, batch), n_hooks(model)
    with steer(model, -1.0):
        inside = logits(model, batch)
        assert n_hooks(model) >= hooks_before
    assert not torch.equal(inside, before)
    assert torch.equal(logits(model, batch), before)
    assert n_hooks(model) == hooks_before

    with pytest.raises(KeyError, match="boom"):
        with steer(model, 1.0):
            raise KeyError("boom")
    assert torch.equal(logits(model, batch), before)
    assert n_hooks(model) == hooks_before
    assert adapter.active is False
    if kind == "lora":
        assert all(m.scaling == {"default": 2.0} for m in adapter.lora_layers())
    with steer(model, 1.0):  # steer still works after the exception
        pass


@ALL_KINDS
def test_steer_cannot_nest(tiny, batch, kind):
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    with steer(model, 1.0):
        with pytest.raises(RuntimeError, match="nested"):
            with steer(model, -1.0):
                pass
        inner = logits(model, batch)
    with steer(model, 1.0):
        ref = logits(model, batch)
    assert torch.equal(inner, ref)  # the failed inner block did not disturb the outer one
    assert adapter.active is False


@ALL_KINDS
def test_threads_steer_one_model_independently(tiny, batch, kind):
    """steer is scoped to the thread that entered it: two threads whose blocks on one model
    are open at the same time (opposite coefficients) each get their own single-thread
    result, and a plain forward in a third thread meanwhile is the base model."""
    model, _ = tiny
    base = logits(model, batch)
    model, adapter = attach_random(model, kind)
    want = {None: base}
    for c in (1.0, -1.0):
        with steer(model, c):
            want[c] = logits(model, batch)
    together = threading.Barrier(3)
    got, errors = {c: [] for c in want}, []

    def run(c):
        try:
            with steer(model, c) if c is not None else contextlib.nullcontext():
                together.wait(timeout=60)  # every block is open before any forward runs
                for _ in range(4):
                    got[c].append(logits(model, batch))
        except BaseException as e:  # reported below: an assert in a thread would pass silently
            errors.append(e)
            together.abort()

    threads = [threading.Thread(target=run, args=(c,)) for c in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for c, outs in got.items():
        assert len(outs) == 4
        for out in outs:
            assert torch.equal(out, want[c]), f"c={c}: a thread saw another thread's coefficient"
    assert adapter.active is False
    assert torch.equal(logits(model, batch), base)


@ALL_KINDS
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1", True, False, None,
                                 torch.tensor(math.nan), torch.tensor([1.0, math.inf]),
                                 torch.ones(2, 2), 1e4, -1e300, torch.tensor([1.0, -2e3]), torch.tensor([])], ids=repr)
def test_bad_coefficients_raise(tiny, batch, kind, bad):
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    with pytest.raises(CoefficientError):
        with steer(model, bad):
            pass
    assert adapter.active is False
    with steer(model, 0):
        pass


@ALL_KINDS
def test_coefficient_inside_autograd(tiny, batch, kind):
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    real = batch["attention_mask"].bool()
    c = torch.tensor(-1.0, requires_grad=True)
    with steer(model, c):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = out[real].pow(2).mean()
    loss.backward()
    assert c.grad is not None and torch.isfinite(c.grad) and c.grad.abs() > 0
    params = adapter.trainable_parameters()
    assert params
    for p in params:
        assert p.grad is not None and p.grad.abs().max() > 0
    for n, p in model.named_parameters():
        if not any(p is q for q in params):
            assert p.grad is None, f"base parameter {n} received a gradient"

    # the same tensor coefficient gives the same function as the float
    with steer(model, -1.0):
        ref = logits(model, batch)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)


@ALL_KINDS
def test_zero_tensor_coefficient_with_grad(tiny, batch, kind):
    """c = 0 as a tensor that requires grad stays in the graph and still computes the base."""
    model, _ = tiny
    base = logits(model, batch)
    model, adapter = attach_random(model, kind)
    c = torch.tensor(0.0, requires_grad=True)
    with steer(model, c):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out[batch["attention_mask"].bool()].pow(2).mean().backward()
    assert c.grad is not None and c.grad.abs() > 0
    torch.testing.assert_close(out.detach(), base, rtol=0, atol=1e-6)


@ALL_KINDS
def test_per_example_coefficients(tiny, batch, kind):
    """A 1-d coefficient applies one value per batch row, where the kind allows it; elsewhere
    mixed values are refused and equal values mean that one value."""
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    cs = [1.0, -1.0, 0.5, -0.5, 2.0, 0.0]
    if not adapter.per_example:
        with pytest.raises(CoefficientError, match="one coefficient per forward"):
            with steer(model, torch.tensor(cs)):
                pass
        assert adapter.active is False
        cs = [-0.5] * 6
    with steer(model, torch.tensor(cs)):
        mixed = logits(model, batch)
    for i, c in enumerate(cs):
        with steer(model, c):
            ref = logits(model, batch)[i]
        torch.testing.assert_close(mixed[i], ref, rtol=1e-5, atol=1e-5, msg=f"row {i} (c={c})")
    with steer(model, torch.tensor([int(c * 2) for c in cs])):  # integers: the same numbers
        ints = logits(model, batch)
    with steer(model, torch.tensor([float(int(c * 2)) for c in cs])):
        torch.testing.assert_close(ints, logits(model, batch), rtol=0, atol=0)
    if adapter.per_example:
        with pytest.raises(CoefficientError, match=f"{len(cs) - 1} per-example coefficients for a batch of {len(cs)} "):
            with steer(model, torch.tensor(cs[:-1])):
                logits(model, batch)


@ALL_KINDS
def test_save_load_round_trip(tiny, tiny_dir, batch, tmp_path, kind):
    model, _ = tiny
    fp = base_fingerprint(model)
    model, adapter = attach_random(model, kind, seed=3)
    with steer(model, 1.0):
        want = logits(model, batch)
    path = save_adapter(tmp_path, adapter, fp)
    assert path.is_file()

    fresh, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    base = logits(fresh, batch)
    fresh, loaded = load_adapter(fresh, path)
    assert loaded.kind == kind
    assert torch.equal(logits(fresh, batch), base)  # loaded, but outside steer: the base model
    with steer(fresh, 1.0):
        got = logits(fresh, batch)
    assert torch.equal(got, want)
    saved, reloaded = adapter.state_tensors(), loaded.state_tensors()
    assert saved.keys() == reloaded.keys()
    for k in saved:
        assert torch.equal(saved[k], reloaded[k]), k


@ALL_KINDS
def test_load_onto_other_base_refused(tiny, other_tiny_dir, tmp_path, kind):
    model, _ = tiny
    fp = base_fingerprint(model)
    model, adapter = attach_random(model, kind)
    path = save_adapter(tmp_path, adapter, fp)
    other, _ = load_base(other_tiny_dir, dtype="float32", device="cpu")
    assert base_fingerprint(other) != fp
    with pytest.raises(RunError, match="fingerprint"):
        load_adapter(other, path)


@ALL_KINDS
def test_load_onto_a_base_with_other_layer_weights_refused(tiny, tiny_dir, tmp_path, kind):
    """A base with the same config, embeddings and norms (what the fingerprint samples) but one
    changed attention or MLP weight, as a fine-tune of the same model would be, is refused; a
    bf16 load of the very same base is accepted (the digest is dtype-independent)."""
    model, _ = tiny
    fp = base_fingerprint(model)
    model, adapter = attach_random(model, kind)
    path = save_adapter(tmp_path, adapter, fp)
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        tuned, _ = load_base(tiny_dir, dtype="float32", device="cpu")
        with torch.no_grad():
            tuned.get_parameter(name)[0, 0] += 0.5
        assert base_fingerprint(tuned) == fp  # the sample fingerprint alone would let it through
        with pytest.raises(RunError, match=f"other base weights: 1 base tensors differ \\({name}\\)"):
            load_adapter(tuned, path)
    same_bf16, _ = load_base(tiny_dir, dtype="bfloat16", device="cpu")
    _, loaded = load_adapter(same_bf16, path)
    assert loaded.kind == kind


def test_additive_init_from_directions_saves_and_loads(tiny, tiny_dir, tiny_directions, batch, tmp_path):
    model, _ = tiny
    d = tiny_directions
    model, adapter = attach(model, tiny_adapter_cfg("additive", init="directions"), d)
    for n in adapter.targets:  # starts at the PCA steering vector v_l · s_l
        torch.testing.assert_close(adapter.vector(n).detach(), d.v(n) * d.scale[n])
    with steer(model, 1.0):
        want = logits(model, batch)
    path = save_adapter(tmp_path, adapter, d.fingerprint)
    fresh, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    fresh, loaded = load_adapter(fresh, path)  # no directions needed to load
    assert loaded.config.additive.init == "directions"
    with steer(fresh, 1.0):
        assert torch.equal(logits(fresh, batch), want)


def test_steer_needs_an_adapter(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="no contrastive adapter"):
        with steer(model, 1.0):
            pass


@ALL_KINDS
def test_outside_steer_is_the_base_model(tiny, batch, kind):
    """Attaching (and loading) never changes what the model computes outside a steer block."""
    model, _ = tiny
    base = logits(model, batch)
    model, adapter = attach_random(model, kind)
    assert torch.equal(logits(model, batch), base)
    with steer(model, 1.0):
        pass
    assert torch.equal(logits(model, batch), base)


@ALL_KINDS
def test_detach_leaves_the_plain_base(tiny, batch, kind):
    """After ``detach`` (and ``unload`` for a peft kind) no hook or reference of the adapter is
    left: the model is the plain base, and steer finds no adapter on it."""
    model, _ = tiny
    base, hooks = logits(model, batch), n_hooks(model)
    model, adapter = attach_random(model, kind)
    adapter.detach()
    plain = model.unload() if hasattr(model, "get_base_model") else model
    assert n_hooks(plain) == hooks
    assert not any(ATTR in m.__dict__ for m in plain.modules())
    assert torch.equal(logits(plain, batch), base)
    with pytest.raises(ValueError, match="no contrastive adapter"):
        with steer(plain, 1.0):
            pass


@ALL_KINDS
@pytest.mark.parametrize("c", [-4.0, 4.0])
def test_outputs_stay_finite_at_large_coefficients(tiny, batch, kind, c):
    model, _ = tiny
    model, adapter = attach_random(model, kind, std=0.2)
    with steer(model, c):
        out = logits(model, batch)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["lora", "boft", "oft", "road"])
def test_plus_one_is_peft_unchanged(tiny, batch, kind):
    """c = +1 computes exactly peft's own adapter (our coefficient only rescales its parameters)."""
    model, _ = tiny
    model, adapter = attach_random(model, kind)
    with steer(model, 1.0):
        ours = logits(model, batch)
    adapter._set_enabled(True)  # peft's forward with no coefficient machinery at all
    try:
        theirs = logits(model, batch)
    finally:
        adapter._set_enabled(False)
    assert torch.equal(ours, theirs)
