"""The terminal: our messages through ``logging`` at levels, the libraries' expected messages
silenced one by one, and progress bars.

Messages go to the ``adapters`` logger (``log``): progress (the report included) at INFO on
stdout, warnings and errors on stderr with their level in front; a library user gets them
at INFO without calling anything. ``configure(verbosity)`` is the command line's -q / -v: -q
shows warnings and errors only, and no progress bars; -v adds our DEBUG detail (the resolved
config, cache files) and the libraries' INFO lines (Lightning's device lines). A command's last
line (where the run was saved, what was written) is printed, whatever the verbosity.

Each entry names the exact message and the module that emits it, and why it does not concern a
user of ours; nothing is silenced by category or module alone, so a new warning from the same
library still shows. ``install()`` runs at the start of every command (``python -m adapters``,
``train.py``); tests call it to check each entry against the message as the library writes it.
"""

from __future__ import annotations

import logging
import sys
import warnings

log = logging.getLogger("adapters")
BARS = {"on": True}
"""Progress bars are shown (on a terminal) unless -q turned them off."""

LIBRARY_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""Loggers whose INFO lines ('GPU available: False, used: False', '`Trainer.fit` stopped') show only with -v."""

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


class _Console(logging.Handler):
    """One plain line per message: INFO and DEBUG on stdout, WARNING and above on stderr as
    'warning: ...'. The stream is looked up at every message (pytest swaps sys.stdout)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                print(f"{record.levelname.lower()}: {text}", file=sys.stderr, flush=True)
            else:
                print(text, flush=True)
        except Exception:  # as logging.StreamHandler does: a broken stream never breaks the run
            self.handleError(record)


def _console(level: int) -> None:
    """Our handler on the ``adapters`` logger (once), at ``level``."""
    if not any(isinstance(h, _Console) for h in log.handlers):
        log.addHandler(_Console())
    log.propagate = False
    log.setLevel(level)


def configure(verbosity: int = 0) -> None:
    """-q (verbosity < 0), default (0) or -v (> 0); calling it again replaces the setting."""
    _console(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    for name in LIBRARY_INFO:
        logging.getLogger(name).setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    BARS["on"] = verbosity >= 0
    try:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if BARS["on"] else hf_logging.disable_progress_bar)()
    except ImportError:
        pass


_console(logging.INFO)  # the messages' default, for library use as for the commands


def add_flags(parser) -> None:
    """-q / -v on a command's argparse parser (read back with ``verbosity(args)``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also debug detail (cache files) and the libraries' info lines")


def verbosity(args) -> int:
    return -1 if getattr(args, "quiet", False) else 1 if getattr(args, "verbose", False) else 0


def progress(iterable, desc: str, total: int | None = None, unit: str = "batch"):
    """A progress bar on stderr for a long stage (tqdm, Lightning's own fallback bar): shown only
    on a terminal, and gone when the stage ends (its summary line stays)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if BARS["on"] else True, leave=False,
                dynamic_ncols=True)
