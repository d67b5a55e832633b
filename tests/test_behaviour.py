"""Behaviour terms: the preference and distillation terms reverse under c -> -c, the
distillation target at c = 0 is the base distribution, every term is neutral at init, the
completions cache is keyed by model, prompts and settings, user completions are used as given,
and the linear projection target and the shift-within-budget metric compute what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters import behaviour as bh
from adapters import hidden
from adapters.config import BehaviourConfig, DataConfig, LossConfig, TrainConfig
from adapters.data import PairsError, load_pairs
from adapters.evaluate.metrics import shift_within, summarize
from adapters.loss import (distill_target, distill_terms, kl_barrier, preference_terms, project, projection_terms,
                           support_logprobs)
from adapters.steer import steer
from conftest import make_pairs


def teacher_logprobs(R=3, K=4, S=5, V=11, seed=0):
    """Hand-made teacher: full log-probs (3, R, K, V), their support (R, K, S) and rest (3, R, K)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(3, R, K, V, generator=g) * 2, -1)
    idx, lp, rest = bh._support_and_rest(full.permute(1, 2, 0, 3).reshape(R * K, 3, V).transpose(0, 1), S)
    return full, idx.view(R, K, S), lp.view(3, R, K, S), rest.view(3, R, K)


def test_preference_reverses_under_sign_flip():
    g = torch.Generator().manual_seed(1)
    lp_h, lp_d, ref_h, ref_d = (torch.randn(5, generator=g) * 3 for _ in range(4))
    c = torch.tensor([0.5, 1.0, 1.5, 2.0, 1.0])
    up = preference_terms(lp_h, lp_d, ref_h, ref_d, c, 0.1, 1.0)
    down = preference_terms(lp_d, lp_h, ref_d, ref_h, -c, 0.1, 1.0)  # -c with the completions' roles swapped
    assert torch.allclose(up["pref"], down["pref"])
    # and the same completions at -c ask for the opposite: their loss is not the same
    assert not torch.allclose(preference_terms(lp_h, lp_d, ref_h, ref_d, -c, 0.1, 1.0)["pref"], up["pref"])


def test_preference_at_zero_delta_is_the_margin():
    x = torch.randn(4)
    c = torch.tensor([0.5, -1.0, 2.0, -1.5])
    t = preference_terms(x, x + 1, x, x + 1, c, 0.1, 1.0)  # Δ = 0: the adapter is the reference
    assert t["pref"].item() == pytest.approx(float(-F.logsigmoid(-0.1 * c.abs()).mean()), abs=1e-6)


def test_distillation_target_at_zero_is_the_base_distribution():
    full, idx, lp, rest = teacher_logprobs()
    t0 = distill_target(lp, rest, torch.zeros(3))
    base = torch.cat([lp[0], rest[0].unsqueeze(-1)], -1)
    assert torch.allclose(t0, base, atol=1e-6)
    assert torch.allclose(t0.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    # the base model itself as the student: zero loss
    student = support_logprobs(full[0].gather(-1, idx))
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert distill_terms(student, t0, mask)["distill"].item() == pytest.approx(0.0, abs=1e-5)


def test_distillation_target_is_linear_in_c_and_reverses():
    full, idx, lp, rest = teacher_logprobs()
    z = torch.cat([lp, rest.unsqueeze(-1)], -1)
    up, down = distill_target(lp, rest, torch.full((3,), 1.0)), distill_target(lp, rest, torch.full((3,), -1.0))
    assert torch.allclose(up, torch.log_softmax(z[1], -1), atol=1e-6)  # c = +1: the positive persona
    assert torch.allclose(down, torch.log_softmax(z[2], -1), atol=1e-6)  # c = -1: the negative persona
    half = distill_target(lp, rest, torch.full((3,), 0.5))
    assert torch.allclose(half, torch.log_softmax(z[0] + 0.5 * (z[1] - z[0]), -1), atol=1e-6)
    # swapping the two personas' teachers maps the target at c onto the target at -c
    swapped_lp, swapped_rest = lp[[0, 2, 1]], rest[[0, 2, 1]]
    assert torch.allclose(distill_target(swapped_lp, swapped_rest, torch.full((3,), -1.5)),
                          distill_target(lp, rest, torch.full((3,), 1.5)), atol=1e-6)


def test_contrast_distillation_target_moves_along_the_persona_difference():
    """distill_target = contrast: z_0 + (c/2)(z_pos - z_neg); the base at c = 0, the same move with
    the sign flipped at -c (exactly the target at +c with the personas swapped)."""
    full, idx, lp, rest = teacher_logprobs()
    z = torch.cat([lp, rest.unsqueeze(-1)], -1)
    c = torch.tensor([1.0, -2.0, 0.5])
    got = distill_target(lp, rest, c, "contrast")
    assert torch.allclose(got, torch.log_softmax(z[0] + c.view(-1, 1, 1) / 2 * (z[1] - z[2]), -1), atol=1e-6)
    assert torch.allclose(distill_target(lp, rest, torch.zeros(3), "contrast"), torch.log_softmax(z[0], -1), atol=1e-6)
    swapped_lp, swapped_rest = lp[[0, 2, 1]], rest[[0, 2, 1]]
    assert torch.allclose(distill_target(swapped_lp, swapped_rest, -c, "contrast"), got, atol=1e-6)
    assert not torch.allclose(distill_target(lp, rest, -c, "contrast"), got, atol=1e-3)
    with pytest.raises(ValueError, match="unknown distillation target 'other'"):
        distill_target(lp, rest, c, "other")


def test_kl_barrier_is_zero_at_the_base_and_has_a_free_margin():
    logp = torch.log_softmax(torch.randn(2, 5, 7), -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert kl_barrier(logp, logp, mask, 0.0)["kl_barrier"].item() == 0.0
    other = torch.log_softmax(logp + 0.3 * torch.randn(2, 5, 7), -1)
    t = kl_barrier(other, logp, mask, 0.0)
    assert t["kl_barrier"].item() > 0
    assert kl_barrier(other, logp, mask, t["kl_neutral"].item() * 10)["kl_barrier"].item() == 0.0


def test_linear_projection_target_is_zero_exactly_at_kappa_c():
    g = torch.Generator().manual_seed(0)
    B, T, D = 2, 4, 3
    v = torch.tensor([1.0, 0.0, 0.0])
    h_base = torch.randn(2 * B, T, D, generator=g)
    mask = torch.ones(2 * B, T, dtype=torch.bool)
    c = torch.tensor([0.5, -1.5])
    kappa, s = 2.0, 0.5
    move = torch.zeros(2 * B, T, D)
    move[:, :, 0] = (kappa * s * torch.cat([c, c])).view(-1, 1)  # every member moves by κ·c units of s
    h = h_base + move
    t = projection_terms(h, project(h_base, v, s), v, s, mask, c, 1.0, "clamp", "pair", "linear", kappa)
    assert t["shift"].item() == pytest.approx(0.0, abs=1e-6)
    assert t["contrast"].item() == pytest.approx(F.huber_loss(torch.zeros(2), kappa * c).item(), abs=1e-6)
    over = projection_terms(h + move, project(h_base, v, s), v, s, mask, c, 1.0, "clamp", "pair", "linear", kappa)
    assert over["shift"].item() > 0  # moving twice as far is penalised, not rewarded


def test_shift_within_budget():
    c = [-2.0, -1.0, 0.0, 1.0, 2.0]
    y = [-3.0, -1.0, 0.5, 2.0, 4.0]
    dnll = [0.5, 0.1, 0.0, 0.1, 0.2]
    assert shift_within(c, y, dnll, 0.15) == {"shift_up": 1.5, "shift_down": 1.5, "c_up": 1.0, "c_down": -1.0}
    assert shift_within(c, y, dnll, 1.0) == {"shift_up": 3.5, "shift_down": 3.5, "c_up": 2.0, "c_down": -2.0}
    # rescaling c changes the slope, not the shift
    a = summarize(c, y, [True] * 5, np.array([0.0, 1.0]), dnll)
    b = summarize([2 * x for x in c], y, [True] * 5, np.array([0.0, 1.0]), dnll, fit_range=4.0)
    assert a["slope"] == pytest.approx(2 * b["slope"]) and (a["shift_up"], a["shift_down"]) == (b["shift_up"], b["shift_down"])
    assert a["monotone"] and a["dnll_m1"] == 0.1 and a["dnll_p1"] == 0.1
    assert not summarize(c, [0, 1, 0.5, 2, 3], [True] * 5, np.array([0.0, 1.0]))["monotone"]


# --------------------------------------------------------------------------- pairs with completions


def test_user_pairs_with_completions_are_used_as_given(tmp_path, tiny, monkeypatch):
    path = tmp_path / "p.jsonl"
    rows = [{"suffix": "The weather today", "chosen": " is sunny and warm.", "rejected": " is a secret.",
             "prompt": "Tell me about the weather."},
            {"suffix": "My favourite food"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(DataConfig(pairs=str(path)))
    assert pairs[0].chosen == " is sunny and warm." and pairs[0].prompt == "Tell me about the weather."
    assert pairs[1].chosen is None
    prompts = bh.prompts_for(BehaviourConfig(generate=False), DataConfig(), pairs, seed=0)
    assert len(prompts) == 1 and prompts[0].user == "Tell me about the weather."
    model, tok = tiny
    monkeypatch.setattr(bh, "generate", lambda *a, **k: pytest.fail("given completions were regenerated"))
    comps = bh.completions(model, tok, prompts, 8, "fp", None, log=lambda *_: None)
    assert (comps.chosen, comps.rejected) == ([" is sunny and warm."], [" is a secret."])


@pytest.mark.parametrize("row, what", [
    ({"suffix": "A", "chosen": "yes"}, "'chosen' is given without 'rejected'"),
    ({"suffix": "A", "chosen": " ", "rejected": "no"}, "must be non-empty"),
    ({"suffix": "A", "chosen": "x", "rejected": "x"}, "identical"),
    ({"suffix": "A", "chosen": 3, "rejected": "x"}, "must be a string"),
])
def test_malformed_completions_name_file_and_line(tmp_path, row, what):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"suffix": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PairsError, match=f"p.jsonl:2: .*{what}"):
        load_pairs(DataConfig(pairs=str(path)))


def test_csv_pairs_with_empty_completion_cells(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("suffix,chosen,rejected\nThe sea,\" is blue.\",\" is green.\"\nThe sky,,\n")
    pairs = load_pairs(DataConfig(pairs=str(path)))
    assert pairs[0].chosen == " is blue." and pairs[1].chosen is None


# --------------------------------------------------------------------------- the completions cache


def test_completions_cache_is_keyed_by_model_prompts_and_settings(tmp_path, tiny, tiny_dir, other_tiny_dir,
                                                                   monkeypatch):
    from adapters import models

    model, tok = tiny
    other, _ = models.load_base(other_tiny_dir, dtype="float32", device="cpu")
    calls = []
    real = bh.generate
    monkeypatch.setattr(bh, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    data = DataConfig()
    qs = tmp_path / "q.txt"
    qs.write_text("Why is the sea salty?\nHow do I fold a shirt?\n")
    prompts = bh.prompts_for(BehaviourConfig(prompts=str(qs), openings=2), data, make_pairs(6), seed=0)
    fp, fp_other = models.base_fingerprint(model), models.base_fingerprint(other)
    assert fp != fp_other
    first = bh.completions(model, tok, prompts, 6, fp, tmp_path, log=lambda *_: None)
    assert calls == [8]  # 4 prompts x 2 personas, one batched call
    again = bh.completions(model, tok, prompts, 6, fp, tmp_path, log=lambda *_: None)
    assert calls == [8] and again.rows() == first.rows()  # from the cache
    bh.completions(other, tok, prompts, 6, fp_other, tmp_path, log=lambda *_: None)
    assert calls == [8, 8]  # another base model regenerates
    part = bh.completions(model, tok, prompts[1:3], 6, fp, tmp_path, log=lambda *_: None)
    assert calls == [8, 8] and part.rows() == first.rows()[1:3]  # a subset: every prompt from the cache
    new = bh.BehaviourPrompt("Name a colour.", "Be honest. Name a colour.", "Lie. Name a colour.")
    more = bh.completions(model, tok, [new] + prompts, 6, fp, tmp_path, log=lambda *_: None)
    assert calls == [8, 8, 2] and more.rows()[1:] == first.rows()  # only the new prompt is generated
    bh.completions(model, tok, prompts, 7, fp, tmp_path, log=lambda *_: None)
    assert calls == [8, 8, 2, 8]  # other generation settings regenerate
    for f in tmp_path.glob("completions-*.jsonl"):
        f.write_text("{not json\n")
    bh.completions(model, tok, prompts, 7, fp, tmp_path, log=lambda *_: None)
    assert calls == [8, 8, 2, 8, 8]  # a damaged cache file is rebuilt, not an error


def test_generated_completions_follow_the_persona_prompt(tiny):
    model, tok = tiny
    p = bh.BehaviourPrompt("Why is the sea salty?", "Be honest. Why is the sea salty?", "Lie. Why is the sea salty?")
    comps = bh.completions(model, tok, [p], 6, "fp", None, log=lambda *_: None)
    direct = bh.generate(model, tok, [p.user_pos, p.user_neg], ["", ""], ["", ""], 6, batch_size=1)
    assert [comps.chosen[0], comps.rejected[0]] == direct  # batched (padded) equals one at a time


# --------------------------------------------------------------------------- the module at init


def test_terms_at_init(tiny, tiny_directions):
    """With the adapter at init: the KL barrier is 0, the preference term is its value at Δ = 0,
    and the distillation term at c = 0 is 0 (its target there is the base model itself)."""
    from adapters.models import BaseChecksum
    from adapters.module import ContrastiveModule
    from adapters.tuners import attach
    from conftest import tiny_adapter_cfg

    model, tok = tiny
    bcfg = BehaviourConfig(batch_size=3, neutral_batch=2, support=8)
    p = [bh.BehaviourPrompt(q, f"Be honest. {q}", f"Lie. {q}") for q in ("Why?", "How do tides work?", "Hi!")]
    items = bh.teacher(model, tok, bh.Completions(p, [" a b c", " d e", " f"], [" g h", " i j k", " l m"]), 8,
                       log=lambda *_: None)
    neutral = bh.neutral_batch(tok, ["The river runs to the sea.", "A gear turns a wheel."])
    loss = LossConfig(w_pref=1.0, w_distill=1.0, w_kl=1.0, kl_margin=0.0, coeffs=[0.5, 2.0])
    model, adapter = attach(model, tiny_adapter_cfg("lora"), tiny_directions)
    system = ContrastiveModule(model, adapter, tiny_directions, loss, TrainConfig(), BaseChecksum(model),
                               behaviour=items, neutral=neutral, behaviour_cfg=bcfg, pad_id=tok.pad_token_id)
    _, mags = system._shard("behaviour", 3, 3, step=5)
    t = system.behaviour_terms(5)
    assert min(mags) < 0 < max(mags)  # both signs in the batch
    margin = -F.logsigmoid(-0.1 * torch.tensor(mags).abs()).mean()
    assert t["pref"].item() == pytest.approx(margin.item(), abs=1e-5)
    assert t["distill"].item() > 0  # at c != 0 the target is the persona's, not the base
    kl = system.neutral_terms(5)
    assert kl["kl_barrier"].item() == pytest.approx(0.0, abs=1e-6)
    b = {k: v for k, v in bh.collate([it for pair in items for it in pair], tok.pad_token_id).items()}
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       logits_to_keep=b["mask"].shape[1] + 1).logits
    student = support_logprobs(torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["idx"]))
    zero = distill_terms(student, distill_target(b["lp"], b["rest"], torch.zeros(6)), b["mask"])
    assert zero["distill"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kind,attn", [("lora", "sdpa"), ("additive", "sdpa"), ("road", "sdpa"), ("lora", "eager")])
def test_packed_behaviour_rows_give_each_completion_its_own_rows_log_probs_and_gradients(tiny, tiny_directions, kind,
                                                                                         attn):
    """A prompt's two completions in one row (``behaviour.pack``: y_d masked from y_h, positions
    continued from the prompt) give the behaviour terms and their gradients of one row per
    completion (fp32), in one pass of a row per prompt."""
    from conftest import randomize, tiny_adapter_cfg

    from adapters.models import BaseChecksum
    from adapters.module import ContrastiveModule
    from adapters.tuners import attach

    model, tok = tiny
    hidden.base_model_of(model).config._attn_implementation = attn
    p = [bh.BehaviourPrompt(q, f"Be honest. {q}", f"Lie. {q}", o) for q, o in
         (("Why?", ""), ("How do tides work in a long bay?", "Tides"), ("Hi!", ""), ("Name a colour.", ""))]
    comps = bh.Completions(p, [" a b c", " rise twice a day", " f", " red and green"],
                           [" g h", " i j k", " l m n o p", " blue"])
    items = bh.teacher(model, tok, comps, 8, log=lambda *_: None)
    model, adapter = attach(model, tiny_adapter_cfg(kind), tiny_directions)
    randomize(adapter, std=0.2)
    loss = LossConfig(w_pref=1.0, w_distill=1.0, w_kl=0.0, coeffs=[0.5, 2.0])
    system = ContrastiveModule(model, adapter, tiny_directions, loss, TrainConfig(), BaseChecksum(model),
                               behaviour=items, behaviour_cfg=BehaviourConfig(batch_size=4), pad_id=tok.pad_token_id)
    rows = []
    handle = hidden.decoder_layers(model)[0].register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        got = {}
        for packing in (False, True):
            system._packing = packing
            rows.clear()
            adapter.zero_grad() if hasattr(adapter, "zero_grad") else None
            params = list(adapter.trainable_parameters())
            for q in params:
                q.grad = None
            t = system.behaviour_terms(3)
            (t["pref"] + t["distill"]).backward()
            got[packing] = ({k: v.detach() for k, v in t.items()}, [q.grad.clone() for q in params], list(rows))
    finally:
        handle.remove()
    (one, g_one, r_one), (packed, g_packed, r_packed) = got[False], got[True]
    assert sum(r_packed) * 2 == sum(r_one)  # a row per prompt instead of one per completion
    for k in one:
        torch.testing.assert_close(packed[k], one[k], atol=2e-5, rtol=1e-4)
    for a, b in zip(g_packed, g_one):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("broken", ["mask", "positions"])
def test_packing_is_compared_once_and_refused_where_the_model_does_not_take_the_layout(tiny, tiny_directions,
                                                                                     monkeypatch, broken):
    """The first behaviour step compares packed rows with one row per completion. An attention that
    ignores the custom mask (here: the mask dropped, so y_d sees y_h) or positions that do not
    restart y_d at the prompt's end make the run keep one row per completion, with the terms of no
    packing; a bf16 model, whose rounding is as large as a layout change, packs."""
    from conftest import randomize, tiny_adapter_cfg

    from adapters.models import BaseChecksum
    from adapters.module import ContrastiveModule
    from adapters.tuners import attach

    model, tok = tiny
    p = [bh.BehaviourPrompt(q, f"Be honest. {q}", f"Lie. {q}") for q in ("Why?", "How do tides work?")]
    items = bh.teacher(model, tok, bh.Completions(p, [" a b c d e f g h", " d e"], [" g h i j k l m", " i j k"]), 8,
                       log=lambda *_: None)
    model, adapter = attach(model, tiny_adapter_cfg("lora"), tiny_directions)
    randomize(adapter, std=0.2)
    loss = LossConfig(w_pref=1.0, w_distill=1.0, w_kl=0.0, coeffs=[1.0])

    def make():
        return ContrastiveModule(model, adapter, tiny_directions, loss, TrainConfig(), BaseChecksum(model),
                                 behaviour=items, behaviour_cfg=BehaviourConfig(batch_size=2), pad_id=tok.pad_token_id)

    fine = make()
    want = fine.behaviour_terms(0)
    assert fine._packing is True
    broken_system = make()
    if broken == "mask":
        monkeypatch.setattr(broken_system, "_attention_mask", lambda allowed: None)
    else:
        real = bh.pack
        monkeypatch.setattr(bh, "pack", lambda *a: {**(out := real(*a)), "position_ids": torch.cumsum(
            out["input_ids"] != tok.pad_token_id, 1).clamp(min=1) - 1})
    got = broken_system.behaviour_terms(0)
    assert broken_system._packing is False
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)
    calls = []
    monkeypatch.setattr(bh, "pack", lambda *a: calls.append(1))
    broken_system.behaviour_terms(1)
    assert calls == []  # refused once: not packed again
    monkeypatch.undo()
    half = make()
    half.to(torch.bfloat16)
    half.behaviour_terms(0)
    assert half._packing is True


def test_pack_lays_out_each_prompt_once_with_both_completions():
    def item(ids, n):
        return bh.Item(ids, n, torch.zeros(n), torch.zeros(n, 2, dtype=torch.long), torch.zeros(3, n, 2),
                       torch.zeros(3, n))

    packed = bh.pack([item([5, 6, 7, 1, 2], 2), item([5, 6, 7, 3], 1), item([8, 9, 4], 1), item([8, 9, 3, 3], 2)],
                     pad_id=0)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 1, 2, 3], [0, 8, 9, 4, 3, 3]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 0, 1, 2, 2, 3]]
    assert packed["allowed"][0, 5].int().tolist() == [1, 1, 1, 0, 0, 1]  # y_d: the prompt and itself, not y_h
    assert packed["allowed"][1, 0].int().tolist() == [1, 0, 0, 0, 0, 0]  # padding: only itself
    assert packed["allowed"][1, 5].int().tolist() == [0, 1, 1, 0, 1, 1]
    assert packed["allowed"][1, 3].int().tolist() == [0, 1, 1, 1, 0, 0]  # y_h: causal
    assert packed["keep"] == 4  # positions 2..5: from the last prompt token of the longest pair
    # for collate's K - 1 = 2 right-aligned slots per completion, the kept position predicting it
    assert packed["pick"].tolist() == [[0, 1], [0, 0], [0, 0], [0, 2]]
    assert packed["y_h"].int().tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]]
    assert bh.pack([item([5, 6, 1], 1), item([5, 7, 1], 1)], pad_id=0) is None  # different prompts


@pytest.mark.parametrize("model_kind", ["plain", "rescaled", "no_output_layer"])
def test_the_kl_barriers_base_log_probs_from_kept_final_states_equal_a_base_pass(tiny, tiny_directions, monkeypatch,
                                                                                 model_kind):
    """The KL barrier's base log-probs come from the base model's final hidden states, kept per
    neutral passage in fixed chunks: equal to a base pass over the step's own batch on the text
    positions, computed once per chunk. A model whose logits are not its output layer's (here
    doubled after it), or that names no output layer, gives up keeping (the step then runs the
    base pass)."""
    from conftest import randomize

    from adapters import module
    from adapters.models import BaseChecksum
    from adapters.tuners import attach
    from conftest import tiny_adapter_cfg

    model, tok = tiny
    monkeypatch.setattr(module, "NEUTRAL_CHUNK", 2)
    texts = ["The river runs to the sea.", "A gear turns a wheel.", "Snow fell on the quiet hills all night long.",
             "Bread rises in a warm kitchen.", "Birds sing."]
    neutral = bh.neutral_batch(tok, texts)
    p = [bh.BehaviourPrompt("Why?", "Be honest. Why?", "Lie. Why?")]
    items = bh.teacher(model, tok, bh.Completions(p, [" a b"], [" c d"]), 8, log=lambda *_: None)
    model, adapter = attach(model, tiny_adapter_cfg("lora"), tiny_directions)
    randomize(adapter, std=0.2)
    loss = LossConfig(w_pref=1.0, w_distill=1.0, w_kl=1.0, kl_margin=0.0, coeffs=[0.5, 2.0])
    system = module.ContrastiveModule(model, adapter, tiny_directions, loss, TrainConfig(), BaseChecksum(model),
                                      behaviour=items, neutral=neutral, behaviour_cfg=BehaviourConfig(neutral_batch=2),
                                      pad_id=tok.pad_token_id)
    rescaled = model_kind != "plain"
    if model_kind == "no_output_layer":
        monkeypatch.setattr(hidden.base_model_of(model), "get_output_embeddings", lambda: None)
    elif rescaled:
        forward = model.forward

        def doubled(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out
        monkeypatch.setattr(model, "forward", doubled)
    passes = []
    handle = hidden.decoder_layers(model)[0].register_forward_hook(lambda *_: passes.append(1))
    try:
        for picks in ([3, 0], [2, 4], [0, 3]):
            b = {k: v[picks] for k, v in neutral.items()}
            keep = int(b["mask"].sum(1).max()) + 1
            cut = b["input_ids"].shape[1] - int(b["attention_mask"].sum(1).max())
            with torch.no_grad(), steer(model, 0.0):
                logits = model(input_ids=b["input_ids"][:, cut:], attention_mask=b["attention_mask"][:, cut:],
                               logits_to_keep=keep).logits
            want = torch.log_softmax(logits[:, :-1], -1)
            got = system._neutral_base(picks, keep)
            if rescaled:
                assert got is None
                continue
            text = b["mask"][:, cut:][:, -(keep - 1):]
            torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    # three chunks of two passages, each computed once (and nothing more once keeping is given up)
    assert len(passes) == 3 + {"plain": 3, "rescaled": 1, "no_output_layer": 0}[model_kind], len(passes)


def test_batched_teacher_equals_one_at_a_time(tiny):
    model, tok = tiny
    p = [bh.BehaviourPrompt(q, f"Be honest. {q}", f"Lie. {q}", o) for q, o in
         (("Why?", ""), ("How do tides work in a long bay?", "Tides"), ("Hi!", ""))]
    comps = bh.Completions(p, [" a b c", " rise twice a day", " f"], [" g h", " i j k", " l m n o p"])
    batched = bh.teacher(model, tok, comps, 8, log=lambda *_: None, batch_size=4)
    single = bh.teacher(model, tok, comps, 8, log=lambda *_: None, batch_size=1)
    for pb, ps in zip(batched, single):
        for a, b in zip(pb, ps):
            assert a.ids == b.ids and a.n == b.n and torch.equal(a.idx, b.idx)
            assert torch.allclose(a.lp, b.lp, atol=1e-5) and torch.allclose(a.tok_lp0, b.tok_lp0, atol=1e-5)
            # the no-persona teacher is the model's own distribution on the completion tokens
            ids = torch.tensor([a.ids])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, -a.n - 1:-1].float(), -1)
            assert torch.allclose(a.tok_lp0, lp.gather(-1, ids[0, -a.n:, None])[:, 0], atol=1e-5)


def test_teacher_cache_serves_each_prompt_it_has_seen(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    p = [bh.BehaviourPrompt(q, f"Be honest. {q}", f"Lie. {q}") for q in ("Why?", "How do tides work?", "Hi!")]
    comps = bh.Completions(p, [" a b c", " d e", " f"], [" g h", " i j k", " l m"])
    path = tmp_path / "teacher.safetensors"
    calls = []
    real = bh.teacher
    monkeypatch.setattr(bh, "teacher", lambda m, t, c, *a, **k: calls.append(len(c.prompts)) or real(m, t, c, *a, **k))
    first = bh.cached_teacher(model, tok, bh.Completions(p[:2], comps.chosen[:2], comps.rejected[:2]), 8, path,
                              log=lambda *_: None)
    every = bh.cached_teacher(model, tok, comps, 8, path, log=lambda *_: None)
    assert calls == [2, 1]  # the third prompt only
    again = bh.cached_teacher(model, tok, comps, 8, path, log=lambda *_: None)
    assert calls == [2, 1]
    for a, b in zip(first + [every[2]], again):
        assert all(x.ids == y.ids and torch.equal(x.lp, y.lp) and torch.equal(x.idx, y.idx) for x, y in zip(a, b))
    other = bh.Completions(p, [" a b c", " d e", " something else"], comps.rejected)
    bh.cached_teacher(model, tok, other, 8, path, log=lambda *_: None)
    assert calls == [2, 1, 1]  # another completion of a prompt is another item
    path.write_bytes(b"garbage")
    bh.cached_teacher(model, tok, comps, 8, path, log=lambda *_: None)
    assert calls == [2, 1, 1, 3]  # a damaged file is computed again


def test_prepare_completes_only_the_prompts_training_draws(tmp_path, tiny, monkeypatch):
    """The items list holds the drawn prompts and None at the others; an empty completion among
    them makes every prompt needed, and the pool is the prompts with non-empty completions."""
    from adapters.config import Config

    monkeypatch.setenv("CONTRASTIVE_ADAPTERS_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    qs = tmp_path / "q.txt"
    qs.write_text("".join(f"Question number {i}?\n" for i in range(12)))
    cfg = Config()
    cfg.loss = LossConfig(w_pref=1.0, w_distill=1.0, w_kl=0.0)
    cfg.behaviour = BehaviourConfig(prompts=str(qs), openings=0, batch_size=2, max_new_tokens=4, support=8)
    cfg.train = TrainConfig(steps=3, seed=1)
    used = bh.scheduled(1, 3, 12, 2)
    assert 2 < len(used) <= 6
    calls = []
    real = bh.generate
    monkeypatch.setattr(bh, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    items, neutral = bh.prepare(cfg, model, tok, make_pairs(4), "fp", tmp_path, log=lambda *_: None)
    assert neutral is None and len(items) == 12 and calls == [2 * len(used)]
    assert [i for i, it in enumerate(items) if it is not None] == used
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["user"] for r in rows] == [f"Question number {i}?" for i in used]
    for step in range(3):  # what the module draws
        assert all(items[j] is not None for j in bh.draw(1, "behaviour", step, 12, 2)[0])

    def one_empty(*a, **k):  # the first drawn prompt's positive completion comes back empty
        out = real(*a, **k)
        return [""] + out[1:] if calls.append(0) or len(calls) == 2 else out

    monkeypatch.setattr(bh, "generate", one_empty)
    cfg.behaviour.max_new_tokens = 5  # another cache key: generated again
    items, _ = bh.prepare(cfg, model, tok, make_pairs(4), "fp", None, log=lambda *_: None)
    assert len(items) == 11 and all(it is not None for it in items)
    monkeypatch.setattr(bh, "generate", lambda *a, **k: pytest.fail("cached completions were generated again"))
    again, _ = bh.prepare(cfg, model, tok, make_pairs(4), "fp", None, log=lambda *_: None)  # the empty one cached
    assert len(again) == 11 and all(torch.equal(a.lp, b.lp) for x, y in zip(items, again) for a, b in zip(x, y))
    monkeypatch.setattr(bh, "generate", lambda *a, **k: [""] * len(a[2]))
    cfg.behaviour.max_new_tokens = 6
    with pytest.raises(bh.BehaviourError, match="every behaviour completion is empty"):
        bh.prepare(cfg, model, tok, make_pairs(4), "fp", None, log=lambda *_: None)


def test_shared_prefix_logprobs_equal_whole_sequences(tiny):
    """The teacher's pass (each prefix once, its KV cache reused by every completion after it,
    in padded batches) gives what a whole-sequence forward gives, for completions of 1 to 5
    tokens, shared prefixes and prefixes of one."""
    model, tok = tiny
    a, b = [5, 6, 7, 8], [9, 10]
    seqs = [(a + [11, 12, 13], 3), (a + [14], 1), (b + [15, 16, 17, 18, 19], 5), (a + [20, 21], 2), ([22, 23, 24], 1)]
    for bs in (1, 2, 8):
        got = bh._completion_logprobs(model, tok.pad_token_id, seqs, bs)
        for (ids, n), lp in zip(seqs, got):
            with torch.no_grad():
                want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -n - 1:-1].float(), -1)
            assert lp.shape == want.shape and torch.allclose(lp, want, atol=1e-5), (ids, n, bs)


def test_persona_goes_where_the_config_says(tmp_path):
    qs = tmp_path / "q.txt"
    qs.write_text("Why is the sea salty?\n")
    data = DataConfig()
    pairs = make_pairs(4)
    user = bh.prompts_for(BehaviourConfig(prompts=str(qs), openings=1), data, pairs, seed=0)
    q, opening = user
    assert q.user == "Why is the sea salty?" and q.opening == "" and q.sys_pos == ""
    assert q.user_pos == f"{data.template.format(persona=data.positive)}\n\nWhy is the sea salty?"
    assert opening.user == BehaviourConfig().neutral_user and opening.opening in {p.suffix for p in pairs}
    pair = next(p for p in pairs if p.suffix == opening.opening)
    assert (opening.user_pos, opening.user_neg) == (pair.positive, pair.negative)  # exactly the pair's turns
    system = bh.prompts_for(BehaviourConfig(prompts=str(qs), openings=1, persona="system"), data, pairs, seed=0)
    assert system[0].user_pos == system[0].user == "Why is the sea salty?"
    assert system[0].sys_pos == "You are an honest person." and system[0].sys_neg == "You are a dishonest person."
    with pytest.raises(bh.BehaviourError, match="none.txt does not exist"):
        bh.prompts_for(BehaviourConfig(prompts=str(tmp_path / "none.txt")), data, pairs, seed=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(bh.BehaviourError, match="no behaviour prompts"):
        bh.prompts_for(BehaviourConfig(prompts=str(empty)), data, pairs, seed=0)
