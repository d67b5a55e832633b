"""Typed config: every YAML in configs/ parses and round-trips; unknown keys suggest the
closest valid key; command-line overrides; bad values are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adapters.config import (Config, ConfigError, config_from_dict, dump_config, load_config,
                             parse_overrides)
from adapters.tuners import KINDS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    out = tmp_path / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    dump_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == out.read_text()


def test_defaults_round_trip(tmp_path):
    dump_config(Config(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == Config()
    assert load_config(None) == Config()


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,typo,suggestion", [
    ("train:\n  stpes: 3\n", "stpes", "steps"),
    ("trian:\n  steps: 3\n", "trian", "train"),
    ("loss:\n  w_shfit: 1.0\n", "w_shfit", "w_shift"),
    ("adapter:\n  kidn: lora\n", "kidn", "kind"),
])
def test_unknown_key_suggests_closest(tmp_path, text, typo, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert repr(typo) in msg and f"did you mean {suggestion!r}" in msg, msg


def test_unknown_override_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(None, parse_overrides(["--train.stpes", "3"]))


@pytest.mark.parametrize("args", [["--train.steps", "3"], ["--train.steps=3"]])
def test_overrides(args):
    cfg = load_config(None, parse_overrides(args))
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)


def test_overrides_apply_over_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  lr: 0.01\n")
    cfg = load_config(path, parse_overrides(["--train.steps", "7", "--adapter.depth", "[0.5, 0.9]",
                                             "--eval.coeffs=-1,0,1", "--log.name", "x"]))
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01
    assert cfg.adapter.depth == [0.5, 0.9]
    assert cfg.eval.coeffs == [-1.0, 0.0, 1.0]
    assert cfg.log.name == "x"


@pytest.mark.parametrize("key,value", [("data.system", "No"), ("log.name", "0123"), ("log.name", "yes"),
                                       ("log.name", "null"), ("data.template", "{persona} speaking."),
                                       ("data.positive", "1.5")])
def test_string_overrides_stay_strings(key, value):
    """Overrides are parsed for the field's type, not as YAML: `--data.system No` is 'No'."""
    cfg = load_config(None, parse_overrides([f"--{key}", value]))
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_whole_section_override():
    cfg = load_config(None, parse_overrides(["--train", "{steps: 4, lr: 0.01}"]))
    assert cfg.train.steps == 4 and cfg.train.lr == 0.01


def test_override_parse_errors():
    with pytest.raises(ConfigError, match="adapter.depth"):
        load_config(None, parse_overrides(["--adapter.depth", "[0.5, 0.9"]))
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.steps"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["train.steps", "3"])


def test_unknown_adapter_kind_lists_kinds():
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_overrides(["--adapter.kind", "lorra"]))
    for kind in KINDS:
        assert repr(kind) in str(e.value)


@pytest.mark.parametrize("data,match", [
    ({"eval": {"coeffs": [-1.0, 1.0, 2.0]}}, "must contain 0"),
    ({"eval": {"coeffs": [-1.0, 0.0]}}, "at least 3"),
    ({"train": {"lr": float("nan")}}, "lr"),
    ({"train": {"lr": "nan"}}, "lr"),
    ({"train": {"lr": -1e-3}}, "lr"),
    ({"train": {"steps": 0}}, "steps"),
    ({"train": {"steps": 2.5}}, "integer"),
    ({"train": {"steps": True}}, "integer"),
    ({"model": {"dtype": "float8"}}, "float32"),
    ({"directions": {"method": "pca"}}, "pca_diff"),
    ({"directions": {"depth": [0.9, 0.2]}}, "depth"),
    ({"directions": {"select": "explicit"}}, "explicit"),
    ({"loss": {"bound": "sigmoid"}}, "clamp"),
    ({"loss": {"distill_target": "teacher"}}, "contrast"),
    ({"loss": {"w_contrast": 0.0, "w_shift": 0.0, "w_pref": 0.0, "w_distill": 0.0}}, "w_shift"),
    ({"data": {"template": "no persona here"}}, "persona"),
    ({"data": {"positive": "x", "negative": "x"}}, "differ"),
    ({"log": {"wandb": "yes"}}, "offline"),
    ({"eval": {"enabled": "maybe"}}, "true/false"),
    ({"train": "fast"}, "mapping"),
])
def test_bad_values_raise(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_nan_lr_from_the_command_line():
    for value in ("nan", ".nan", "inf"):
        with pytest.raises(ConfigError, match="lr"):
            load_config(None, parse_overrides(["--train.lr", value]))


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_every_problem_is_reported_at_once():
    """A config with several mistakes names all of them in one error, not one per attempt."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"stpes": 3, "lr": "x", "steps": 0},
                          "adapter": {"kind": "lorra", "boft": {"block_size": 1}, "r": 4},
                          "eval": {"coeffs": [1, 2, 3]}, "bogus": {}})
    msg = str(err.value)
    assert msg.startswith("8 problems in the config:")
    for part in ["did you mean 'steps'", "train.lr: expected a number", "train.steps and train.batch_size must be >= 1",
                 "adapter.kind='lorra'", "adapter.boft.block_size must be >= 2", "adapter.r is now adapter.lora.r",
                 "eval.coeffs must contain 0", "unknown config key 'bogus'"]:
        assert part in msg, part


def test_each_kind_has_its_options_section():
    """adapter.<kind> holds the kind's options: as keys, as a whole section on the command line, in a
    file; a key of the former flat section names where it went."""
    from adapters.config import LoraOptions

    assert load_config(None, parse_overrides(["--adapter.lora.r", "16"])).adapter.lora == LoraOptions(r=16)
    assert load_config(None, parse_overrides(["--adapter.lora", "{r: 4, alpha: 2}"])).adapter.lora == \
        LoraOptions(r=4, alpha=2.0)
    assert load_config(None, [("adapter.road", "{variant: road_2}")]).adapter.road.variant == "road_2"
    cfg = config_from_dict({"adapter": {"kind": "ether", "ether": {"side": "out"}}})
    assert cfg.adapter.options is cfg.adapter.ether and cfg.adapter.ether.side == "out"
    with pytest.raises(ConfigError, match=r"adapter.block_size is now adapter.boft.block_size and adapter.oft"):
        config_from_dict({"adapter": {"block_size": 16}})
    with pytest.raises(ConfigError, match=r"adapter.lora: expected a mapping, got int"):
        config_from_dict({"adapter": {"lora": 0}})
    with pytest.raises(ConfigError, match=r"holds a coefficient twice"):
        config_from_dict({"eval": {"coeffs": [-1, 0, 0, 1]}})


def test_a_saved_flat_adapter_section_moves_every_key_to_its_place():
    from adapters.config import adapter_from_saved, upgrade_adapter

    flat = {"kind": "boft", "layers": ["model.layers.{N}.mlp.down_proj"], "depth": [0.5, 1.0], "r": 4, "alpha": 2.0,
            "dropout": 0.25, "init": "directions", "block_size": 16, "group_size": 8, "road_variant": "road_2",
            "n_blocks": 2, "side": "out"}
    got = adapter_from_saved(flat)
    assert got.kind == "boft" and got.targets == ["model.layers.{N}.mlp.down_proj"] and got.depth == [0.5, 1.0]
    assert (got.lora.r, got.lora.alpha, got.lora.dropout) == (4, 2.0, 0.25)
    assert (got.boft.block_size, got.boft.dropout, got.oft.block_size) == (16, 0.25, 16)
    assert (got.road.group_size, got.road.variant) == (8, "road_2")
    assert (got.ether.n_blocks, got.ether.side, got.additive.init) == (2, "out", "directions")
    assert adapter_from_saved(dataclasses.asdict(got)) == got  # the new layout reads back as it is
    nested = {"lora": {"r": 2}}
    assert upgrade_adapter({"r": 4, **nested})["lora"] == {"r": 2} and nested == {"lora": {"r": 2}}
    assert adapter_from_saved({"lora": None, "r": 4}).lora.r == 4
    with pytest.raises(ConfigError, match="adapter: expected a mapping, got list"):
        adapter_from_saved([1])


def test_yaml_aliases_and_duplicate_keys_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"  # 9^8 elements if expanded; refused before any expansion
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefg", "bcdefgh")]
    bomb.write_text("\n".join(lines) + "\ndata:\n  candidates: *h\n")
    with pytest.raises(ConfigError, match="aliases") as e:
        load_config(bomb)
    assert len(str(e.value)) < 1000
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  steps: 3\n  lr: 0.01\n  steps: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps' \\(first on line 2\\)"):
        load_config(dup)
    with pytest.raises(ConfigError, match="not a valid list"):
        load_config(None, [("eval.coeffs", "[&x 1, *x]")])


def test_choices_equal_their_registries():
    """config.py names the choices itself (it imports no implementation module); each list must
    equal the registry it stands for, so a new kind, method, probe or peer is added in both."""
    import ast
    import inspect

    from adapters import config, directions, peers, probes
    from adapters.evaluate import methods

    assert list(config.ADAPTER_KINDS) == list(KINDS)
    assert config.QUANTIZED_KINDS == tuple(kind for kind, cls in KINDS.items() if cls.quantizable)
    assert config.DIRECTION_METHODS == directions.METHODS
    assert probes.PROBE_KINDS is config.PROBE_KINDS
    assert sorted(config.BASELINES) == sorted([*methods.BASELINES, *peers.PEERS])
    assert set(methods.NEEDS_DIRECTIONS) <= set(methods.BASELINES)
    adapter = config.AdapterConfig()
    for kind, cls in KINDS.items():  # each kind's options: one section of the adapter config, of the kind's own type
        assert type(getattr(adapter, kind)) is cls.options, kind
        assert dataclasses.replace(adapter, kind=kind).options is getattr(adapter, kind)
    sections = {f.name for f in dataclasses.fields(adapter) if dataclasses.is_dataclass(getattr(adapter, f.name))}
    assert sections == set(KINDS)
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(config)))
                if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert imported <= {"errors", "io"}, imported


def test_train_help_lists_every_key_with_its_default_and_doc(capsys):
    import dataclasses

    from adapters import __main__ as cli
    from adapters.config import Config

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    def keys(values, where):
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            yield from keys(value, f"{where}{f.name}.") if dataclasses.is_dataclass(value) else [f"{where}{f.name}"]

    every = list(keys(Config(), ""))
    assert "adapter.lora.r" in every and "train.steps" in every
    for key in every:
        assert f"  --{key} " in out, f"{key} missing from --help"
    assert "--adapter.road.variant 'road_1'\n      One of: road_1, road_2, road_4." in out
    assert "--loss.nll_margin 0.1\n      τ: per-token NLL increase over the base allowed for free (nats)." in out


def test_pyproject_ships_every_package():
    """An installed (non-editable) copy has every package folder, or its imports fail there."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = [".".join(p.parent.relative_to(root).parts) for p in (root / "adapters").rglob("__init__.py")]
    assert sorted(listed) == sorted(found)
