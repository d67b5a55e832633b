"""``steer.stream``: the side-by-side generation behind ``generate`` and the playground."""

from __future__ import annotations

import threading
import time

import pytest

from adapters.steer import _Rows, generate, stream
from conftest import attach_random

COEFFS = [-2.0, -1.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("kind", ["lora", "boft"])  # one batched call / one call per coefficient
def test_side_by_side_equals_one_coefficient_at_a_time(tiny, tokenizer, kind):
    model, _ = tiny
    model, _ = attach_random(model, kind, std=0.2)
    together = generate(model, tokenizer, "hi there", COEFFS, max_new_tokens=8)
    alone = {c: generate(model, tokenizer, "hi there", [c], max_new_tokens=8)[c] for c in COEFFS}
    assert together == alone
    assert len(set(together.values())) > 1, "the adapter changes nothing: the test would not see a mix-up"
    steps = list(stream(model, tokenizer, "hi there", COEFFS, max_new_tokens=8))
    assert steps[-1] == together and len(steps) > 1  # streamed: texts grow token by token


def test_stop_and_close_end_the_generation_and_leave_the_callers_event_alone(tiny, tokenizer, monkeypatch):
    model, _ = tiny
    model, _ = attach_random(model, "lora")
    stop = threading.Event()
    assert len(list(stream(model, tokenizer, "hi", [1.0], max_new_tokens=6, stop=stop))) == 6
    assert not stop.is_set(), "stream set the caller's event"
    it = stream(model, tokenizer, "hi", [0.0, 1.0], max_new_tokens=40, stop=stop)
    next(it)
    stop.set()
    assert len(list(it)) <= 2  # the current token, then nothing: the steered group never starts
    puts = []
    monkeypatch.setattr(_Rows, "put", lambda self, value, put=_Rows.put: puts.append(1) or put(self, value))
    it = stream(model, tokenizer, "hi", [1.0], max_new_tokens=40)
    next(it)
    it.close()  # a cancelled request: its worker stops after the token it is on
    deadline = time.time() + 30
    while any(t.name.endswith("(_generate_rows)") for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert len(puts) <= 4, f"the worker went on after the generator was closed ({len(puts) - 1} tokens)"


def test_an_error_in_the_generation_reaches_the_caller(tiny, tokenizer, monkeypatch):
    model, _ = tiny
    model, _ = attach_random(model, "lora")

    def broken(**kwargs):
        kwargs["streamer"].put(kwargs["input_ids"])
        kwargs["streamer"].end()
        raise RuntimeError("after the streamer ended")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="after the streamer ended"):
        list(stream(model, tokenizer, "hi", [1.0], max_new_tokens=4))
