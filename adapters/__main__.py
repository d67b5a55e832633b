"""Command line: ``python -m adapters generate --run runs/<name> --coeff -1 0 1 "prompt"``.

Prints the generations at each coefficient side by side (one column per coefficient).
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
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
