"""The libraries' expected messages, silenced one by one.

Each entry names the exact message and the module that emits it, and why it does not concern a
user of ours; nothing is silenced by category or module alone, so a new warning from the same
library still shows. ``install()`` runs at the start of every command (``python -m adapters``,
``train.py``); tests call it to check each entry against the message as the library writes it.
"""

from __future__ import annotations

import logging
import warnings

WARNINGS = (  # (message regex, category, module regex, why)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils",
     "peft reads the deprecated attribute while it wraps the model; nothing for a user to change"),
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning,  # PossibleUserWarning's base
     r"lightning\.pytorch\.loops\.fit_loop",
     "the base model is frozen and kept in eval mode on purpose (no dropout in the base model)"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree",
     "Lightning's own use of a torch API that torch deprecated"),
)

LOG_RECORDS = (  # (logger name, message start, why)
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional 4-bit CPU kernel that bitsandbytes downloads from the hub; offline it uses its own"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/",
     "the same optional kernel, looked up offline"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging",
     "an advertisement for another logger"),
)


class _Drop(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install() -> None:
    """Add the filters (again is harmless: neither kind is added twice)."""
    for message, category, module, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, start, _ in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in logger.filters):
            logger.addFilter(_Drop(start))


def progress(iterable, desc: str, total: int | None = None, unit: str = "batch"):
    """A progress bar on stderr for a long stage (tqdm, Lightning's own fallback bar): shown only
    on a terminal, and gone when the stage ends (its summary line stays)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)
