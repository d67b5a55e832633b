"""The comparison command: spec validation, rows from run folders, and a real tiny comparison."""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from adapters import compare
from adapters.config import ConfigError
from adapters.io import write_json
from conftest import tiny_config


def fake_run(folder, kind="boft", score=0.5):
    folder.mkdir(parents=True)
    rows = [{"method": "adapter", "probe": "self_report", "coeff": c, "dnll": 0.01 * c} for c in (-1.0, 0.0, 1.0)]
    sep = [{"method": "adapter", "layer": l, "coeff": c, "separation": c + i} for i, l in enumerate("ab")
           for c in (-1.0, 0.0, 1.0)]
    summary = [{"method": "adapter", "probe": "self_report", "score": score, "slope": 1.0, "r2": 0.9, "valid_frac": 1.0,
                "monotone": True, "shift_up": 1.25, "shift_down": 2.5},
               {"method": "prompting", "probe": "self_report", "score": 2.0, "slope": 2.0, "r2": 1.0, "valid_frac": 1.0},
               {"method": "adapter", "probe": "facts", "score": 9.0, "slope": 9.0, "r2": 1.0, "valid_frac": 1.0}]
    write_json(folder / "report.json", {"summary": summary, "rows": rows, "separation": sep, "notes": []})
    write_json(folder / "timing.json", {"kind": kind, "trainable_parameters": 1234, "step_seconds": 2.5})
    return folder


def test_run_row_reads_the_probe_and_averages_layers(tmp_path):
    row = compare.run_row(fake_run(tmp_path / "r"))
    assert row["kind"] == "boft" and row["trainable_params"] == 1234 and row["step_s"] == 2.5
    assert row["score"] == 0.5  # self_report, not facts
    assert row["dnll_-1"] == pytest.approx(-0.01) and row["dnll_+1"] == pytest.approx(0.01)
    assert (row["sep_-1"], row["sep_0"], row["sep_+1"]) == (-0.5, 0.5, 1.5)  # mean over layers a, b
    with pytest.raises(ValueError, match="no adapter row for probe 'yes_no'"):
        compare.run_row(tmp_path / "r", probe="yes_no")
    md = compare.markdown([{**row, "seeds": 1}] + compare.baseline_rows(tmp_path / "r"), "t")
    assert "| r | boft | 1 | 1,234 | 2.50 | +0.500 | +1.000 | 0.90 | 1.00 | 1.00 | -0.010 | +0.010 | +1.250 | +2.500 |" in md
    assert "| prompting | baseline |" in md


def test_seeds_are_averaged_with_the_score_std(tmp_path):
    a = compare.run_row(fake_run(tmp_path / "a"))
    b = {**a, "score": 1.5, "slope": 3.0, "dnll_-1": math.nan}
    row = compare.mean_over_seeds([a, b], "cfg")
    assert row["run"] == "cfg" and row["seeds"] == 2 and row["kind"] == "boft"
    assert row["score"] == pytest.approx(1.0) and row["score_std"] == pytest.approx(2 ** 0.5 / 2)
    assert row["slope"] == pytest.approx(2.0) and row["slope_std"] == pytest.approx(2 ** 0.5)
    assert row["shift_up"] == 1.25 and row["shift_up_std"] == 0.0 and row["monotone"] == 1.0
    assert "+1.000 ± 0.71" in compare.markdown([row], "t")  # score ± its standard deviation
    assert row["dnll_-1"] == pytest.approx(-0.01)  # NaN seeds are left out of the mean
    broken = compare.mean_over_seeds([a, {**b, "score": math.nan}], "cfg")
    assert math.isnan(broken["score"]) and broken["seeds"] == "1/2 valid"  # a broken seed is not averaged away


@pytest.mark.parametrize("spec, match", [
    ({"runs": []}, "must list"),
    ({"runs": ["configs/boft.yaml"], "colour": 1}, "unexpected: \\['colour'\\]"),
    ({"runs": ["nope.yaml"]}, "does not exist"),
    ({"runs": ["configs/boft.yaml"], "overrides": {"train.stpes": 3}}, "did you mean 'steps'"),
    ({"runs": ["configs/boft.yaml"], "seeds": [0, 0]}, "distinct integers"),
    ({"runs": ["configs/boft.yaml"], "seeds": ["a"]}, "distinct integers"),
    (["a list"], "must be a mapping, not list"),
])
def test_bad_specs_are_refused_before_training(tmp_path, spec, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=match):
        compare.load_spec(path)


def test_compare_trains_tabulates_and_resumes(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path / "unused", "road")
    (tmp_path / "road.yaml").write_text(yaml.safe_dump(cfg))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"runs": [str(tmp_path / "road.yaml")], "out": str(tmp_path / "cmp"),
                                         "overrides": {"train.steps": 2, "eval.probes": ["self_report"]}}))
    spec = compare.load_spec(spec_path)
    rows = compare.compare(spec, log=lambda *_: None)
    assert rows[0]["run"] == "road" and rows[0]["kind"] == "road" and rows[0]["trainable_params"] > 0
    assert not math.isnan(rows[0]["sep_0"])
    assert [r["run"] for r in rows[1:]] == ["prompting", "pca_vector", "mean_diff", "random", "base"]
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("| road | road |") == 1
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"] == json.loads(json.dumps(rows))
    logged = []
    compare.compare(spec, log=logged.append)  # finished runs are reused, not retrained
    assert any("finished run found, reused" in m for m in logged)


def test_compare_over_seeds(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path / "unused", "additive")
    cfg["eval"]["baselines"] = ["base"]
    (tmp_path / "add.yaml").write_text(yaml.safe_dump(cfg))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"runs": [str(tmp_path / "add.yaml")], "out": str(tmp_path / "cmp"),
                                         "seeds": [0, 1], "overrides": {"train.steps": 1}}))
    rows = compare.compare(compare.load_spec(spec_path), log=lambda *_: None)
    assert rows[0]["run"] == "add" and rows[0]["seeds"] == 2
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == ["add-s0", "add-s1"]
    seeds = [compare.load_config(tmp_path / "cmp" / f"add-s{s}" / "config.yaml").train.seed for s in (0, 1)]
    assert seeds == [0, 1]
    per_run = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]
    assert [r["run"] for r in per_run] == ["add-s0", "add-s1"]
    assert rows[0]["dnll_+1"] == pytest.approx(sum(r["dnll_+1"] for r in per_run) / 2)


@pytest.mark.parametrize("code, says", [(143, "was stopped by SIGTERM (exit 143); its last checkpoint is kept"),
                                        (2, "failed (exit 2); its error is printed above")])
def test_a_training_run_that_did_not_finish_is_reported_as_such(tiny_dir, tmp_path, monkeypatch, capsys, code, says):
    """compare names the run that stopped and how (a scheduler's SIGTERM is not a crash), exits 1,
    and writes no comparison table."""
    import argparse

    cfg = tiny_config(tiny_dir, tmp_path / "unused", "road")
    (tmp_path / "road.yaml").write_text(yaml.safe_dump(cfg))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"runs": [str(tmp_path / "road.yaml")], "out": str(tmp_path / "cmp")}))
    fake = tmp_path / "train.py"
    fake.write_text(f"import sys\nsys.exit({code})\n")
    monkeypatch.setattr(compare, "_train_command", lambda: [sys.executable, str(fake)])
    assert compare.main(argparse.Namespace(config=str(spec_path), force=False)) == 1
    err = capsys.readouterr().err
    assert f"error: training run road ({tmp_path / 'cmp' / 'road'}) {says}" in err
    assert not (tmp_path / "cmp" / "comparison.md").exists()
