"""Report files of a sweep: markdown tables, CSV, JSON, the dose-response plot and the wandb
payload. ``md_table`` and ``csv_text`` are the one table writer (the evaluation, the sweep
command and ``compare`` use them)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes, atomic_write_text, write_json
from .metrics import SUMMARY_COLUMNS


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)      # one per method x probe x coefficient
    summary: list[dict] = field(default_factory=list)   # one per method x probe
    separation: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # behaviour completions shown in the report


def md_table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A markdown table's lines; ``align`` has one letter per column, l(eft) or r(ight) (default:
    the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def csv_text(rows: list[dict], columns) -> str:
    """CSV of ``rows`` with ``columns`` (missing keys and None as empty cells)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _fmt(x, nd=2) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _ranked(report: Report, probe: str) -> list[dict]:
    """Summary rows of one probe, best score first (NaN scores last)."""
    return sorted((r for r in report.summary if r["probe"] == probe),
                  key=lambda r: -(r["score"] if r["score"] == r["score"] else -1))


def markdown(report: Report, title: str = "Evaluation", rows: bool = True) -> str:
    """One table per probe, methods sorted by score; with ``rows`` also every coefficient."""
    lines = [f"# {title}", ""]
    for probe in dict.fromkeys(r["probe"] for r in report.summary):
        lines += [f"## {probe}", ""] + md_table(
            list(SUMMARY_COLUMNS), [[_fmt(r[c]) if c != "method" else r[c] for c in SUMMARY_COLUMNS]
                                    for r in _ranked(report, probe)])
        if rows:
            lines += [""] + md_table(
                ["method", "c", "mean y", "95% CI", "honest rate", "mass ratio", "ΔNLL", "valid"],
                [[r["method"], f"{r['coeff']:+g}", f"{r['mean_y']:+.2f}", f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
                  f"{r['honest_rate']:.2f}", f"{r['mass_ratio']:.2f}", f"{r['dnll']:+.3f}",
                  "yes" if r["valid"] else "NO"] + (["search"] if r.get("search") else [])
                 for r in report.rows if r["probe"] == probe], align="lrrrrrrl")
        lines.append("")
    if report.separation:
        lines += ["## Held-out pairs: projections on the reference directions (units of s_l, last token)", "",
                  "separation = (h_pos - h_neg)·v / s; shift = (h^c - h^0)·v / s over both members.", ""]
        lines += md_table(["method", "layer", "c", "separation", "agreement", "shift"],
                          [[r.get("method", "adapter"), r["layer"], f"{r['coeff']:+g}", f"{r['separation']:+.2f}",
                            f"{r['agreement']:.2f}", f"{r['shift']:+.2f}"] for r in report.separation], align="llrrrr")
        lines.append("")
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.examples:
        lines += ["## Behaviour targets (a few of the base model's own completions)", "",
                  "The behaviour terms train the adapter, without the persona in its input, towards what the "
                  "base model wrote with it.", ""]
        cell = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += md_table(["prompt", "positive persona", "negative persona"],
                          [[cell(e["user"] if not e["opening"] else e["opening"] + " …"),
                            cell(e["opening"] + e["chosen"]), cell(e["opening"] + e["rejected"])]
                           for e in report.examples], align="lll")
        lines.append("")
    lines += ["Validity: a coefficient is valid when the answer tokens keep at least half the probability "
              "mass they had at c = 0 (relative, because small models put little mass on any answer) and "
              "neutral-text ΔNLL is at most the configured bound. score = |slope|·r2·valid_frac².", ""]
    return "\n".join(lines)


def plot(report: Report, path: Path, top: int = 0, title: str = "") -> None:
    """y against c per method with the 95% intervals (invalid coefficients circled in black, one
    legend entry); with ``top`` only the best-scoring methods of each probe, plus prompting and
    base. Each panel's y-axis says what its probe's y is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..probes import Y_LABELS

    probes = list(dict.fromkeys(r["probe"] for r in report.rows))
    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 4.4), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        names = [r["method"] for r in _ranked(report, probe)]
        keep = set(names[:top] if top else names) | ({"prompting", "base"} & set(names))
        bad = []
        for method in (m for m in dict.fromkeys(r["method"] for r in report.rows) if m in keep):
            rs = [r for r in report.rows if r["probe"] == probe and r["method"] == method and not r.get("search")]
            c = np.array([r["coeff"] for r in rs])
            y = np.array([r["mean_y"] for r in rs])
            err = np.array([[r["mean_y"] - r["ci_low"] for r in rs], [r["ci_high"] - r["mean_y"] for r in rs]])
            ax.errorbar(c, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=method)
            bad += [r for r in rs if not r["valid"]]
        if bad:
            ax.scatter([r["coeff"] for r in bad], [r["mean_y"] for r in bad], s=110, facecolors="none",
                       edgecolors="black", linewidths=1.5, zorder=5, label="invalid c (answer mass or ΔNLL)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(probe)
        ax.set_xlabel("coefficient c")
        ax.set_ylabel(Y_LABELS.get(probe, "y"), fontsize=8)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report(report: Report, folder: str | Path, title: str = "Evaluation", plot_top: int = 0) -> dict[str, Path]:
    """report.md (tables), report.csv (the summary table), report_rows.csv (every coefficient),
    report.json (everything) and report.png (y against c), each written atomically."""
    folder = Path(folder)
    paths = {"md": folder / "report.md", "csv": folder / "report.csv", "rows_csv": folder / "report_rows.csv",
             "json": folder / "report.json", "png": folder / "report.png"}
    atomic_write_text(paths["md"], markdown(report, title))
    ranked = [r for probe in dict.fromkeys(r["probe"] for r in report.summary) for r in _ranked(report, probe)]
    atomic_write_text(paths["csv"], csv_text(ranked, ("probe",) + SUMMARY_COLUMNS))
    atomic_write_text(paths["rows_csv"], csv_text(report.rows, report.rows[0]))
    write_json(paths["json"], {"summary": report.summary, "rows": report.rows,
                               "separation": report.separation, "notes": report.notes, "examples": report.examples})
    plot(report, paths["png"], plot_top, title)
    return paths


def wandb_payload(report: Report, png: Path) -> dict:
    """The report as wandb objects: the summary table, every coefficient, and the plot."""
    import wandb

    cols = ["probe", *SUMMARY_COLUMNS]
    return {"eval/summary": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in report.summary]),
            "eval/rows": wandb.Table(columns=list(report.rows[0]), data=[list(r.values()) for r in report.rows]),
            "eval/plot": wandb.Image(str(png))}


def log_wandb(report: Report, paths: dict, project: str, name: str, mode: str, folder: Path) -> None:
    """Log a report as its own wandb run (offline / online) saved under ``folder``."""
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, name=name, dir=str(folder), mode=mode, job_type="eval")
    run.log(wandb_payload(report, paths["png"]))
    run.finish()

