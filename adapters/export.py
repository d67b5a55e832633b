"""Export a trained adapter for serving, without this package at inference time.

* ``save_peft``: a peft kind (lora, boft, oft, road) as a plain peft folder that
  ``PeftModel.from_pretrained(base, folder)`` loads. It computes coefficient +1. For LoRA the
  coefficient is peft's own scale: ``peft.helpers.rescale_adapter_scale(model, c)``; peft has
  no scale for BOFT / OFT / RoAd, so for other coefficients merge instead.
* ``save_control_vector``: an additive adapter on decoder layers (``model.layers.{N}``) as a
  llama.cpp control-vector GGUF (``--control-vector-scaled file.gguf c`` applies it at c).
* ``save_merged``: any kind merged into a full model at a chosen coefficient
  (``save_pretrained`` folder with the tokenizer), loadable by transformers alone.

Every file is written to a temporary name and renamed, so a crash leaves no half export. An
export never deletes what it did not write: a destination that exists is refused unless
``force``, and even then only an earlier export (every entry listed in its
``contrastive_adapter.json``) or control vector is replaced, never a run folder or a user's files.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import hidden
from .errors import UserError
from .io import atomic_folder, write_json
from .run import is_finished
from .steer import check_coeff
from .tuners import KINDS
from .tuners.base import ATTR, attached_adapter
from .tuners.peft_base import PeftAdapter

class ExportError(UserError):
    """This adapter cannot be exported in the requested format, or not to that destination."""


MANIFEST = "contrastive_adapter.json"


def check_destination(path: str | Path, force: bool = False, folder: bool = True) -> Path:
    """``path`` resolved, if an export may write there; else ExportError saying why and what to do."""
    path = Path(path).expanduser().resolve()
    if path == Path.cwd() or path == Path(path.anchor):
        raise ExportError(f"{path} is the current or root folder; export into a new folder (--out DIR)")
    if not path.exists():
        return path
    what = "folder" if folder else ".gguf file"
    if folder != path.is_dir():
        raise ExportError(f"{path} is {'a file' if folder else 'a folder'}; --out must name a {what}")
    if folder and not any(path.iterdir()):
        return path
    if not force:
        raise ExportError(f"{path} already exists; choose a new {what}, or pass --force to replace an earlier "
                          "export there")
    if not folder:
        try:
            read_control_vector(path)
        except Exception:
            raise ExportError(f"{path} is not a control vector written by an export; --force replaces only "
                              "those. Choose a new file") from None
        return path
    if is_finished(path):
        raise ExportError(f"{path} is a run folder; exporting there would destroy the run. Choose a new folder")
    try:
        from .io import read_json

        ours = set(read_json(path / MANIFEST).get("files", []))
    except (OSError, ValueError):
        ours = set()
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
    if foreign:
        raise ExportError(f"{path} holds files that no export wrote ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); --force replaces only an earlier export. "
                          "Choose a new folder")
    return path


def _write_manifest(tmp: Path, provenance: dict) -> None:
    files = sorted({p.name for p in tmp.iterdir()} | {MANIFEST})
    write_json(tmp / MANIFEST, {**provenance, "files": files})


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the frozen base model with no adapter attached (peft layers unloaded)."""
    dup = copy.deepcopy(model)
    for m in dup.modules():  # the copied steering hooks find no adapter: they do nothing
        m.__dict__.pop(ATTR, None)
    return dup.unload() if hasattr(dup, "get_base_model") else dup  # a PeftModel: base Linears back


def merged_model(model: nn.Module, c: float = 1.0) -> nn.Module:
    """A plain copy of the base model with the attached adapter merged in at coefficient ``c``;
    its logits equal those of ``steer(model, c)`` (up to float rounding)."""
    c = float(check_coeff(c))
    adapter = attached_adapter(model)
    out = plain_copy(model)
    if c != 0.0:
        adapter.merge_into(out, c)
        bad = [n for n, p in out.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise ExportError(f"merged at coefficient {c:+g} the weights are not finite ({', '.join(bad[:3])}); "
                              "use a smaller |c|")
    return out


def _provenance(adapter, fingerprint: str | None, **extra) -> dict:
    import dataclasses

    return {"exported_by": "contrastive-adapters", "kind": adapter.kind,
            "adapter": dataclasses.asdict(adapter.config), "base_fingerprint": fingerprint, **extra}


def _card(run: str | Path | None, tmp: Path, library_name: str) -> None:
    """The run's model card (README.md) and its plot into an export folder, before the manifest
    lists the folder's files."""
    if run is None:
        return
    import shutil

    from .card import write_card

    if (Path(run) / "report.png").is_file():
        shutil.copyfile(Path(run) / "report.png", tmp / "report.png")
    write_card(run, tmp, library_name)


def save_merged(model: nn.Module, tokenizer, folder: str | Path, c: float = 1.0,
                fingerprint: str | None = None, force: bool = False, run: str | Path | None = None) -> Path:
    """``save_pretrained`` folder of the base model with the adapter merged at ``c`` (with ``run``,
    the run folder's model card)."""
    adapter = attached_adapter(model)
    folder = check_destination(folder, force)
    merged = merged_model(model, c)
    with atomic_folder(folder) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _card(run, tmp, "transformers")
        _write_manifest(tmp, _provenance(adapter, fingerprint, coefficient=float(c)))
    return folder


def save_peft(model: nn.Module, folder: str | Path, fingerprint: str | None = None,
              base_name: str | None = None, force: bool = False, run: str | Path | None = None) -> Path:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; with
    ``run``, the run folder's model card instead of peft's empty template)."""
    adapter = attached_adapter(model)
    if not isinstance(adapter, PeftAdapter):
        peft_kinds = sorted(k for k, cls in KINDS.items() if issubclass(cls, PeftAdapter))
        raise ExportError(f"a {adapter.kind!r} adapter is not a peft adapter (peft kinds: {', '.join(peft_kinds)}); "
                          "export it merged (save_merged / `export --format merged`)"
                          + (" or as a control vector (--format gguf)" if adapter.kind == "additive" else ""))
    folder = check_destination(folder, force)
    with atomic_folder(folder) as tmp:
        if base_name is not None:
            model.peft_config["default"].base_model_name_or_path = base_name
        model.save_pretrained(tmp)
        _card(run, tmp, "peft")
        _write_manifest(tmp, _provenance(adapter, fingerprint, coefficient_note=(
                       "computes coefficient +1; for LoRA use peft.helpers.rescale_adapter_scale(model, c) "
                       "for coefficient c" if adapter.kind == "lora" else
                       "computes coefficient +1; peft cannot rescale this kind: merge at c instead")))
    return folder


def control_vectors(model: nn.Module, c: float = 1.0) -> dict[int, torch.Tensor]:
    """{decoder layer index: c·w} of an additive adapter on residual layers (llama.cpp layout:
    ``direction.N`` is added to the output of decoder layer N; layer 0 cannot be steered)."""
    adapter = attached_adapter(model)
    if adapter.kind != "additive":
        raise ExportError(f"only additive adapters export as control vectors, not {adapter.kind!r}; "
                          "export it merged instead (`export --format merged`)")
    out = {}
    for name in adapter.targets:
        idx = hidden.layer_index(name)
        if idx < 0 or not name.endswith(f".{idx}"):
            raise ExportError(f"a llama.cpp control vector acts on decoder-layer outputs; {name!r} is not one "
                              "(train with adapter.targets: ['model.layers.{N}']) or export it merged")
        if idx == 0:
            raise ExportError("llama.cpp cannot steer decoder layer 0 (its control vectors start at layer 1); "
                              "train with adapter.depth starting above layer 0, or export it merged")
        out[idx] = (float(c) * adapter.vector(name).detach().float().cpu())
    return out


def save_control_vector(model: nn.Module, path: str | Path, c: float = 1.0, force: bool = False) -> Path:
    import gguf

    from .io import atomic_write_bytes

    vectors = control_vectors(model, float(check_coeff(c)))
    arch = getattr(hidden.base_model_of(model).config, "model_type", "llama")
    path = check_destination(path, force, folder=False)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as td:
        tmp = Path(td) / "cv.gguf"
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", arch)
        writer.add_uint32("controlvector.layer_count", len(vectors))
        for idx in sorted(vectors):
            writer.add_tensor(f"direction.{idx}", vectors[idx].numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(path, tmp.read_bytes())
    return path


def read_control_vector(path: str | Path) -> tuple[dict[int, torch.Tensor], dict]:
    """Read a control-vector GGUF back: ({layer: vector}, {"arch", "model_hint", "layer_count"})."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    meta = {"arch": field("general.architecture"), "model_hint": field("controlvector.model_hint"),
            "layer_count": field("controlvector.layer_count")}
    if meta["arch"] != "controlvector":
        raise ExportError(f"{path} is not a control-vector GGUF (general.architecture={meta['arch']!r})")
    vectors = {int(t.name.split(".")[1]): torch.from_numpy(t.data.copy()).float()
               for t in reader.tensors if t.name.startswith("direction.")}
    return vectors, meta
