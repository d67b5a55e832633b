"""Nothing a user saved is lost: exports never delete what they did not write, a run folder is
never silently overwritten or shared by two processes, and an interrupted folder swap is
recoverable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapters import __main__ as cli
from adapters.io import COMPLETE, atomic_folder, recover_folder
from adapters.run import RunLock
from adapters import pipeline
from conftest import tiny_config
from test_end_to_end import ROOT


def write_cfg(tiny_dir, tmp_path, name: str = "safe") -> Path:
    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["train"]["steps"] = 2
    cfg["eval"]["enabled"] = False
    cfg["log"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("safe")
    return Path(pipeline.main(["--config", str(write_cfg(tiny_dir, tmp))]))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(run_dir, out, *extra, fmt="merged") -> int:
    return cli.main(["export", "--run", str(run_dir), "--format", fmt, "--out", str(out), *extra])


def test_export_never_deletes_what_it_did_not_write(run, tmp_path, capsys, monkeypatch):
    users = tmp_path / "mine"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("keep me")
    (users / "sub" / "data.csv").write_text("1,2")
    before, run_before = snapshot(users), snapshot(run)

    assert export(run, users) == 2
    assert "already exists" in capsys.readouterr().err
    assert export(run, users, "--force") == 2  # --force replaces exports only
    assert "no export wrote (notes.txt, sub)" in capsys.readouterr().err
    assert export(run, run, "--force") == 2
    assert "run folder" in capsys.readouterr().err
    assert export(run, run.parent, "--force") == 2  # a folder holding the run
    assert "run folder" in capsys.readouterr().err
    afile = tmp_path / "model.bin"
    afile.write_text("weights")
    assert export(run, afile, "--force") == 2
    assert "is a file" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "mine" / "sub")
    assert export(run, ".") == 2
    assert "current or root folder" in capsys.readouterr().err
    assert snapshot(users) == before and snapshot(run) == run_before and afile.read_text() == "weights"
    assert not [p for p in tmp_path.rglob(".*")], "an export left a hidden folder or file behind"

    # an earlier export is ours: refused without --force, replaced with it, and a file the user
    # added to it afterwards makes it theirs again
    out = tmp_path / "exported"
    assert export(run, out) == 0
    assert export(run, out, "--coeff", "-1") == 2
    assert "--force" in capsys.readouterr().err
    assert export(run, out, "--coeff", "-1", "--force") == 0
    assert '"coefficient": -1.0' in (out / "contrastive_adapter.json").read_text()
    (out / "my_eval.txt").write_text("mine")
    assert export(run, out, "--force") == 2
    assert (out / "my_eval.txt").read_text() == "mine"
    assert not [p for p in tmp_path.rglob(".*")]


def test_training_into_a_finished_run_is_refused_unless_overwrite(run, tiny_dir, capsys):
    cfg_path = write_cfg(tiny_dir, run.parents[1])  # the same runs_dir and log.name as the fixture's
    before = snapshot(run)
    with pytest.raises(pipeline.Refused, match="already holds a run .*--resume.*--overwrite"):
        pipeline.main(["--config", str(cfg_path)])
    assert snapshot(run) == before

    (run / "my_notes.txt").write_text("keep")
    (run / "report.md").write_text("an old report of the old adapter")
    out = Path(pipeline.main(["--config", str(cfg_path), "--overwrite", "--train.steps", "1"]))
    assert out == run and "--overwrite: deleted the old run's adapter.safetensors" in capsys.readouterr().out
    assert (run / "my_notes.txt").read_text() == "keep"  # not ours: kept
    assert not (run / "report.md").exists()  # the old report no longer describes a different adapter
    assert (run / "adapter.safetensors").is_file()
    assert "steps: 1" in (run / "config.yaml").read_text()
    with pytest.raises(pipeline.Refused, match="drop --config, --overwrite"):
        pipeline.main(["--resume", str(run), "--overwrite"])


def test_a_second_process_on_the_same_run_folder_fails_at_once(tiny_dir, tmp_path):
    cfg_path = write_cfg(tiny_dir, tmp_path, "busy")
    folder = tmp_path / "runs" / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom adapters.run import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(folder)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(pipeline.Refused, match=f"in use by another process \\(pid {holder.pid}"):
            pipeline.main(["--config", str(cfg_path)])
        assert not folder.exists()  # the refused start wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: the folder is free again
    with RunLock(folder):
        pass
    assert not (tmp_path / "runs" / ".busy.lock").exists()


def test_run_names_stay_inside_runs_dir(tmp_path):
    for bad in ("../elsewhere", "/tmp/abs", "..", ".hidden"):
        with pytest.raises(pipeline.Refused, match="plain folder name"):
            pipeline.main(["--log.name", bad, "--log.runs_dir", str(tmp_path)])


def test_a_runs_dir_that_is_a_file_is_a_clear_error(tiny_dir, tmp_path):
    cfg_path = write_cfg(tiny_dir, tmp_path, "x")
    (tmp_path / "afile").write_text("")
    with pytest.raises(pipeline.Refused, match="log.runs_dir must be a writable folder"):
        pipeline.main(["--config", str(cfg_path), "--log.runs_dir", str(tmp_path / "afile")])


def test_recover_folder_finishes_a_swap_cut_short(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_folder(dest) as d:
        (d / "v").write_text("1")
    assert not (dest / COMPLETE).exists()  # the marker never stays in a finished folder
    # a kill between the renames: the old folder aside, the new complete one under its temporary name
    os.rename(dest, tmp_path / ".ckpt.old")
    new = tmp_path / ".ckpt.tmp.abc"
    new.mkdir()
    (new / "v").write_text("2")
    (new / COMPLETE).write_bytes(b"")
    half = tmp_path / ".ckpt.tmp.def"  # a half-written one from another kill: no marker
    half.mkdir()
    assert recover_folder(dest)
    assert (dest / "v").read_text() == "2" and not (dest / COMPLETE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # only the old folder: it is put back
    os.rename(dest, tmp_path / ".ckpt.old")
    assert recover_folder(dest) and (dest / "v").read_text() == "2"
    # a file where a folder goes is refused, not moved aside
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_folder(tmp_path / "ckpt" / "v"):
            pass
    assert not recover_folder(tmp_path / "none")  # nothing to recover


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_a_diverging_run_is_a_training_error_not_a_saved_run(tiny_dir, tmp_path, monkeypatch, where):
    import lightning as L
    import torch

    extra = ["--loss.w_contrast", "1e38"]  # the loss overflows
    if where == "weights":  # an optimiser step that leaves an inf in the adapter (as a huge lr would)
        extra = ["--train.checkpoint_every", "1"]
        step = L.LightningModule.optimizer_step

        def poisoned(self, *a, **k):
            step(self, *a, **k)
            with torch.no_grad():
                self.adapter.trainable_parameters()[0].view(-1)[0] = float("inf")

        monkeypatch.setattr(L.LightningModule, "optimizer_step", poisoned)
    cfg_path = write_cfg(tiny_dir, tmp_path, "diverge")
    what = "the loss is not finite at step 1" if where == "loss" else "the adapter's weights became non-finite at step 1"
    with pytest.raises(SystemExit, match=f"training error: {what}.*lower train.lr.*Nothing of this run's training"):
        pipeline.main(["--config", str(cfg_path), "--train.steps", "4", *extra])
    run = tmp_path / "runs" / "diverge"
    assert not (run / "adapter.safetensors").exists() and not (run / "checkpoint").exists()


def test_a_damaged_adapter_is_a_clear_error(run, tmp_path, capsys):
    import json
    import shutil
    import struct

    import torch
    from safetensors.torch import save_file

    from adapters.io import load_tensors

    def damaged(name: str, edit) -> Path:
        copy = tmp_path / name
        shutil.copytree(run, copy)
        edit(copy / "adapter.safetensors")
        return copy

    def flip_last_byte(p: Path):
        data = bytearray(p.read_bytes())
        data[-1] ^= 0x01
        p.write_bytes(bytes(data))

    def nan_without_hash(p: Path):  # NaN data in an otherwise well-formed file (no content hash)
        tensors, meta = load_tensors(p)
        meta.pop("sha256")
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, str(p), metadata={"meta": json.dumps(meta)})

    def truncate(p: Path):
        p.write_bytes(p.read_bytes()[:-100])

    def bad_settings(p: Path):  # the header's adapter settings edited by hand (same length)
        data = p.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = data[8:8 + n].replace(b'\\"alpha\\"', b'\\"alhpa\\"')
        assert header != data[8:8 + n]
        p.write_bytes(data[:8] + header + data[8 + n:])

    for name, edit, message in [("flipped", flip_last_byte, "do not match the content hash"),
                                ("nan", nan_without_hash, "non-finite values"),
                                ("truncated", truncate, "damaged or not a safetensors file"),
                                ("settings", bad_settings, "adapter settings in its header are damaged")]:
        folder = damaged(name, edit)
        assert cli.main(["generate", "--run", str(folder), "--max-new-tokens", "2", "hi"]) == 2, name
        assert message in capsys.readouterr().err, name


def test_a_full_disk_mid_run_says_so_and_keeps_the_last_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import errno

    from adapters import checkpoint

    save = checkpoint.save_tensors

    def full(path, tensors, meta):
        if meta.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(path, tensors, meta)

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    cfg_path = write_cfg(tiny_dir, tmp_path, "full")
    with pytest.raises(SystemExit, match=r"file system error: No space left on device \(.*adapter.safetensors\); "
                                         r"the last complete checkpoint is kept"):
        pipeline.main(["--config", str(cfg_path), "--train.steps", "6", "--train.checkpoint_every", "2"])
    run = tmp_path / "runs" / "full"
    assert yaml.safe_load((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (run / "adapter.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint")]


def test_non_finite_outputs_name_their_coefficient(tiny, tokenizer):
    import torch

    from adapters import export as ex
    from adapters.steer import generate
    from conftest import attach_random

    model, _ = tiny
    model, adapter = attach_random(model, "lora")
    with torch.no_grad():
        adapter.trainable_parameters()[1].fill_(float("nan"))  # as an overflow inside the adapter would
    assert set(generate(model, tokenizer, "hi", [0.0], max_new_tokens=2)) == {0.0}  # c = 0 is the base model
    with pytest.raises(ValueError, match=r"at coefficient \+2 the model's outputs are not finite"):
        generate(model, tokenizer, "hi", [0.0, 2.0], max_new_tokens=2)
    with pytest.raises(ex.ExportError, match=r"merged at coefficient \+2 the weights are not finite"):
        ex.merged_model(model, 2.0)


@pytest.mark.parametrize("what", ["adapter", "optimizer state", "base cache"])
def test_a_non_finite_checkpoint_is_refused_on_resume(tiny, tmp_path, what):
    """A checkpoint whose adapter, optimiser state or base cache holds NaN is refused with the
    part named, and the adapter being resumed is left as it was."""
    import torch

    from adapters.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from conftest import attach_random

    model, _ = tiny
    model, adapter = attach_random(model, "lora")
    params = adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    cache = {"model.layers.1.mean": torch.ones(4)}
    with torch.no_grad():
        if what == "adapter":
            params[0].view(-1)[0] = float("nan")
        elif what == "optimizer state":
            opt.state[params[0]]["exp_avg"].view(-1)[0] = float("nan")
        else:
            cache["model.layers.1.mean"][2] = float("nan")
    save_checkpoint(tmp_path, 2, adapter, opt, "fp", 0, cache)
    with torch.no_grad():
        params[0].zero_()
    before = {k: t.clone() for k, t in adapter.state_tensors().items()}
    with pytest.raises(CheckpointError, match=f"its {what} holds non-finite values .*start the run again"):
        load_checkpoint(tmp_path, adapter, "fp")
    assert all(torch.equal(before[k], t) for k, t in adapter.state_tensors().items())
