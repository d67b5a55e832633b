"""Smoke test of the real entry points: train.py on a tiny config, load_run, the generate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import adapters
from adapters import __main__ as cli
from adapters.config import load_config
from adapters.io import load_tensors
from adapters.models import base_fingerprint, load_base
from adapters.steer import steer
from adapters import pipeline
from conftest import logits, make_batch, tiny_config

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ["config.yaml", "directions.safetensors", "directions.json", "adapter.safetensors",
             "report.md", "report.csv", "report.json", "report.png", "README.md"]


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_dir, tmp / "runs", "lora")))
    run_dir = pipeline.main(["--config", str(cfg_path)])
    return Path(run_dir), cfg_path


def test_adapters_after_the_last_loss_layer_are_flagged(tiny_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "road")
    cfg["eval"]["enabled"] = False
    cfg["train"]["steps"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pipeline.main(["--config", str(path)])
    err = capsys.readouterr().err
    assert "warning: adapter layers [3] come after the last loss layer (2)" in err
    cfg["adapter"]["depth"] = [0.0, 0.75]
    cfg["log"]["name"] = "early"
    path.write_text(yaml.safe_dump(cfg))
    pipeline.main(["--config", str(path)])
    assert "warning" not in capsys.readouterr().err


def test_train_writes_a_complete_run(lora_run, tiny_dir):
    run_dir, cfg_path = lora_run
    assert run_dir == cfg_path.parent / "runs" / "tiny-lora"
    for name in RUN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert load_config(run_dir / "config.yaml") == load_config(cfg_path)

    _, adapter_meta = load_tensors(run_dir / "adapter.safetensors")
    _, directions_meta = load_tensors(run_dir / "directions.safetensors")
    base, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    assert adapter_meta["kind"] == "lora"
    assert adapter_meta["fingerprint"] == directions_meta["fingerprint"] == base_fingerprint(base)

    report = json.loads((run_dir / "report.json").read_text())
    methods = {r["method"] for r in report["summary"]}
    assert {"adapter", "pca_vector", "prompting"} <= methods
    assert {r["coeff"] for r in report["rows"] if r["method"] == "adapter" and not r["search"]} == {-1.0, 0.0, 1.0}
    assert "| method | slope | r2 | valid_frac | effect_size | p_value | score | min | max |" in \
        (run_dir / "report.md").read_text()
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_folder_holds_a_model_card_the_hub_reads(lora_run, tiny_dir):
    from huggingface_hub import ModelCard

    run_dir, _ = lora_run
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.library_name == "contrastive-adapters"
    assert card.data.base_model is None and f"{tiny_dir} (a local model" in card.text  # not a Hub id
    from adapters.card import _on_the_hub

    assert _on_the_hub("HuggingFaceTB/SmolLM2-135M-Instruct") and _on_the_hub("user/name@v1")
    assert not _on_the_hub(tiny_dir)
    assert {"steering", "contrastive-adapters", "lora"} <= set(card.data.tags)
    summary = json.loads((run_dir / "report.json").read_text())["summary"]
    adapter = next(r for r in summary if r["method"] == "adapter")
    assert f"| adapter | {adapter['slope']:+.3g} |" in card.text and "![dose-response](report.png)" in card.text


def test_load_run_at_zero_is_the_base_model(lora_run, tiny_dir, tokenizer):
    run_dir, _ = lora_run
    model, tok = adapters.load_run(run_dir, device="cpu")
    base, _ = load_base(tiny_dir, dtype="float32", device="cpu")
    batch = make_batch(tokenizer, n=2)
    want = logits(base, batch)
    with steer(model, 0):
        got = logits(model, batch)
    assert torch.equal(got, want)
    with steer(model, 1.0):
        moved = logits(model, batch)
    assert not torch.equal(moved, want), "the trained adapter does nothing at c = 1"


def test_generate_cli_prints_three_columns(lora_run, capsys):
    run_dir, _ = lora_run
    rc = cli.main(["generate", "--run", str(run_dir), "--coeff", "-1", "0", "1", "--max-new-tokens", "3",
                   "--width", "120", "hi"])
    out = capsys.readouterr().out
    assert rc == 0
    assert ">>> hi" in out
    header = next(line for line in out.splitlines() if "c = " in line)
    cols = [c.strip() for c in header.split(" | ")]
    assert cols == ["c = -1", "c = +0", "c = +1"]


def test_generate_cli_errors(tmp_path, lora_run, capsys):
    run_dir, _ = lora_run
    assert cli.main(["generate", "--run", str(tmp_path), "hi"]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--run", str(run_dir), "--coeff", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(run_dir), "--coeff", "-1e300", "hi"]) == 2  # a number, too large
    assert "beyond ±1000" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(run_dir), "--format", "merged", "--coeff", "-1e300",
                     "--out", str(tmp_path / "m")]) == 2
    assert "beyond ±1000" in capsys.readouterr().err and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--run", str(run_dir), "--max-new-tokens", "-5", "hi"])
    assert e.value.code == 2 and "must be at least 1, got -5" in capsys.readouterr().err


def test_the_generations_table_keeps_the_texts_of_the_coefficients_that_work(tiny):
    """The wandb generations: each prompt's coefficients in one call; where one coefficient's outputs
    are not finite (an additive vector of 3e38: finite at |c| <= 1, not at 2), that one says so and
    the others keep their text, the same as alone."""
    from conftest import attach_random

    from adapters.steer import generate

    model, tok = tiny
    model, adapter = attach_random(model, "additive", std=1.0, depth=[0.25, 0.5])  # one residual layer
    coeffs = [-2.0, -1.0, 0.0, 1.0, 2.0]
    batched = pipeline.generations(model, tok, ["Hi"], coeffs)  # every coefficient works: one call
    assert batched == [["Hi", c, generate(model, tok, "Hi", [c], max_new_tokens=32)[c]] for c in coeffs]
    assert len({text for *_, text in batched}) > 1, "the adapter does not change the text"
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.fill_(3e38)
    rows = pipeline.generations(model, tok, ["Hi", "Who are you?"], [-2.0, -1.0, 0.0, 1.0, 2.0])
    assert [(p, c) for p, c, _ in rows] == [(p, c) for p in ["Hi", "Who are you?"] for c in (-2.0, -1.0, 0.0, 1.0, 2.0)]
    broken = {c for _, c, text in rows if text == "(outputs not finite at this coefficient)"}
    assert broken == {-2.0, 2.0}
    for prompt, c, text in rows:
        if c not in broken:
            assert text == generate(model, tok, prompt, [c], max_new_tokens=32)[c]


def test_generate_cli_in_the_readme_form(lora_run, capsys):
    """README: `python -m adapters generate --run runs/honesty --coeff -1 0 1 "prompt"` (the prompt
    after the coefficients is a prompt, not a fourth coefficient)."""
    run_dir, _ = lora_run
    assert cli.main(["generate", "--run", str(run_dir), "--coeff", "-1", "0", "1", "Is honesty important?",
                     "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert ">>> Is honesty important?" in out and "c = -1" in out and "c = +1" in out


def test_train_config_error_exits_cleanly(tmp_path, capsys):
    with pytest.raises(pipeline.Refused, match="did you mean 'steps'"):
        pipeline.main(["--train.stpes", "3", "--log.runs_dir", str(tmp_path)])
    # the installed command is the same pipeline: the message alone on stderr, status 2
    assert cli.main(["train", "--train.stpes", "3", "--log.runs_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'steps'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["additive", "boft", "oft", "road", "ether"])
def test_train_every_other_kind(tiny_dir, tmp_path, kind):
    """Every kind goes through the same entry point and loss (evaluation off to stay fast)."""
    cfg = tiny_config(tiny_dir, tmp_path / "runs", kind)
    cfg["eval"]["enabled"] = False
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = Path(pipeline.main(["--config", str(path)]))
    assert (run_dir / "adapter.safetensors").is_file()
    timing = json.loads((run_dir / "timing.json").read_text())
    assert timing["kind"] == kind and timing["trainable_parameters"] > 0 and timing["step_seconds"] > 0
    stages = timing["stages"]  # where the time went, stage by stage, adding up to the whole
    assert list(stages) == ["load", "plan", "directions", "behaviour", "attach", "fit", "save", "evaluate"]
    assert abs(sum(stages.values()) - timing["seconds"]) < 0.5 and stages["fit"] > 0
    model, _ = adapters.load_run(run_dir, device="cpu")
    assert adapters.tuners.attached_adapter(model).kind == kind


def test_export_cli(lora_run, tiny_dir, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir, _ = lora_run
    assert cli.main(["export", "--run", str(run_dir), "--format", "merged", "--coeff", "-1",
                     "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    model, _ = adapters.load_run(run_dir, device="cpu")
    batch = make_batch(tokenizer, n=2)
    with steer(model, -1.0):
        want = logits(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(merged, batch)[real], want[real], rtol=1e-4, atol=1e-4)

    assert cli.main(["export", "--run", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == tiny_dir
    from huggingface_hub import ModelCard

    for folder, library in (("merged", "transformers"), ("peft", "peft")):  # the run's card, not peft's template
        card = ModelCard.load(tmp_path / folder / "README.md")
        assert card.data.library_name == library and card.data.base_model is None, folder
        assert "## Evaluation" in card.text and (tmp_path / folder / "report.png").is_file()
    assert cli.main(["export", "--run", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft"),
                     "--force"]) == 0  # the card and plot are the export's own files: --force replaces them

    assert cli.main(["export", "--run", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "only additive adapters" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
    assert cli.main(["export", "--run", str(run_dir), "--format", "merged", "--coeff", "inf",
                     "--out", str(tmp_path / "m2")]) == 2
    assert "finite" in capsys.readouterr().err


def test_every_run_file_carries_the_format_version(lora_run):
    from adapters.io import FORMAT_VERSION, read_json

    run_dir, _ = lora_run
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["format_version"] == FORMAT_VERSION
    for p in run_dir.glob("*.json"):
        assert read_json(p)["format_version"] == FORMAT_VERSION, p.name
    for p in run_dir.glob("*.safetensors"):
        assert load_tensors(p)[1]["format_version"] == FORMAT_VERSION, p.name


def test_files_from_another_format_version_are_refused(lora_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from adapters.config import ConfigError
    from adapters.directions import Directions
    from adapters.io import FormatVersionError
    from adapters.pipeline import load_run

    run_dir, _ = lora_run
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    tensors = load_file(str(old / "adapter.safetensors"))
    meta = load_tensors(old / "adapter.safetensors")[1]
    save_file(tensors, str(old / "adapter.safetensors"), metadata={"meta": json.dumps({**meta, "format_version": 99})})
    with pytest.raises(FormatVersionError, match="adapter.safetensors has format version 99"):
        load_run(old, device="cpu")

    cfg = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump({**cfg, "format_version": 0}))
    with pytest.raises(ConfigError, match="config.yaml has format version 0"):
        load_config(old / "config.yaml")

    d = json.loads((old / "directions.json").read_text())
    (old / "directions.json").write_text(json.dumps({**d, "format_version": None}))
    with pytest.raises(FormatVersionError, match="directions.json has format version None"):
        Directions.load(old)


def test_a_run_saved_with_the_flat_adapter_section_still_loads(lora_run, tmp_path):
    """Run folders written before each kind had its own options (adapter.r, adapter.layers, ...
    in one flat section) load as before: the keys move to their places."""
    import shutil

    from safetensors.torch import load_file, save_file

    def flat(section: dict) -> dict:
        out = {"kind": section["kind"], "layers": section["targets"], "depth": section["depth"]}
        out.update(r=section["lora"]["r"], alpha=section["lora"]["alpha"], dropout=section["lora"]["dropout"],
                   init=section["additive"]["init"], block_size=section["boft"]["block_size"],
                   group_size=section["road"]["group_size"], road_variant=section["road"]["variant"],
                   n_blocks=section["ether"]["n_blocks"], side=section["ether"]["side"])
        return out

    run_dir, _ = lora_run
    old = tmp_path / "flat-run"
    shutil.copytree(run_dir, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump({**cfg, "adapter": flat(cfg["adapter"])}, sort_keys=False))
    tensors = load_file(str(old / "adapter.safetensors"))
    meta = load_tensors(old / "adapter.safetensors")[1]
    flat_meta = json.dumps({**meta, "adapter": flat(meta["adapter"])})
    save_file(tensors, str(old / "adapter.safetensors"), metadata={"meta": flat_meta})

    assert load_config(old / "config.yaml") == load_config(run_dir / "config.yaml")
    new_run, old_run = pipeline.load(run_dir, device="cpu"), pipeline.load(old, device="cpu")
    assert old_run.adapter.config == new_run.adapter.config
    assert all(torch.equal(t, new_run.adapter.state_tensors()[k]) for k, t in old_run.adapter.state_tensors().items())


def test_our_code_never_unpickles():
    """Our own files are safetensors + JSON/YAML: no torch.load, pickle or yaml.load anywhere."""
    sources = list((ROOT / "adapters").rglob("*.py")) + [ROOT / "train.py"]
    for path in sources:
        text = path.read_text()
        for bad in ("torch.load(", "import pickle", "pickle.load", "yaml.load(", "yaml.unsafe_load"):
            assert bad not in text, f"{path.name} uses {bad}"
