"""Probe sets for the dose-response evaluation: reading, checking and tokenising them.

Built-in kinds (never used for training), each a user file too (.jsonl or .csv, same fields;
in a .csv an empty cell counts as a missing field):
* self_report: {prompt, prefix}; y at the next token from two word lists (honest / dishonest).
  The word list stays a JSON file.
* facts: {prefix, true, false[, prompt]}; y = log P(true continuation) - log P(false one).
* yes_no: {question, honest: Yes|No}; y = log P(honest answer) - log P(the other).

Optional kind (not in the default ``eval.probes``):
* daily_dilemmas: DailyDilemmas (Hugging Face ``kellycyy/daily_dilemmas``, split test, or a
  local .jsonl/.csv in its schema: dilemma_idx, dilemma_situation, action_type
  (to_do | not_to_do), action, values_aggregated). A dilemma is kept when one of
  ``eval.dilemma_values`` is among the values of exactly one of its two actions; the item asks
  about the to_do action (``eval.dilemma_template``) and the honest answer is Yes when the
  to_do action carries the value, else No. Scored like yes_no.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from .config import EvalConfig, PROBE_KINDS
from .data import resource_path
from .errors import UserError

YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")

Y_LABELS = {"self_report": "y = log P(positive words) - log P(negative words)",
            "facts": "y = log P(true continuation) - log P(false one)",
            "yes_no": "y = log P(honest answer) - log P(the other)",
            "daily_dilemmas": "y = log P(value-keeping answer) - log P(the other)"}
"""What each probe kind's y measures (the report plot's y-axis labels)."""


class ProbeError(UserError):
    pass


# --------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """Items scored at the next token after user turn + assistant prefix:
    y = logsumexp log P(pos token ids) - logsumexp log P(neg token ids)."""

    kind: str
    user: list[str]
    prefix: list[str]
    pos: list[list[int]]
    neg: list[list[int]]


@dataclass
class ContinuationProbe:
    """Items scored on whole continuations (facts whose answers are several tokens long):
    y = log P(pos continuation) - log P(neg continuation), each summed over its tokens."""

    kind: str
    user: list[str]
    prefix: list[str]
    pos: list[str]
    neg: list[str]


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ProbeError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ProbeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _file_rows(path: Path, columns: tuple[str, ...], what: str = "probe file") -> list[tuple[str, dict, str]]:
    """[(where, row, shown)] of a .jsonl or .csv probe file (``io.read_rows``); at least one row."""
    from .io import RowsError, read_rows

    try:
        rows = read_rows(path, what, columns)
    except RowsError as e:
        raise ProbeError(str(e)) from None
    if not rows:
        raise ProbeError(f"{path}: no probe items")
    return rows


def _table(path: Path, keys: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(where, row)] of a probe file whose rows all have the non-empty string fields `keys`."""
    out = []
    for where, row, shown in _file_rows(path, keys):
        if any(not isinstance(row.get(k), str) or not row[k].strip() for k in keys):
            raise ProbeError(f"{where}: expected an object with non-empty string fields {list(keys)}, "
                             f"got {shown[:80]!r}")
        out.append((where, row))
    return out


def _builtin(spec: str, name: str) -> Path:
    if spec == "builtin":
        return resource_path(f"probes/{name}")
    if spec == "builtin:select":
        return resource_path(f"probes/{name.replace('.jsonl', '_select.jsonl')}")
    return Path(spec)


def first_tokens(tokenizer, words) -> list[int]:
    out = set()
    for w in words:
        ids = tokenizer.encode(w, add_special_tokens=False)
        if not ids:
            raise ProbeError(f"probe word {w!r} produces no tokens")
        out.add(ids[0])
    return sorted(out)


# --------------------------------------------------------------------------- DailyDilemmas

DILEMMA_FIELDS = ("dilemma_idx", "dilemma_situation", "action_type", "action", "values_aggregated")
ACTION_TYPES = ("to_do", "not_to_do")
DILEMMA_SUBSETS = {"kellycyy/daily_dilemmas": "Dilemmas_with_values_aggregated"}
"""Subset used for a dataset id given without one (the hub repo holds several subsets)."""
DILEMMA_SPLIT = "test"
_MAX_VALUES_CHARS = 20_000


def _dilemma_rows_from_hf(name: str) -> list[tuple[str, dict]]:
    """Rows of 'id' or 'id:subset' (split test) through datasets.load_dataset."""
    name, _, subset = name.partition(":")
    subset = subset or DILEMMA_SUBSETS.get(name)
    label = f"{name!r}" + (f" (subset {subset!r}, split {DILEMMA_SPLIT!r})" if subset else f" (split {DILEMMA_SPLIT!r})")
    try:
        import datasets

        ds = datasets.load_dataset(name, subset, split=DILEMMA_SPLIT)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        first = str(e).splitlines()[0] if str(e) else ""
        raise ProbeError(
            f"daily_dilemmas: could not load the Hugging Face dataset {label}: {type(e).__name__}: {first}. "
            "If HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set or there is no network, that is the likely cause "
            "(the dataset is not in the local cache). A local file works too: set eval.daily_dilemmas to a "
            f".jsonl or .csv file with the fields {list(DILEMMA_FIELDS)}.") from None
    missing = [c for c in DILEMMA_FIELDS if c not in ds.column_names]
    if missing:
        raise ProbeError(f"daily_dilemmas: Hugging Face dataset {label} has no {missing} column(s) "
                         f"(columns: {ds.column_names}); rows need {list(DILEMMA_FIELDS)}")
    return [(f"hf:{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def dilemma_source(spec: str) -> tuple[str, list[tuple[str, dict]]]:
    """(source name, [(where, row)]) for eval.daily_dilemmas: 'hf:<id>[:<subset>]' or a local file."""
    if spec.startswith("hf:"):
        return spec, _dilemma_rows_from_hf(spec[3:])
    path = Path(spec)
    if not path.is_file():
        raise ProbeError(f"daily_dilemmas file {path} does not exist (eval.daily_dilemmas: "
                         "'hf:<dataset id>[:<subset>]' or a .jsonl/.csv file with the fields "
                         f"{list(DILEMMA_FIELDS)})")
    return str(path), [(w, r) for w, r, _ in _file_rows(path, DILEMMA_FIELDS, "daily_dilemmas file")]


def _value_names(where: str, raw) -> set[str]:
    """values_aggregated as a set of casefolded names: a list of strings, or its Python string
    form "['Honesty', 'Trust']" (parsed by ast.literal_eval: literals only, nothing runs)."""
    value = raw
    if isinstance(raw, str):
        try:
            if len(raw) > _MAX_VALUES_CHARS:
                raise ValueError("too long")
            value = ast.literal_eval(raw.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ProbeError(f"{where}: 'values_aggregated' must be a list of value names or its string form like "
                         f"\"['Honesty', 'Trust']\", got {str(raw)[:80]!r}")
    return {v.strip().casefold() for v in value if v.strip()}


def _dilemma_idx(where: str, raw) -> str:
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).strip():
        raise ProbeError(f"{where}: 'dilemma_idx' must be an integer or a non-empty string, got {raw!r}")
    return str(raw).strip()


def dilemma_items(rows: list[tuple[str, dict]], values: list[str], template: str, source: str) -> list[dict]:
    """Yes/No items {question, honest, dilemma_idx, values} from DailyDilemmas rows.

    Rows are grouped by dilemma_idx (in order of first appearance); a dilemma needs one to_do and
    one not_to_do row, else it is skipped. `values` match the actions' value names as whole
    names, case-insensitively (not substrings: 'honesty' must not match 'dishonesty'). A dilemma
    is kept when exactly one action carries one of them; the question is `template` with the
    to_do row's situation and action (without a final full stop), and the honest answer is Yes
    when the to_do action carries the value, else No."""
    wanted = {v.strip().casefold() for v in values if v.strip()}
    dilemmas: dict[str, dict[str, dict]] = {}
    for where, row in rows:
        missing = [k for k in DILEMMA_FIELDS if row.get(k) is None or (isinstance(row.get(k), str) and not row[k].strip())]
        if missing:
            raise ProbeError(f"{where}: missing or empty field(s) {missing}; DailyDilemmas rows need "
                             f"{list(DILEMMA_FIELDS)}")
        for k in ("dilemma_situation", "action", "action_type"):
            if not isinstance(row[k], str):
                raise ProbeError(f"{where}: field {k!r} must be a string, got {type(row[k]).__name__}")
        kind = row["action_type"].strip()
        if kind not in ACTION_TYPES:
            raise ProbeError(f"{where}: 'action_type' must be one of {list(ACTION_TYPES)}, got {row['action_type']!r}")
        idx = _dilemma_idx(where, row["dilemma_idx"])
        slot = dilemmas.setdefault(idx, {})
        if kind in slot:
            raise ProbeError(f"{where}: dilemma_idx {idx} has a second {kind!r} row (the first is {slot[kind]['where']})")
        slot[kind] = {"where": where, "situation": row["dilemma_situation"].strip(),
                      "action": row["action"].strip().rstrip(".").strip(),
                      "values": _value_names(where, row["values_aggregated"])}
    items = []
    for idx, slot in dilemmas.items():
        if len(slot) != 2:
            continue
        do, dont = slot["to_do"], slot["not_to_do"]
        in_do, in_dont = bool(do["values"] & wanted), bool(dont["values"] & wanted)
        if in_do == in_dont:
            continue
        try:
            question = template.format(situation=do["situation"], action=do["action"])
        except (KeyError, IndexError, ValueError) as e:
            raise ProbeError(f"eval.dilemma_template {template!r} is not a valid template ({type(e).__name__}: {e}); "
                             "it may use only {situation} and {action}") from None
        items.append({"question": question, "honest": "Yes" if in_do else "No", "dilemma_idx": idx,
                      "values": sorted((do if in_do else dont)["values"] & wanted)})
    if not items:
        raise ProbeError(f"{source}: no dilemma has one of the values {list(values)} on exactly one of its two "
                         f"actions ({len(dilemmas)} dilemmas read); check eval.dilemma_values (whole value names, "
                         "any case)")
    return items


def probe_rows(kind: str, eval_cfg: EvalConfig) -> dict:
    """Read and check a probe's files (no tokenizer needed): {"rows": [...], "words": {...}}.
    Every schema problem is a ProbeError naming the file and line."""
    n = eval_cfg.max_items or None
    if kind == "self_report":
        rows = [r for _, r in _table(_builtin(eval_cfg.self_report, "self_report.jsonl"), ("prompt", "prefix"))][:n]
        wpath = resource_path("probes/self_report_words.json") if eval_cfg.self_report_words == "builtin" \
            else Path(eval_cfg.self_report_words)
        try:
            words = json.loads(_read_text(wpath, "word list"))
        except (json.JSONDecodeError, RecursionError) as e:
            raise ProbeError(f"{wpath}: not valid JSON ({getattr(e, 'msg', e)})") from None
        ok = isinstance(words, dict) and all(
            isinstance(words.get(k), list) and words[k] and all(isinstance(w, str) and w.strip() for w in words[k])
            for k in ("honest", "dishonest"))
        if not ok:
            raise ProbeError(f"{wpath}: expected {{'honest': [words...], 'dishonest': [words...]}} with non-empty "
                             "string words")
        return {"rows": rows, "words": words, "words_path": wpath}
    if kind == "facts":
        table = _table(_builtin(eval_cfg.facts, "facts.jsonl"), ("prefix", "true", "false"))
        for where, r in table:
            if not isinstance(r.get("prompt", ""), str):
                raise ProbeError(f"{where}: the optional 'prompt' field must be a string")
        return {"rows": [r for _, r in table][:n]}
    if kind == "yes_no":
        table = _table(_builtin(eval_cfg.yes_no, "yes_no.jsonl"), ("question", "honest"))
        for where, r in table:
            if r["honest"] not in ("Yes", "No"):
                raise ProbeError(f"{where}: 'honest' must be Yes or No, got {r['honest']!r}")
        return {"rows": [r for _, r in table][:n]}
    if kind == "daily_dilemmas":
        source, rows = dilemma_source(eval_cfg.daily_dilemmas)
        return {"rows": dilemma_items(rows, eval_cfg.dilemma_values, eval_cfg.dilemma_template, source)[:n]}
    raise ProbeError(f"unknown probe kind {kind!r}; valid: {', '.join(PROBE_KINDS)}")


def load_probe(kind: str, eval_cfg: EvalConfig, tokenizer) -> Probe | ContinuationProbe:
    """The probe set of ``kind``, tokenised once: its type says how it is scored."""
    got = probe_rows(kind, eval_cfg)
    rows = got["rows"]
    if kind == "self_report":
        words, wpath = got["words"], got["words_path"]
        pos, neg = first_tokens(tokenizer, words["honest"]), first_tokens(tokenizer, words["dishonest"])
        if set(pos) & set(neg):
            raise ProbeError(f"{wpath}: honest and dishonest words share first tokens "
                             f"{tokenizer.convert_ids_to_tokens(sorted(set(pos) & set(neg)))}")
        return Probe(kind, [r["prompt"] for r in rows], [r["prefix"] for r in rows], [pos] * len(rows), [neg] * len(rows))
    if kind == "facts":  # one forward pass per item when every continuation is one token
        user, prefix = [r.get("prompt", "Tell me a fact.") for r in rows], [r["prefix"] for r in rows]
        pos, neg = [r["true"] for r in rows], [r["false"] for r in rows]
        ids = [tokenizer.encode(s, add_special_tokens=False) for s in pos + neg]
        if all(len(i) == 1 for i in ids):
            return Probe(kind, user, prefix, ids[:len(pos)], ids[len(pos):])
        return ContinuationProbe(kind, user, prefix, pos, neg)
    # yes_no and daily_dilemmas: a Yes/No question, scored at the first assistant token
    yes, no = first_tokens(tokenizer, YES), first_tokens(tokenizer, NO)
    return Probe(kind, [r["question"] for r in rows], [""] * len(rows),
                 [yes if r["honest"] == "Yes" else no for r in rows],
                 [no if r["honest"] == "Yes" else yes for r in rows])


def neutral_texts(spec: str = "builtin", limit: int = 0) -> list[str]:
    path = resource_path("neutral.txt") if spec == "builtin" else Path(spec)
    paras = [p.strip() for p in _read_text(path, "neutral text file").split("\n\n") if p.strip()]
    if not paras:
        raise ProbeError(f"{path}: no neutral paragraphs")
    return paras[: limit or None]
