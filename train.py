"""Train a signed contrastive adapter, then evaluate it against baselines.

Usage:
    python train.py --config configs/honesty.yaml
    python train.py --config configs/honesty.yaml --train.steps 40 --log.name quick
    python train.py --config configs/additive.yaml --adapter.depth '[0.5, 0.9]'
    python train.py --resume runs/honesty      # continue an interrupted run from its checkpoint

The same command is installed as ``python -m adapters train``. The pipeline (inputs checked,
base model, reference directions and loss layers, behaviour targets, adapter, Lightning fit,
save, dose-response evaluation, report) is ``adapters/pipeline.py``; everything lands in
runs/<name>/. Bad input stops before any work with a message on stderr and exit status 2.
"""

import sys

from adapters.pipeline import Refused, cli, main  # noqa: F401  (main: the pipeline for in-process callers)

if __name__ == "__main__":
    sys.exit(cli())
