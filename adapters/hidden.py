"""Layer names and the ONE context manager that registers forward hooks.

Layer patterns such as ``model.layers.{N}`` or ``model.layers.{N}.mlp.down_proj`` expand
``{N}`` over the decoder layers inside a depth range; names are those of the plain
transformers model (a peft wrapper's prefixes are handled here).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import UserError


class LayerError(UserError):
    """A layer name or pattern that does not resolve; the message lists valid choices."""


def base_model_of(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def num_layers(model: nn.Module) -> int:
    cfg = base_model_of(model).config
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise LayerError(f"cannot tell the number of layers of {type(model).__name__}: its config has "
                         "no num_hidden_layers")
    return int(n)


def layer_range(model: nn.Module, depth: list[float] | tuple[float, float]) -> list[int]:
    n = num_layers(model)
    start, end = int(round(depth[0] * n)), int(round(depth[1] * n))
    return list(range(start, max(end, start + 1)))


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return dict(base_model_of(model).named_modules())


def _examples(names: list[str]) -> str:
    layer0 = [n for n in names if ".layers.0" in n or n.endswith("layers.0")]
    sample = [n.replace(".0", ".{N}", 1) for n in layer0] or names[:12]
    return ", ".join(sample[:16])


def resolve(model: nn.Module, patterns: list[str], depth=(0.0, 1.0)) -> list[str]:
    """Expand patterns to module names, in layer order; every pattern must match something."""
    modules = _module_names(model)
    layers = layer_range(model, depth)
    out: list[str] = []
    for pat in patterns:
        names = [pat.replace("{N}", str(i)) for i in layers] if "{N}" in pat else [pat]
        missing = [n for n in names if n not in modules]
        if missing:
            raise LayerError(f"layer pattern {pat!r} matches no module ({missing[0]!r} does not exist). "
                             f"Valid patterns for this model include: {_examples(list(modules))}")
        out += [n for n in names if n not in out]
    return sorted(out, key=lambda n: (layer_index(n), n))


def layer_index(name: str) -> int:
    """The decoder-layer number inside a module name (-1 if none)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return -1


def get_module(model: nn.Module, name: str) -> nn.Module:
    modules = _module_names(model)
    if name not in modules:
        raise LayerError(f"module {name!r} does not exist. Valid patterns include: {_examples(list(modules))}")
    return modules[name]


def output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_output(output, new: torch.Tensor):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


@contextlib.contextmanager
def hooks(model: nn.Module, fns: dict[str, Callable[[torch.Tensor], torch.Tensor | None]],
          on: str = "output") -> Iterator[None]:
    """Register `fn(hidden) -> new hidden | None` on each named module's output (a forward
    hook) or, with ``on="input"``, on its first positional input (a forward pre-hook).

    A hook that returns a tensor replaces the module's (first) output / input; hooks run in
    the order they were registered, so an edit registered before a recording is recorded.
    Every hook is removed on exit, also when the body raises.
    """
    if on not in ("output", "input"):
        raise ValueError(f"hooks(on=...) must be 'output' or 'input', got {on!r}")
    with contextlib.ExitStack() as registered:
        for name, fn in fns.items():
            mod = get_module(model, name)
            if on == "output":
                def hook(_mod, _inp, output, fn=fn):
                    new = fn(output_tensor(output))
                    return None if new is None else replace_output(output, new)

                registered.callback(mod.register_forward_hook(hook).remove)
            else:
                def pre_hook(_mod, args, fn=fn):
                    new = fn(args[0])
                    return None if new is None else (new,) + tuple(args[1:])

                registered.callback(mod.register_forward_pre_hook(pre_hook).remove)
        yield


def decoder_stack(model: nn.Module) -> nn.Module | None:
    """The module that runs the decoder layers (``model`` under the transformers model), which
    every forward pass calls as a module; None for an architecture laid out otherwise."""
    inner = getattr(base_model_of(model), "model", None)
    return inner if isinstance(getattr(inner, "layers", None), nn.ModuleList) else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order (``model.layers.{N}`` under the transformers model)."""
    inner = getattr(base_model_of(model), "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LayerError(f"cannot find the decoder layers of {type(model).__name__} (expected model.layers)")
    return layers


def first_layer(names: list[str]) -> int:
    """The lowest decoder-layer number among module names: the layers below it are untouched by
    whatever edits these modules (0 when one of them is outside the decoder layers)."""
    idx = [layer_index(n) for n in names]
    return 0 if not idx or min(idx) < 0 else min(idx)


_BATCHED_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


class PrefixStore:
    """Hidden states entering some decoder layers, per input (a pass's distinct rows: their token
    ids and attention mask), kept by a base-model pass (``keep_prefix``). A later pass over the
    same input whose layers below one of them are the base model's starts there
    (``shared_prefix(..., store=)``): layers below it run on one row, not on every row. Held on
    the model's device until the store is dropped (one evaluation)."""

    def __init__(self, layers):
        self.layers = sorted({int(i) for i in layers if i > 0})
        self.states: dict[tuple[bytes, int], torch.Tensor] = {}

    @staticmethod
    def key(ids: torch.Tensor, mask: torch.Tensor | None) -> bytes:
        parts = [str((tuple(ids.shape), ids.dtype)).encode(), ids.cpu().numpy().tobytes()]
        if mask is not None:
            parts.append(mask.to(torch.int8).cpu().numpy().tobytes())
        return hashlib.blake2b(b"|".join(parts), digest_size=16).digest()


def _input_key(args, kwargs, group: int = 1) -> bytes | None:
    """The ``PrefixStore`` key of a decoder-stack call's distinct rows (None without token ids)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        return None
    mask = kwargs.get("attention_mask")
    return PrefixStore.key(ids[::group], mask[::group] if isinstance(mask, torch.Tensor) else None)


@contextlib.contextmanager
def keep_prefix(model: nn.Module, store: PrefixStore) -> Iterator[None]:
    """Every forward pass in the block keeps, in ``store``, the hidden states entering each of the
    store's layers. Only for passes that steer nothing below those layers (the base model)."""
    stack = decoder_stack(model) if store.layers else None
    if stack is None:
        yield
        return
    layers = stack.layers
    state = {}

    def key(_mod, args, kwargs):
        state["key"] = _input_key(args, kwargs)

    def keep(i):
        def hook(_mod, args):
            if state.get("key") is not None:
                store.states[(state["key"], i)] = args[0].detach().clone()
        return hook

    with contextlib.ExitStack() as registered:
        registered.callback(stack.register_forward_pre_hook(key, with_kwargs=True).remove)
        for i in store.layers:
            if i < len(layers):
                registered.callback(layers[i].register_forward_pre_hook(keep(i)).remove)
        yield


@contextlib.contextmanager
def shared_prefix(model: nn.Module, first: int, group: int, store: PrefixStore | None = None) -> Iterator[None]:
    """Forward passes whose rows come in runs of ``group`` identical inputs (an item at several
    coefficients of a steering that leaves layers below ``first`` alone) compute decoder layers
    0..first-1 once per run and copy the result to its rows before layer ``first``. Rows and
    padding must repeat exactly (``evaluate`` lays rows out item-major); the batch must divide
    by ``group``. Layer-wise the same maths on fewer rows: equal to fp32 rounding. With
    ``store``, a pass whose distinct rows it holds at layer ``first`` starts from there (layers
    0..first-1 run on one row, their output unused): bitwise the state the prefix would compute
    on the same rows."""
    layers = decoder_layers(model) if first > 0 and (group > 1 or store is not None) else None
    stack = decoder_stack(model) if store is not None else None
    if layers is None or first >= len(layers):
        yield
        return
    state = {}

    def lookup(_mod, args, kwargs):  # the decoder stack: is this input's state at layer first kept?
        k = _input_key(args, kwargs, group)
        state["kept"] = store.states.get((k, first)) if k is not None else None

    def shrink(x, rows):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == rows:
            return x[:1] if state.get("kept") is not None else x[::group]
        if isinstance(x, tuple):
            return tuple(shrink(t, rows) for t in x)
        return x

    def enter(_mod, args, kwargs):  # layer 0: the full batch arrives; remember its size
        rows = args[0].shape[0]
        if rows % group:
            raise ValueError(f"shared_prefix: a batch of {rows} rows does not divide into runs of {group}")
        state["rows"] = rows
        return (shrink(args[0], rows),) + tuple(args[1:]), kwargs

    def inside(_mod, args, kwargs):  # layers 0..first-1: their batched arguments on one row per run
        rows = state["rows"]
        return args, {k: shrink(v, rows) if k in _BATCHED_KWARGS else v for k, v in kwargs.items()}

    def leave(_mod, args, kwargs):  # layer first: every row again
        kept = state.pop("kept", None)
        h = args[0] if kept is None else kept
        return (h.repeat_interleave(group, 0) if group > 1 else h,) + tuple(args[1:]), kwargs

    with contextlib.ExitStack() as registered:
        if stack is not None:
            registered.callback(stack.register_forward_pre_hook(lookup, with_kwargs=True).remove)
        registered.callback(layers[0].register_forward_pre_hook(enter, with_kwargs=True).remove)
        for i in range(first):
            registered.callback(layers[i].register_forward_pre_hook(inside, with_kwargs=True).remove)
        registered.callback(layers[first].register_forward_pre_hook(leave, with_kwargs=True).remove)
        yield


@contextlib.contextmanager
def record(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect each named module's output hidden state, (B, T, D), into the yielded dict."""
    store: dict[str, torch.Tensor] = {}

    def saver(name):
        def fn(h):
            store[name] = h

        return fn

    with hooks(model, {n: saver(n) for n in names}):
        yield store


def output_dim(model: nn.Module, name: str) -> int:
    """Width of a module's output hidden state."""
    mod = get_module(model, name)
    for attr in ("out_features", "embedding_dim"):
        if hasattr(mod, attr):
            return int(getattr(mod, attr))
    return int(base_model_of(model).config.hidden_size)
