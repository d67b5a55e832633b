"""The exported GGUF control vector, applied by llama.cpp itself (llama-cpp-python) to the
bundled model's own Q4_1 GGUF, moves the next-token distribution as ``steer(model, c)`` does.

Runs where ``llama_cpp`` is importable, skipped elsewhere: ``pip install llama-cpp-python diskcache``
compiles llama.cpp (4 minutes on 2 cores; not part of ``make setup``). On a Xeon with AMX the
default native build crashed in its first decode; a generic build works:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"``."""

from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest
import torch

from adapters.config import AdapterConfig
from adapters.data import render
from adapters.export import read_control_vector, save_control_vector
from adapters.models import bundled_gguf
from adapters.steer import steer
from adapters.tuners import attach

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
pytestmark = pytest.mark.bundled

PROMPTS = ["Are you an honest assistant?", "Describe yourself in one word.", "What is the capital of France?"]


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def llama_logprobs(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    z = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()


def set_control_vector(llm, vectors: dict[int, torch.Tensor], strength: float, offset: int = 0) -> None:
    """What llama.cpp's ``common_control_vector_load`` + ``llama_set_adapter_cvec`` do with a file:
    ``direction.N`` at rows N - 1 of an (n_layer - 1, n_embd) buffer that starts at layer 1
    (``offset`` shifts every vector by that many layers: the control for a wrong layer index)."""
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    buf = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    for n, v in vectors.items():
        buf[n + offset - 1] += v.numpy() * strength
    data = buf.reshape(-1)
    err = llama_cpp.llama_set_adapter_cvec(llm.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                                           n_embd, 1, n_layer)
    assert err == 0


def test_the_exported_control_vector_steers_llama_cpp_as_steer_does(bundled, tmp_path):
    model, tok = copy.deepcopy(bundled[0]), bundled[1]  # a private copy: attaching mutates the model
    model, adapter = attach(model, AdapterConfig(kind="additive", targets=["model.layers.{N}"], depth=[0.3, 0.6]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.trainable_parameters():  # norm ~ 7: a visible, finite move of the output
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = save_control_vector(model, tmp_path / "cv.gguf", 1.0)
    vectors, _ = read_control_vector(path)
    llm = llama_cpp.Llama(model_path=str(bundled_gguf()), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    rows = []
    for prompt in PROMPTS:
        ids = tok(render(tok, prompt, ""), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ours = {}
            for c in (0.0, 1.0, -1.0):
                with steer(model, c):
                    ours[c] = model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1).numpy()
        set_control_vector(llm, vectors, 0.0)
        base = llama_logprobs(llm, ids)
        for c in (1.0, -1.0):
            set_control_vector(llm, vectors, c)
            theirs = llama_logprobs(llm, ids) - base
            set_control_vector(llm, vectors, c, offset=1)
            wrong = llama_logprobs(llm, ids) - base
            want, flipped = ours[c] - ours[0.0], ours[-c] - ours[0.0]
            rows.append((prompt, c, cosine(theirs, want), np.linalg.norm(theirs) / np.linalg.norm(want),
                         cosine(wrong, want), cosine(theirs, flipped)))
    for r in rows:
        print(f"{r[0][:32]:<32} c {r[1]:+g}: cos {r[2]:.3f}  norm ratio {r[3]:.3f}  one layer off: cos {r[4]:.3f}  "
              f"opposite sign: cos {r[5]:.3f}")
    for prompt, c, cos, ratio, off, opposite in rows:
        # the shift of the next-token log-probs (all 49,152) agrees up to Q4_1 arithmetic in llama.cpp
        assert cos > 0.9 and 0.8 < ratio < 1.25, (prompt, c, cos, ratio)
        assert off < cos - 0.05 and opposite < cos - 0.5, (prompt, c, off, opposite)  # it tells layer and sign apart
