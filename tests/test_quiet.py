"""The libraries' expected messages are silenced one by one: each exact message from its own
module, and nothing else from that module or of that category."""

from __future__ import annotations

import logging
import warnings

from adapters import quiet


def _shown(emit, install: bool = True) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if install:
            quiet.install()
        emit()
    return [str(w.message) for w in seen]


def test_the_real_library_warnings_are_silenced(tiny):
    from lightning.pytorch.utilities._pytree import _tree_flatten

    model, _ = tiny
    for emit in (lambda: model.is_gradient_checkpointing, lambda: _tree_flatten(1.0)):  # peft's trigger, Lightning's
        assert len(_shown(emit, install=False)) == 1
        assert _shown(emit) == []
    # the same category from our code, and another message from the same module, still show
    assert _shown(lambda: warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)) != []
    other = "`use_cache=True` is incompatible with gradient checkpointing"
    assert _shown(lambda: warnings.warn_explicit(other, FutureWarning, "modeling_utils.py", 1,
                                                 module="transformers.modeling_utils")) == [other]


def test_every_entry_drops_its_message_and_only_it(caplog):
    for message, category, module, why in quiet.WARNINGS:
        assert why
        text = {r"`is_gradient_checkpointing` is deprecated": "`is_gradient_checkpointing` is deprecated and will "
                "be removed in v6. Use `is_activation_checkpointing` instead.",
                r"Found \d+ module\(s\) in eval mode at the start of training": "Found 397 module(s) in eval mode "
                "at the start of training. This may lead to unexpected behavior during training.",
                r"`isinstance\(treespec, LeafSpec\)` is deprecated": "`isinstance(treespec, LeafSpec)` is "
                "deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."}[message]
        mod = module.replace("\\", "")
        assert _shown(lambda: warnings.warn_explicit(text, category, "f.py", 1, module=mod)) == []
        assert _shown(lambda: warnings.warn_explicit("something else", category, "f.py", 1, module=mod)) != []
        assert _shown(lambda: warnings.warn_explicit(text, category, "f.py", 1, module="adapters.module")) != []
    quiet.install()
    quiet.install()  # twice: one filter per logger and message
    for name, start, why in quiet.LOG_RECORDS:
        assert why and sum(isinstance(f, quiet._Drop) for f in logging.getLogger(name).filters) == 1
        caplog.clear()
        with caplog.at_level(logging.INFO):
            logging.getLogger(name).warning(start + " and the rest of the message: %s", "detail")
            logging.getLogger(name).warning("another message")
        assert [r.getMessage() for r in caplog.records] == ["another message"]


def _in_a_terminal(cmd: list[str], cwd, timeout: float = 300, env=None) -> str:
    """What ``cmd`` writes to a 120-column pseudo-terminal (stdout and stderr)."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdout=child, stderr=child, cwd=cwd, env=env)
    os.close(child)
    out = b""
    while select.select([main], [], [], timeout)[0]:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    proc.wait(timeout=60)
    os.close(main)
    return out.decode(errors="replace")


def test_every_long_stage_shows_a_progress_bar_in_a_terminal(tiny_dir, tmp_path):
    """The directions, behaviour completions, the teacher and the evaluation each draw a bar on a terminal (and
    none where the output is not a terminal: the tests' own captured runs)."""
    import os
    import re
    import sys
    from pathlib import Path

    import yaml

    from conftest import tiny_config

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(tiny_dir, tmp_path / "runs", "lora")))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CONTRASTIVE_ADAPTERS_CACHE": str(tmp_path / "cache")}  # nothing cached: every stage runs
    out = _in_a_terminal([sys.executable, str(root / "train.py"), "--config", str(tmp_path / "tiny.yaml")], root,
                         env=env)
    assert "done in" in out, out[-2000:]
    for stage in ("directions", "behaviour completions", "behaviour teacher", "evaluation"):
        assert re.search(rf"{stage}:\s+\d+%", out), f"no bar for {stage}"


def test_quiet_and_verbose_flags(tiny_dir, tmp_path, capsys, caplog):
    """Messages go through logging: -q leaves only the result line (and warnings, on stderr);
    -v shows the stages' progress, the plan, the resolved config and Lightning's device lines,
    which the default level hides."""
    import yaml

    from adapters import pipeline
    from conftest import tiny_config

    cfg = tiny_config(tiny_dir, tmp_path / "runs", "lora")
    cfg["eval"]["enabled"] = False
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    outs, device_lines = {}, {}
    for flag in ("-q", "-v"):
        caplog.clear()
        pipeline.main(["--config", str(path), "--log.name", f"run{flag}", flag])
        outs[flag] = capsys.readouterr()
        device_lines[flag] = [r for r in caplog.records if r.getMessage().startswith("GPU available")]
    q, v = outs["-q"].out, outs["-v"].out
    assert len(q.strip().splitlines()) == 1 and q.startswith("done in") and not device_lines["-q"]
    assert "warning: adapter layers [3] come after the last loss layer" in outs["-q"].err  # still shown
    assert "run folder:" in v and "loss layer" in v and "trained 2 steps" in v and "config:" in v
    assert "machine: " in v and "plan: 2 training steps of the lora adapter" in v and device_lines["-v"]
    quiet.configure(0)
    assert all(logging.getLogger(name).level == logging.WARNING for name in quiet.LIBRARY_INFO)
    assert quiet.log.level == logging.INFO and quiet.BARS["on"]


def test_the_plan_of_the_main_job_is_its_reference_run():
    """At the reference machine's speed, the plan of configs/honesty.yaml gives back the stage
    times the reference run measured: the work units count what that run did."""
    import re
    from pathlib import Path

    from adapters.config import load_config
    from adapters.plan import REFERENCE, lines

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "honesty.yaml")
    got = lines(cfg, 390, 118, 0, speed=1.0)[:-1]  # the last line is the total
    seconds = [float(re.search(r"~([\d.]+) (s|min)$", line).group(1)) * (60 if line.endswith("min") else 1)
               for line in got]
    want = [REFERENCE["seconds"][k] for k in ("directions", "behaviour", "fit", "evaluate")]
    assert len(got) == 4 and all(abs(a - b) <= 30 for a, b in zip(seconds, want)), (got, want)
    assert lines(cfg, 390, 118, 118, speed=1.0)[1].endswith("from the cache")
    cfg.eval.baselines = cfg.eval.baselines + ["repeng"]  # a peer: trained, then swept
    with_peer = float(re.search(r"~([\d.]+) min$", lines(cfg, 390, 118, 0, speed=1.0)[3]).group(1)) * 60
    assert abs(with_peer - seconds[3] - REFERENCE["seconds"]["peer"]) <= 10, (with_peer, seconds[3])
