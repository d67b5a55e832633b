"""Command line.

    python -m adapters generate --run runs/<name> --coeff -1 0 1 "prompt"
        generations at each coefficient, side by side (one column per coefficient)
    python -m adapters export --run runs/<name> --format merged|peft|gguf --out PATH [--coeff C]
        the adapter for serving (see adapters/export.py)
    python -m adapters compare --config configs/compare/kinds.yaml [--force]
        train several configs and tabulate them side by side (see adapters/compare.py)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap


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


def generate(model, tokenizer, prompt: str, coeffs: list[float], max_new_tokens: int = 48,
             system: str = "") -> dict[float, str]:
    import torch

    from .data import render
    from .steer import steer

    msgs_text = render(tokenizer, prompt, "", system)
    enc = tokenizer(msgs_text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    out = {}
    for c in coeffs:
        with steer(model, c), torch.no_grad():
            ids = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[c] = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate at several coefficients, side by side")
    g.add_argument("--run", required=True, help="run folder (runs/<name>)")
    g.add_argument("--coeff", type=float, nargs="+", default=[-1.0, 0.0, 1.0])
    g.add_argument("--max-new-tokens", type=int, default=48)
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
    c = sub.add_parser("compare", help="train several configs and compare them in one table")
    c.add_argument("--config", required=True, help="comparison config (e.g. configs/compare/kinds.yaml)")
    c.add_argument("--force", action="store_true", help="retrain runs that already finished")
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        from .compare import main as compare_main

        return compare_main(args)
    if args.cmd == "export":
        return export_main(args)

    from .run import RunError, load_run
    from .steer import CoefficientError, check_coeff

    try:
        for c in args.coeff:
            check_coeff(c)
        model, tok = load_run(args.run)
    except (RunError, CoefficientError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt in args.prompt:
        print(f"\n>>> {prompt}\n")
        print(side_by_side(generate(model, tok, prompt, args.coeff, args.max_new_tokens, args.system), args.width))
    return 0


def export_main(args) -> int:
    from . import export
    from .models import base_fingerprint
    from .run import RunError, load_run
    from .steer import CoefficientError, check_coeff

    try:
        check_coeff(args.coeff)
        model, tok = load_run(args.run)
        fp = base_fingerprint(model)
        if args.format == "merged":
            path = export.save_merged(model, tok, args.out, args.coeff, fingerprint=fp)
        elif args.format == "peft":
            from .config import load_config
            from pathlib import Path

            name = load_config(Path(args.run) / "config.yaml").model.name
            path = export.save_peft(model, args.out, fingerprint=fp, base_name=name)
        else:
            path = export.save_control_vector(model, args.out, args.coeff)
    except (RunError, CoefficientError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.format} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
