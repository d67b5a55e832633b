"""Contrastive pairs: built-in honesty pairs, user pairs (jsonl / csv / Hugging Face), batches.

A pair shares everything but the persona: the user turn differs ("Pretend you're an honest
person ..." vs "... a dishonest person ..."), the assistant-turn opening (the *suffix*) is the
same and left open (``continue_final_message=True``). Batches are ``[pos; neg]`` along the
batch axis, split with ``chunk(2)``; a pair is one object, so shuffling can never break it.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch


class PairsError(ValueError):
    """Bad pairs input; the message names the file, line or key and what to fix."""


@dataclass(frozen=True)
class ContrastivePair:
    positive: str
    """User turn of the positive member (e.g. the honest persona)."""
    negative: str
    suffix: str
    """Assistant-turn opening shared by both members."""
    system: str = ""


def resource_path(name: str) -> Path:
    return Path(str(resources.files("adapters") / "resources" / name))


def builtin_suffixes() -> list[str]:
    lines = resource_path("suffixes.txt").read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]


def persona_pairs(suffixes: list[str], template: str, positive: str, negative: str,
                  system: str = "") -> list[ContrastivePair]:
    pos, neg = template.format(persona=positive), template.format(persona=negative)
    return [ContrastivePair(pos, neg, s, system) for s in suffixes]


# --------------------------------------------------------------------------- user files

_FIELDS = ("suffix", "positive", "negative", "system")


def _rows_from_file(path: Path) -> list[tuple[str, dict]]:
    """[(where, row)] from a .jsonl or .csv file; where = 'file:line' for error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PairsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairsError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be an object "
                                 'like {"suffix": "The capital of France"}') from None
            if not isinstance(row, dict):
                raise PairsError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{i}", row))
    elif path.suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for i, row in enumerate(reader, 2):
                if None in row:
                    raise PairsError(f"{path}:{i}: more values than header columns {reader.fieldnames}")
                rows.append((f"{path}:{i}", row))
        except csv.Error as e:
            raise PairsError(f"{path}: not valid CSV ({e})") from None
        if reader.fieldnames is not None and "suffix" not in reader.fieldnames:
            raise PairsError(f"{path}: the header has no 'suffix' column (columns: {reader.fieldnames})")
    else:
        raise PairsError(f"{path}: unknown pairs file type {path.suffix!r}; use .jsonl or .csv")
    return rows


def _rows_from_hf(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        raise PairsError(f"could not load Hugging Face dataset {name!r} (split {split!r}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Offline, "
                         "use a local .jsonl/.csv file instead.") from None
    if "suffix" not in ds.column_names:
        raise PairsError(f"Hugging Face dataset {name!r} has no 'suffix' column (columns: {ds.column_names})")
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def pairs_from_rows(rows: list[tuple[str, dict]], template: str, positive: str, negative: str,
                    system: str = "", source: str = "pairs") -> list[ContrastivePair]:
    pairs = []
    for where, row in rows:
        unknown = [k for k in row if k not in _FIELDS]
        if unknown:
            raise PairsError(f"{where}: unknown field(s) {unknown}; valid fields: {list(_FIELDS)}")
        vals = {}
        for k in _FIELDS:
            v = row.get(k)
            if v is not None and not isinstance(v, str):
                raise PairsError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
            vals[k] = v
        suffix = (vals["suffix"] or "").strip()
        if not suffix:
            raise PairsError(f"{where}: missing or empty 'suffix' (the shared assistant-turn opening)")
        pos = vals["positive"] or template.format(persona=positive)
        neg = vals["negative"] or template.format(persona=negative)
        if pos == neg:
            raise PairsError(f"{where}: the positive and negative user turns are identical ({pos!r}); "
                             "a pair must differ in its persona")
        pairs.append(ContrastivePair(pos, neg, suffix, vals["system"] or system))
    if not pairs:
        raise PairsError(f"{source}: no pairs found (the input is empty)")
    return pairs


def load_pairs(cfg) -> list[ContrastivePair]:
    """Pairs from a DataConfig."""
    if cfg.pairs == "builtin":
        pairs = persona_pairs(builtin_suffixes(), cfg.template, cfg.positive, cfg.negative, cfg.system)
    elif cfg.pairs.startswith("hf:"):
        pairs = pairs_from_rows(_rows_from_hf(cfg.pairs[3:], cfg.hf_split), cfg.template, cfg.positive,
                                cfg.negative, cfg.system, cfg.pairs)
    else:
        path = Path(cfg.pairs)
        if not path.is_file():
            raise PairsError(f"pairs file {path} does not exist (data.pairs: 'builtin', a .jsonl/.csv "
                             "path or 'hf:<dataset id>')")
        pairs = pairs_from_rows(_rows_from_file(path), cfg.template, cfg.positive, cfg.negative,
                                cfg.system, str(path))
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    return pairs


def split_pairs(pairs: list[ContrastivePair], val_fraction: float, seed: int):
    """Deterministic shuffled split into (train, val); both non-empty."""
    if len(pairs) < 4:
        raise PairsError(f"need at least 4 pairs for a train/validation split, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 2)
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# --------------------------------------------------------------------------- tokenising


def render(tokenizer, user: str, assistant: str, system: str = "") -> str:
    """Chat-template text with the assistant turn left open after ``assistant``."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        if not assistant:  # an empty final message cannot be "continued": open the turn instead
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        msgs.append({"role": "assistant", "content": assistant})
        return tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + f"assistant: {assistant}"


def encode(tokenizer, user: str, assistant: str, system: str = "") -> tuple[list[int], int]:
    """Token ids of the rendered prompt and the number of trailing tokens that belong to
    ``assistant`` (the completion / suffix)."""
    text = render(tokenizer, user, assistant, system)
    start = text.rfind(assistant) if assistant else len(text)
    if start < 0:
        raise PairsError(f"the chat template dropped the assistant text {assistant!r}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = enc["input_ids"]
    if tokenizer.is_fast:
        n_suffix = sum(1 for a, b in enc["offset_mapping"] if b > start)
    else:
        n_suffix = len(ids) - len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
    return ids, n_suffix


@dataclass
class EncodedPair:
    pos: list[int]
    neg: list[int]
    n_suffix: int
    index: int


def encode_pairs(tokenizer, pairs: list[ContrastivePair], max_length: int) -> list[EncodedPair]:
    out = []
    for i, p in enumerate(pairs):
        pos, n_pos = encode(tokenizer, p.positive, p.suffix, p.system)
        neg, n_neg = encode(tokenizer, p.negative, p.suffix, p.system)
        if n_pos != n_neg or pos[len(pos) - n_pos:] != neg[len(neg) - n_neg:]:
            raise PairsError(f"pair {i} ({p.suffix!r}): the suffix tokenises differently after the two "
                             "user turns; the suffix must be a separate assistant turn")
        if max(len(pos), len(neg)) > max_length:
            raise PairsError(f"pair {i} ({p.suffix[:40]!r}...) is {max(len(pos), len(neg))} tokens, more "
                             f"than data.max_length={max_length}; shorten it or raise data.max_length")
        if n_pos == 0:
            raise PairsError(f"pair {i}: the suffix {p.suffix!r} produced no tokens")
        out.append(EncodedPair(pos, neg, n_pos, i))
    return out


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


class PairCollator:
    """EncodedPairs -> batch dict: input_ids / attention_mask / suffix_mask (2B, T), left-padded,
    rows [pos_0..pos_{B-1}; neg_0..neg_{B-1}]; index (B,) the pairs' indices."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[EncodedPair]) -> dict[str, torch.Tensor]:
        ids, attn = pad_left([it.pos for it in items] + [it.neg for it in items], self.pad_id)
        T = ids.shape[1]
        suffix = torch.zeros_like(attn, dtype=torch.bool)
        n = torch.tensor([it.n_suffix for it in items] * 2)
        suffix[torch.arange(T).expand(len(n), T) >= (T - n).unsqueeze(1)] = True
        return {"input_ids": ids, "attention_mask": attn, "suffix_mask": suffix,
                "index": torch.tensor([it.index for it in items])}
