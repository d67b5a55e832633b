"""Property-based fuzzing of everything that reads user files or strings: the pairs loader,
the probe loaders and the config parser. The only outcomes allowed are a loaded result or our
own clear error type; never a traceback from deep inside a library."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import data, probes
from adapters.config import ConfigError, DataConfig, EvalConfig, dump_config, load_config, parse_overrides

# 150 examples per property in the default run; FUZZ_EXAMPLES=2000 for a longer search
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

texty = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texty,
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texty, kids, max_size=4),
                           max_leaves=12)
rows = st.dictionaries(st.sampled_from(["suffix", "positive", "negative", "system", "extra", "prompt", "prefix",
                                        "true", "false", "question", "honest"]) | texty, json_values, max_size=5)
file_bytes = (st.binary(max_size=2000)
              | texty.map(str.encode)
              | st.lists(rows, max_size=6).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode())
              | st.lists(st.lists(texty, max_size=4), max_size=6).map(
                  lambda rs: "\n".join(",".join(r) for r in [["suffix", "positive"]] + rs).encode())
              | st.integers(1, 5).map(lambda n: ("x" * (200_000 * n)).encode()))  # huge lines


def _file(content: bytes, suffix: str) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    f.write(content)
    f.close()
    return Path(f.name)


@FUZZ
@given(content=file_bytes, suffix=st.sampled_from([".jsonl", ".csv"]))
def test_pairs_loader(content, suffix):
    path = _file(content, suffix)
    try:
        pairs = data.load_pairs(DataConfig(pairs=str(path)))
        assert pairs and all(p.positive != p.negative and p.suffix.strip() for p in pairs)
    except data.PairsError as e:
        assert str(path) in str(e) or "no pairs" in str(e)
    finally:
        path.unlink()


@FUZZ
@given(content=file_bytes, kind=st.sampled_from(["self_report", "facts", "yes_no", "words", "neutral"]))
def test_probe_loaders(content, kind):
    path = _file(content, ".json" if kind == "words" else ".jsonl")
    field = {"words": "self_report_words", "neutral": "neutral"}.get(kind, kind)
    try:
        if kind == "neutral":
            assert probes.neutral_texts(str(path))
        else:
            got = probes.probe_rows("self_report" if kind == "words" else kind, EvalConfig(**{field: str(path)}))
            assert got["rows"]
    except probes.ProbeError as e:
        assert str(path) in str(e)
    finally:
        path.unlink()


yaml_like = (texty
             | st.dictionaries(st.sampled_from(["model", "data", "train", "adapter", "eval", "loss", "log", "bogus"]),
                               st.dictionaries(texty | st.sampled_from(["steps", "lr", "kind", "coeffs", "depth",
                                                                        "targets", "lora", "r", "name", "pairs"]),
                                               json_values, max_size=3), max_size=3).map(json.dumps))


def _round_trips(cfg) -> None:
    """A config that loaded is written (as into a run folder) and read back to an equal config."""
    path = _file(b"", ".yaml")
    try:
        dump_config(cfg, path)
        assert load_config(path) == cfg
    finally:
        path.unlink()


@FUZZ
@given(text=yaml_like)
def test_config_parser(text):
    path = _file(text.encode("utf-8", "surrogatepass"), ".yaml")
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    finally:
        path.unlink()
    _round_trips(cfg)


@FUZZ
@given(args=st.lists(texty | st.sampled_from(["--train.steps", "--eval.coeffs", "--adapter.kind", "--log.name",
                                              "--train", "--x.y.z", "[1, 2", "nan", "--adapter.depth=[0.1,0.2]",
                                              "--adapter.lora.r", "--adapter.lora"]),
                     max_size=6))
def test_overrides_parser(args):
    try:
        cfg = load_config(None, parse_overrides(args))
    except ConfigError:
        return
    _round_trips(cfg)


def test_fuzz_targets_accept_valid_input(tmp_path):
    """The properties above are not vacuous: valid files load."""
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"suffix": "Hello"}) + "\n")
    assert len(data.load_pairs(DataConfig(pairs=str(p)))) == 1
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps({"prefix": "a", "true": "b", "false": "c"}) + "\n")
    assert probes.probe_rows("facts", EvalConfig(facts=str(f)))["rows"]
    # the config properties reach their round trip: these parse
    _round_trips(load_config(None, parse_overrides(["--train.steps", "7", "--adapter.depth=[0.1,0.2]",
                                                    "--adapter.lora.r", "4"])))
    c = tmp_path / "c.yaml"
    c.write_text(json.dumps({"train": {"steps": 3}, "loss": {"coeffs": [1, 2.5]}}))
    assert load_config(c).train.steps == 3
    _round_trips(load_config(c))
    with pytest.raises(ConfigError):
        load_config(None, parse_overrides(["--train.steps", "0"]))
