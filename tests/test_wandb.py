"""The wandb run of a training run (offline), read back record by record with wandb's own
protobuf schema: run config with the real model id, curves with more than one point, the
learning rate, the evaluation's tables, plot and headline summary, a generations table and the
adapter as a model artifact."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml

from adapters import pipeline
from conftest import read_wandb_records, tiny_config


def test_the_wandb_run_holds_config_curves_evaluation_generations_and_the_adapter(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["train"].update(steps=6, val_every=3)
    cfg["log"]["wandb"] = "offline"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = Path(pipeline.main(["--config", str(path)]))
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r.WhichOneof("record_type")].append(r)

    updates = [r.run.config for r in by_kind["run"]] + [r.config for r in by_kind["config"]]  # init config: run record
    config = {item.key: yaml.safe_load(item.value_json) for u in updates for item in u.update}
    assert {"model", "data", "adapter", "loss", "train", "eval"} <= set(config)
    info = config["run"]["value"] if "value" in config["run"] else config["run"]
    assert info["base_model"] == tiny_dir and info["trainable_parameters"] > 0 and info["loss_layers"]

    points = defaultdict(int)
    for r in by_kind["history"]:
        for item in r.history.item:
            points[item.key or "/".join(item.nested_key)] += 1
    assert points["train/loss"] == 6 and points["train/distill"] == 6
    assert any(k.startswith("lr-") and n == 6 for k, n in points.items()), sorted(points)
    assert points["val/dnll@+1"] == 2  # validation at steps 3 and 6
    for table in ("eval/summary", "eval/rows", "eval/generations"):
        assert points[f"{table}/_type"] == 1, table
    assert points["eval/plot/_type"] == 1

    summary = {item.key or "/".join(item.nested_key): yaml.safe_load(item.value_json)
               for r in by_kind["summary"] for item in r.summary.update}
    assert isinstance(summary["eval/adapter/self_report/shift_up"], float)
    (artifact,) = [r.artifact for r in by_kind["artifact"] if r.artifact.type == "model"]
    meta = yaml.safe_load(artifact.metadata)
    assert artifact.name == "adapter-tiny-lora" and meta["base_fingerprint"] and meta["kind"] == "lora"
    assert {f.path for f in artifact.manifest.contents} >= {"adapter.safetensors", "directions.safetensors"}
