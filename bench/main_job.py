"""Wall time and peak memory of the default main job (``make demo``) on this machine.

    python bench/main_job.py [--config configs/honesty.yaml] [-- extra train.py overrides]

Runs ``train.py`` in a child process exactly as ``make demo`` does (into a temporary runs
folder, wandb offline), and prints the wall time, the child's peak resident memory
(getrusage), and the phases from the run's timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.plan import machine_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "honesty.yaml"))
    ap.add_argument("overrides", nargs="*", help="extra train.py arguments, e.g. --train.steps 10")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--log.runs_dir", tmp,
               "--log.name", "main-job", *args.overrides]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
        timing = json.loads((Path(tmp) / "main-job" / "timing.json").read_text())
    print(machine_line(timing.get("dtype")))
    print(f"main job ({Path(args.config).name} {' '.join(args.overrides)}): wall {wall:.0f} s, "
          f"peak RSS {peak_mib:,.0f} MiB")
    print(f"  train.py {timing['seconds']:.0f} s: fit {timing['fit_seconds']:.0f} s "
          f"({timing['step_seconds']:.2f} s/step), evaluation {timing['eval_seconds']:.0f} s, "
          f"rest (imports, model load, directions, save) "
          f"{timing['seconds'] - timing['fit_seconds'] - timing['eval_seconds']:.0f} s")
    if timing.get("stages"):
        print("  stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing["stages"].items()))


if __name__ == "__main__":
    main()
