"""Command line.

    python -m adapters train --config configs/honesty.yaml [--section.key VALUE ...] [--resume RUN] [--overwrite]
        train and evaluate one run (what train.py does; see adapters/pipeline.py)
    python -m adapters generate --run runs/<name> --coeff -1 0 1 "prompt"
        generations at each coefficient, side by side (one column per coefficient)
    python -m adapters export --run runs/<name> --format merged|peft|gguf --out PATH [--coeff C]
        the adapter for serving (see adapters/export.py)
    python -m adapters compare --config configs/compare/kinds.yaml [--force]
        train several configs (and seeds) and tabulate them side by side (see adapters/compare.py)
    python -m adapters eval --run runs/<name> [--questions FILE] [--probes ...] [--coeffs ...] [--out DIR]
        the dose-response evaluation of a trained run against the baselines (adapters/evaluate/)
    python -m adapters serve --run runs/<name> [--host 127.0.0.1] [--port 7860]
        a steering playground in the browser (adapters/serve.py; pip install -e ".[app]")
    python -m adapters push --run runs/<name> --repo user/name
        upload a run folder to the Hugging Face Hub (adapters/hub.py); serve, generate and export take
        --run user/name
    python -m adapters sweep --config configs/sweep/layer_types.yaml [--force]
        steering vectors over direction methods x layer types, one table (see adapters/sweep.py)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from .quiet import add_flags, log


def side_by_side(texts: dict[float, str], width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((160, 40)).columns
    col = max(20, (width - 3 * (len(texts) - 1)) // len(texts))
    cols = [[f"c = {c:+g}", "-" * col] + textwrap.wrap(t.replace("\n", " ") or "(empty)", col)
            for c, t in texts.items()]
    rows = max(len(c) for c in cols)
    lines = []
    for i in range(rows):
        lines.append(" | ".join((c[i] if i < len(c) else "").ljust(col) for c in cols).rstrip())
    return "\n".join(lines)


COEFF_FLAGS = ("--coeff", "--coeffs")


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def join_numbers(argv: list[str]) -> list[str]:
    """``--coeff -1 0 1 "prompt"`` -> ``--coeff=-1,0,1 "prompt"``: the numbers after a coefficient
    flag (negative and exponent forms such as -1e3 included) are its values and the first other
    word ends them, so a prompt after the flag is a prompt, and -1e300 is a number, not an option."""
    out, i = [], 0
    while i < len(argv):
        word, i = argv[i], i + 1
        if word in COEFF_FLAGS:
            values = []
            while i < len(argv) and _is_number(argv[i]):
                values.append(argv[i])
                i += 1
            word = f"{word}={','.join(values)}"
        out.append(word)
    return out


def number_list(text: str) -> list[float]:
    if not text:
        raise argparse.ArgumentTypeError("expected at least one number")
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    """Every command but ``train`` (which has the pipeline's own parser: adapters/pipeline.py)."""
    ap = argparse.ArgumentParser(prog="python -m adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", add_help=False, help="train and evaluate one run (python -m adapters train --help)")
    g = sub.add_parser("generate", help="generate at several coefficients, side by side")
    g.add_argument("--run", required=True, help="run folder (runs/<name>)")
    g.add_argument("--coeff", type=number_list, default=[-1.0, 0.0, 1.0], metavar="C [C ...]",
                   help="coefficients, one column each (default -1 0 1)")
    g.add_argument("--max-new-tokens", type=positive_int, default=48)
    g.add_argument("--system", default="", help="optional system prompt")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("prompt", nargs="+")
    e = sub.add_parser("export", help="export a run's adapter for serving")
    e.add_argument("--run", required=True, help="run folder (runs/<name>)")
    e.add_argument("--format", required=True, choices=["merged", "peft", "gguf"],
                   help="merged: full model at --coeff; peft: peft adapter folder (LoRA: scale = coefficient); "
                        "gguf: llama.cpp control vector (additive adapters)")
    e.add_argument("--out", required=True, help="output folder (merged, peft) or .gguf file")
    e.add_argument("--coeff", type=float, default=1.0, help="coefficient for merged / gguf (default 1)")
    e.add_argument("--force", action="store_true",
                   help="replace an earlier export at --out (never a run folder or files an export did not write)")
    c = sub.add_parser("compare", help="train several configs and compare them in one table")
    c.add_argument("--config", required=True, help="comparison config (e.g. configs/compare/kinds.yaml)")
    c.add_argument("--force", action="store_true", help="retrain runs that already finished")
    v = sub.add_parser("eval", help="evaluate a trained run against the baselines over a coefficient sweep")
    v.add_argument("--run", required=True, help="run folder (runs/<name>)")
    v.add_argument("--questions", default=None,
                   help="your own yes/no questions (.jsonl or .csv with fields question, honest: Yes|No); "
                        "evaluated as the yes_no probe instead of the built-in probes")
    v.add_argument("--probes", nargs="+", default=None, help="probe kinds (default: the run's eval.probes)")
    v.add_argument("--coeffs", type=number_list, default=None, metavar="C [C ...]",
                   help="coefficients (default: the run's)")
    v.add_argument("--baselines", nargs="*", default=None, help="baselines (default: the run's eval.baselines)")
    v.add_argument("--out", default=None, help="report folder (default: <run>/eval)")
    s = sub.add_parser("serve", help="a steering playground in the browser (Gradio; pip install -e \".[app]\")")
    s.add_argument("--run", required=True, help="run folder, a folder of runs (a compare output) or a Hub repo id")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=positive_int, default=7860)
    s.add_argument("--max-new-tokens", type=positive_int, default=256, help="the most a request may generate")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default=None, help="model dtype (default: the run's)")
    p = sub.add_parser("push", help="upload a run folder to the Hugging Face Hub")
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--repo", required=True, help="Hub model repo id: user/name (created when it does not exist)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`'s)")
    w = sub.add_parser("sweep", help="steering vectors over direction methods x layer types")
    w.add_argument("--config", required=True, help="sweep config (e.g. configs/sweep/layer_types.yaml)")
    w.add_argument("--force", action="store_true", help="recompute layer types already in <out>/parts")
    for name, command in sub.choices.items():
        if name != "train":  # train.py's own parser has them
            add_flags(command)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .quiet import configure, install, verbosity

    install()  # the libraries' expected warnings, one by one (adapters/quiet.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own parser: config keys are overrides (--section.key VALUE)
        from .pipeline import cli

        return cli(argv[1:])
    args = parser().parse_args(join_numbers(argv))
    configure(verbosity(args))
    if args.cmd == "sweep":
        from .sweep import main as sweep_main

        return sweep_main(args)
    if args.cmd == "compare":
        from .compare import main as compare_main

        return compare_main(args)
    from .errors import UserError

    try:
        return {"eval": eval_main, "export": export_main, "generate": generate_main, "serve": serve_main,
                "push": push_main}[args.cmd](args)
    except UserError as e:  # bad input, caught once for these commands; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2


def generate_main(args) -> int:
    from .pipeline import load_run
    from .steer import check_coeff, generate

    for c in args.coeff:
        check_coeff(c)
    model, tok = load_run(args.run)
    for prompt in args.prompt:
        texts = generate(model, tok, prompt, args.coeff, args.max_new_tokens, args.system)
        print(f"\n>>> {prompt}\n")
        print(side_by_side(texts, args.width))
    return 0


def serve_main(args) -> int:
    from .serve import main as serve

    return serve(args)


def push_main(args) -> int:
    from .hub import push

    url = push(args.run, args.repo, private=args.private, token=args.token)
    print(f"pushed {args.run} to {args.repo}: {url}")
    return 0


def export_main(args) -> int:
    from pathlib import Path

    from . import export
    from .models import base_fingerprint
    from .pipeline import load_run
    from .run import resolve
    from .steer import check_coeff

    check_coeff(args.coeff)
    args.run = str(resolve(args.run))  # a Hub repo id: its snapshot
    out = Path(args.out).expanduser().resolve()  # checked before the model loads
    if out == Path(args.run).resolve() or out in Path(args.run).resolve().parents:
        raise export.ExportError(f"--out {args.out} is the run folder {args.run} or holds it; export elsewhere")
    out = export.check_destination(out, args.force, folder=args.format != "gguf")
    model, tok = load_run(args.run)
    fp = base_fingerprint(model)
    if args.format == "merged":
        path = export.save_merged(model, tok, out, args.coeff, fingerprint=fp, force=args.force, run=args.run)
    elif args.format == "peft":
        from .config import load_config
        from .models import hub_id

        name = hub_id(load_config(Path(args.run) / "config.yaml").model.name)
        path = export.save_peft(model, out, fingerprint=fp, base_name=name, force=args.force, run=args.run)
    else:
        path = export.save_control_vector(model, out, args.coeff, force=args.force)
    print(f"exported {args.format} to {path}")
    return 0


def eval_main(args) -> int:
    from pathlib import Path

    from .config import ConfigError, load_config, overrides_from
    from .directions import Directions
    from .evaluate.report import log_wandb, markdown, write_report
    from .evaluate.sweep import evaluate_run
    from .inputs import check_inputs
    from .pipeline import load
    from .probes import load_probe
    from .run import RunError

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run} is not a run folder (no config.yaml)")
    if args.questions and args.probes:
        raise ConfigError("--questions evaluates your file as the yes_no probe; drop --probes")
    given = {"eval.enabled": True, "eval.yes_no": args.questions, "eval.probes": ["yes_no"] if args.questions
             else args.probes, "eval.coeffs": args.coeffs, "eval.baselines": args.baselines}
    over = overrides_from({k: v for k, v in given.items() if v is not None})
    cfg = load_config(run / "config.yaml", over)
    train_pairs, val_pairs = check_inputs(cfg)  # every input file checked before the model loads
    loaded = load(run)
    model, tok = loaded.model, loaded.tokenizer
    directions = Directions.load(run, loaded.fingerprint)
    probes = [load_probe(k, cfg.eval, tok) for k in cfg.eval.probes]
    report = evaluate_run(model, tok, directions, train_pairs, val_pairs, cfg, probes)
    loaded.checksum.verify(model, "after evaluation")
    out = Path(args.out) if args.out else run / "eval"
    title = f"Evaluation of {run.name}" + (f" on {args.questions}" if args.questions else "")
    paths = write_report(report, out, title=title)
    if cfg.log.wandb != "disabled":
        log_wandb(report, paths, cfg.log.project, f"{run.name}-eval", cfg.log.wandb, out)
    log.info(markdown(report, title=title, rows=False))
    print(f"wrote {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
