"""Data-parallel training on CPU: 2 processes (Lightning ddp, gloo) train the same adapter as
one process on the same global batch; only rank 0 writes the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adapters.checkpoint import ResumableSampler
from adapters.config import ConfigError, load_config
from adapters.io import load_tensors
from adapters import pipeline
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_split_each_global_batch():
    single = list(ResumableSampler(22, seed=3, batch=4))
    ranks = [list(ResumableSampler(22, seed=3, rank=r, world=2, batch=4)) for r in (0, 1)]
    assert all(len(r) == 10 for r in ranks)  # 22 -> 5 whole global batches of 4 -> 10 per rank
    for b in range(5):  # rank batches of 2 make exactly the single-process batch of 4
        assert sorted(ranks[0][2 * b:2 * b + 2] + ranks[1][2 * b:2 * b + 2]) == sorted(single[4 * b:4 * b + 4])
    resumed = [list(ResumableSampler(22, seed=3, offset=8, rank=r, world=2, batch=4)) for r in (0, 1)]
    assert resumed[0] == ranks[0][4:] and resumed[1] == ranks[1][4:]


@pytest.mark.parametrize("train, match", [
    ({"strategy": "ddp", "devices": 2, "batch_size": 5}, "must divide by train.devices=2"),
    ({"strategy": "auto", "devices": 2}, "needs train.strategy=ddp"),
    ({"strategy": "fsdp", "devices": 2}, "fsdp' is not supported"),
    ({"strategy": "deepspeed"}, "train.strategy='deepspeed' is not valid"),
])
def test_bad_parallel_settings(tmp_path, train, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def _train(cfg: dict, folder: Path, name: str, *extra: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--log.name", name, *extra],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "runs" / name


def test_ddp_two_processes_match_one_process(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["eval"]["enabled"] = False
    cfg["train"].update(steps=3, batch_size=4, val_every=100, checkpoint_every=2, threads=1, lr=1e-2)
    one = _train(cfg, tmp_path, "one")
    two = _train(cfg, tmp_path, "two", "--train.strategy", "ddp", "--train.devices", "2")
    a, b = load_tensors(one / "adapter.safetensors")[0], load_tensors(two / "adapter.safetensors")[0]
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
        if "lora_B" in k:  # zero at init
            moved = max(moved, float(a[k].abs().max()))
    assert moved > 1e-3, "the adapter did not train"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert load_config(two / "config.yaml").train.devices == 2


def test_too_few_pairs_for_one_global_batch_is_an_input_error(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["data"]["max_pairs"] = 6
    cfg["train"].update(strategy="ddp", devices=2, batch_size=8)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline.Refused, match="do not fill one global batch of train.batch_size=8 across 2 devices"):
        pipeline.main(["--config", str(path)])
    assert not (tmp_path / "runs").exists()
