"""Interrupted training costs minutes, not the run: SIGKILL mid-training, resume, same adapter;
checkpoints are atomic; the same config and seed give the same run bit for bit (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adapters import pipeline
from adapters.checkpoint import ResumableSampler
from adapters.io import load_tensors
from conftest import read_wandb_records, tiny_config
from test_end_to_end import ROOT

STEPS, EVERY = 14, 4

KILLER = """
import os, runpy, signal, sys
from adapters import checkpoint, io
KILL_AT, MODE = int(sys.argv[1]), sys.argv[2]
if MODE in ("step", "term"):  # a real SIGKILL (or SIGTERM) right after optimiser step KILL_AT
    orig = checkpoint.CheckpointCallback.on_train_batch_end
    def hook(self, trainer, pl_module, *a):
        orig(self, trainer, pl_module, *a)
        if pl_module.start_step + trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL if MODE == "step" else signal.SIGTERM)
    checkpoint.CheckpointCallback.on_train_batch_end = hook
elif MODE == "swap":  # SIGKILL between the two renames of a checkpoint's folder swap (the 2nd checkpoint)
    orig = os.rename
    def rename(src, dst, *a, **k):
        orig(src, dst, *a, **k)
        if str(dst).endswith(".checkpoint.old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
else:  # SIGKILL in the middle of writing the checkpoint of step KILL_AT
    orig = checkpoint.save_tensors
    def save(path, tensors, meta):
        orig(path, tensors, meta)
        if meta.get("step") == KILL_AT and path.name == "adapter.safetensors":
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_tensors = save
sys.argv = ["train.py"] + sys.argv[3:]
runpy.run_path({train!r}, run_name="__main__")
"""


def write_cfg(tiny_dir, tmp_path, name) -> Path:
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["train"].update(steps=STEPS, checkpoint_every=EVERY, val_every=5, batch_size=3, warmup=2)
    cfg["data"]["max_pairs"] = 30
    cfg["eval"]["enabled"] = False
    cfg["log"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_killed(cfg_path, kill_at, mode, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(train=str(ROOT / "train.py")))
    return subprocess.run([sys.executable, str(script), str(kill_at), mode, "--config", str(cfg_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run = Path(pipeline.main(["--config", str(write_cfg(tiny_dir, tmp, "ref"))]))
    return run, tmp


def adapter_of(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "adapter.safetensors")[0]


@pytest.mark.parametrize("kill_at, mode", [(10, "step"), (8, "checkpoint"), (8, "swap"), (6, "term")])
def test_sigkill_then_resume_reaches_the_uninterrupted_adapter(tiny_dir, tmp_path, reference, kill_at, mode, capsys):
    cfg_path = write_cfg(tiny_dir, tmp_path, "killed")
    proc = run_killed(cfg_path, kill_at, mode, tmp_path)
    if mode == "term":  # SIGTERM: the step in flight finishes, is checkpointed, and the exit says so
        assert proc.returncode == 143 and "stopped by SIGTERM after step 6" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "runs" / "killed"
    assert not (run / "adapter.safetensors").exists()
    # killed after step 10: the checkpoint of step 8; killed while writing step 8's: step 4's is
    # intact; killed between the renames of step 8's swap: step 8's is complete, under a hidden name
    start = {"step": 8, "checkpoint": 4, "swap": 8, "term": 6}[mode]
    if mode == "swap":  # no checkpoint/, but the old (step 4) and the new (step 8) folder, both complete
        assert not (run / "checkpoint").exists() and (run / ".checkpoint.old" / "state.json").is_file()
        assert [p for p in run.iterdir() if p.name.startswith(".checkpoint.tmp.")]
    else:
        state = yaml.safe_load((run / "checkpoint" / "state.json").read_text())
        assert state["step"] == start
    if mode == "checkpoint":  # the half-written checkpoint is a temporary folder, never checkpoint/
        assert [p for p in run.iterdir() if p.name.startswith(".checkpoint.tmp.")]

    # a fresh start into the interrupted folder is refused instead of overwriting it
    with pytest.raises(pipeline.Refused, match="--resume"):
        pipeline.main(["--config", str(cfg_path)])

    capsys.readouterr()
    resumed = Path(pipeline.main(["--resume", str(run)]))
    out = capsys.readouterr().out
    assert f"resuming {run} at step {start} of {STEPS}" in out and f"trained {STEPS - start} steps" in out
    assert resumed == run and not (run / "checkpoint").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint")]
    want, got = adapter_of(reference[0]), adapter_of(run)
    assert want.keys() == got.keys()
    for k in want:  # CPU: bit for bit
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


def test_same_seed_same_run_bit_for_bit(tiny_dir, tmp_path, reference):
    """Determinism on CPU: a second run of the same config gives identical directions and adapter."""
    run = Path(pipeline.main(["--config", str(write_cfg(tiny_dir, tmp_path, "again"))]))
    for name in ("directions.safetensors", "adapter.safetensors"):
        a, b = load_tensors(reference[0] / name)[0], load_tensors(run / name)[0]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_errors(tiny_dir, tmp_path, reference):
    with pytest.raises(pipeline.Refused, match="not a run folder"):
        pipeline.main(["--resume", str(tmp_path / "nope")])
    with pytest.raises(pipeline.Refused, match="drop --config"):
        pipeline.main(["--resume", str(reference[0]), "--train.steps", "3"])


def test_sampler_position_continues_the_same_order():
    full = []
    s = ResumableSampler(10, seed=3)
    for _ in range(3):
        full += list(s)
    for step in range(7):  # drop_last=False: 4 batches per epoch of 10 (3, 3, 3, 1)
        epoch, offset = ResumableSampler.position(step, 10, 3, drop_last=False)
        tail = list(ResumableSampler(10, 3, epoch, offset))
        per_epoch = [full[e * 10:(e + 1) * 10] for e in range(3)]
        assert tail == per_epoch[epoch][offset:]
    assert sorted(full[:10]) == list(range(10)) and full[:10] != full[10:20]


def test_atomic_files_and_folders_get_the_usual_permissions(tmp_path):
    from adapters.io import atomic_folder, atomic_write_text, save_tensors

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)}, {})
        with atomic_folder(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755 and (tmp_path / "d" / "f").read_text() == "y"


def test_resume_continues_the_same_wandb_run(tiny_dir, tmp_path, capsys):
    """With wandb on (offline), a resumed run logs into the interrupted run's wandb id; the
    terminal shows no wandb deprecation warning and the bar counts steps, not 'Epoch 0/-2'."""
    cfg_path = write_cfg(tiny_dir, tmp_path, "logged")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["log"]["wandb"] = "offline"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = run_killed(cfg_path, 6, "term", tmp_path)  # SIGTERM: wandb flushes (SIGKILL may lose records)
    assert proc.returncode == 143, proc.stderr[-2000:]
    run = tmp_path / "runs" / "logged"
    first = [p.name for p in (run / "wandb").glob("offline-run-*")]
    assert len(first) == 1
    pipeline.main(["--resume", str(run)])
    out = capsys.readouterr()
    runs = sorted((run / "wandb").glob("offline-run-*"))
    files = [next(p.glob("run-*.wandb")) for p in runs]
    assert len(runs) == 2 and len({f.name for f in files}) == 1, runs  # one wandb id
    steps = [sorted({json.loads(item.value_json) for r in read_wandb_records(f) if r.HasField("history")
                     for item in r.history.item
                     if (item.key or "/".join(item.nested_key)) == "trainer/global_step"}) for f in files]
    assert steps[0] and steps[0][-1] <= 6 and steps[1][0] >= 6, steps  # the resumed run goes on from step 6
    for text in (proc.stdout + proc.stderr, out.out + out.err):
        assert "anonymous setting" not in text
        assert "Epoch 0/-2" not in text
