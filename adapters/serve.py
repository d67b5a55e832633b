"""``python -m adapters serve --run runs/<name>``: a steering playground in the browser (Gradio).

    pip install -e ".[app]"
    python -m adapters serve --run runs/honesty [--host 127.0.0.1] [--port 7860]

The run (a run folder, a folder of runs such as a ``compare`` output, or a Hub repo id) is
checked and its model loaded before the server starts. The page offers a prompt (chat template
applied), a coefficient slider over -4..4, a side-by-side view that generates at several
coefficients in one batched call where the adapter kind allows it (``steer.stream``), tokens
streaming as they come, and the run's report (dose-response plot and table) on a second tab.
One request runs at a time (the model is shared); the others wait in Gradio's queue.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import os
import re
import socket
import threading
import time
from pathlib import Path

import torch

from .quiet import log
from .run import RunError, is_finished, resolve

COEFF_RANGE = 4.0
MAX_COLUMNS = 8
SIDE_BY_SIDE = "-2 -1 0 1 2"


def find_runs(source: str | Path) -> dict[str, Path]:
    """name -> folder of every finished run at ``source``: the run folder itself, or the finished
    runs one level below it (a ``compare`` output). A Hub repo id is downloaded first."""
    folder = resolve(source)
    name = str(source) if folder != Path(source).expanduser() else folder.name  # a Hub snapshot: its repo id
    if not folder.is_dir():
        raise RunError(f"{source} is not a folder: give a run folder (runs/<name>), a folder of runs or a Hub repo id")
    if is_finished(folder):
        return {name: folder}
    runs = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and is_finished(p)}
    if not runs:
        raise RunError(f"{source} holds no finished run (a run folder has config.yaml and adapter.safetensors); "
                       "train one first: python train.py --config configs/honesty.yaml")
    return runs


def parse_coeffs(text: str) -> list[float]:
    """'-2 -1 0 1 2' (spaces or commas) -> coefficients, each checked (finite, |c| <= the slider's range)."""
    from .steer import check_coeff

    words = [w for w in re.split(r"[\s,]+", text.strip()) if w]
    if not words or len(words) > MAX_COLUMNS:
        raise ValueError(f"give 1 to {MAX_COLUMNS} coefficients, separated by spaces, e.g. {SIDE_BY_SIDE}")
    try:
        coeffs = [float(w) for w in words]
    except ValueError:
        raise ValueError(f"coefficients must be numbers, got {text!r}") from None
    if any(abs(c) > COEFF_RANGE for c in coeffs if math.isfinite(c)):
        raise ValueError(f"coefficients lie within ±{COEFF_RANGE:g} here (the playground's range)")
    coeffs = [float(check_coeff(c)) for c in coeffs]  # NaN, inf
    return list(dict.fromkeys(coeffs))


class Runs:
    """The runs on offer; one is loaded at a time (loading another frees the last)."""

    def __init__(self, runs: dict[str, Path], device: str = "auto", dtype: str | None = None):
        self.folders, self.device, self.dtype = runs, device, dtype
        self.lock = threading.Lock()
        self.name, self.run = None, None

    def get(self, name: str):
        if name not in self.folders:
            raise RunError(f"no run named {name!r} here (runs: {', '.join(self.folders)})")
        with self.lock:
            if name != self.name:
                from .pipeline import load

                self.name, self.run = None, None  # the last model goes before the next loads (adapter and
                gc.collect()  # model refer to each other: only the collector frees them)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.run, self.name = load(self.folders[name], self.device, self.dtype), name
            return self.run

    def describe(self, name: str) -> str:
        run = self.get(name)
        from .models import hub_id

        a = run.adapter
        batched = "one batched call" if a.per_example else "one call per coefficient"
        return (f"**{name}** · {a.kind} adapter on `{hub_id(run.cfg.model.name)}` · "
                f"pairs `{run.cfg.data.pairs}` · side by side: {batched}")

    def report(self, name: str):
        """(the plot as an image or None, the report's markdown): the run's own, else its eval/ one."""
        folder = self.folders[name]
        where = next((f for f in (folder, folder / "eval") if (f / "report.md").is_file()), None)
        if where is None:
            return None, ("This run has no evaluation report. Evaluate it with `python -m adapters eval --run "
                          f"{folder}` (a Hub run: add `--out <folder>`).")
        png = where / "report.png"
        if png.is_file():
            from PIL import Image

            with Image.open(png) as im:  # the pixels, not a path: Gradio serves files only from its allowed folders
                png = im.copy()
        return (png if not isinstance(png, Path) else None), (where / "report.md").read_text()


class _Handlers:
    """What the page's events call: streamed generations and the run's report, errors as the page's messages."""

    def __init__(self, runs: Runs):
        self.runs = runs

    def single(self, name, prompt, system, c, n):
        import gradio as gr

        c = round(float(c), 2)  # the slider's steps of 0.1 arrive as 0.30000000000000004
        for texts, status in _generate(self.runs, name, prompt, system, [c], n):
            yield gr.update(value=texts[c], label=f"output at c = {c:+g}"), status

    def side_by_side(self, name, prompt, system, text, n):
        import gradio as gr

        try:
            coeffs = parse_coeffs(text)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        hidden = [gr.update(value="", visible=False)] * (MAX_COLUMNS - len(coeffs))
        for texts, status in _generate(self.runs, name, prompt, system, coeffs, n):
            yield [gr.update(value=texts[c], label=f"c = {c:+g}", visible=True) for c in coeffs] + hidden + [status]

    def show(self, name):
        import gradio as gr

        from .errors import UserError

        try:
            png, md = self.runs.report(name)
            return self.runs.describe(name), png, md
        except UserError as e:
            raise gr.Error(str(e)) from None


def build(runs: Runs, max_new_tokens: int = 256):
    """The Gradio app (``gr.Blocks``) over ``runs``."""
    import gradio as gr

    names, on = list(runs.folders), _Handlers(runs)
    with gr.Blocks(title="contrastive-adapters playground") as app:
        gr.Markdown("## contrastive-adapters · steering playground")
        pick = gr.Dropdown(names, value=names[0], label="run", visible=len(names) > 1, elem_id="run")
        about = gr.Markdown(elem_id="about")
        with gr.Tab("Steer"):
            prompt = gr.Textbox(label="prompt", lines=3, elem_id="prompt",
                                placeholder="Ask the model something; the chat template is applied.")
            with gr.Accordion("system prompt", open=False):
                system = gr.Textbox(label="system prompt (optional)", elem_id="system")
            with gr.Row():
                coeff = gr.Slider(-COEFF_RANGE, COEFF_RANGE, value=1.0, step=0.1, label="coefficient c",
                                  elem_id="coeff", info="+ towards the positive persona, - away, 0 = the base model")
                tokens = gr.Slider(1, max(2, max_new_tokens), value=min(48, max_new_tokens), step=1,
                                   label="max new tokens", elem_id="tokens")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            status = gr.Markdown(elem_id="status")
            out = gr.Textbox(label="output", lines=5, interactive=False, elem_id="output")
            with gr.Row():
                coeffs = gr.Textbox(SIDE_BY_SIDE, label="side-by-side coefficients", elem_id="coeffs", scale=3)
                side = gr.Button("Side by side", elem_id="side-by-side", scale=1)
            with gr.Row():
                cols = [gr.Textbox(label=f"c = {c}", lines=8, interactive=False, elem_id=f"side-{i}",
                                   visible=i < len(SIDE_BY_SIDE.split()))
                        for i, c in enumerate(SIDE_BY_SIDE.split() + [""] * (MAX_COLUMNS - len(SIDE_BY_SIDE.split())))]
        with gr.Tab("Report"):
            plot = gr.Image(label="dose-response", type="pil", interactive=False, elem_id="plot")
            table = gr.Markdown(elem_id="report")
        one = {"concurrency_id": "model", "concurrency_limit": 1}  # every listener: one request at a time
        go.click(on.single, [pick, prompt, system, coeff, tokens], [out, status], **one)
        prompt.submit(on.single, [pick, prompt, system, coeff, tokens], [out, status], **one)
        side.click(on.side_by_side, [pick, prompt, system, coeffs, tokens], [*cols, status], **one)
        pick.change(on.show, pick, [about, plot, table], **one)
        app.load(on.show, pick, [about, plot, table], **one)
    return app


def _generate(runs: Runs, name: str, prompt: str, system: str, coeffs: list[float], n):
    """(texts so far, status line) after every token; bad input and unusable coefficients as the
    page's error message."""
    import gradio as gr

    from .errors import UserError
    from .steer import stream

    if not prompt.strip():
        raise gr.Error("type a prompt first")
    t0, texts, steps = time.time(), {c: "" for c in coeffs}, 0
    try:
        run = runs.get(name)
        for steps, texts in enumerate(stream(run.model, run.tokenizer, prompt, coeffs, int(n), system), 1):
            yield texts, f"generating… {steps} tokens"
    except (UserError, ValueError) as e:
        raise gr.Error(str(e)) from None
    yield texts, f"done in {time.time() - t0:.1f} s ({len(coeffs)} coefficient{'s' * (len(coeffs) > 1)})"


def main(args) -> int:
    """``python -m adapters serve``: runs checked and the first one loaded, then the server until Ctrl+C."""
    launch(args.run, args.host, args.port, args.max_new_tokens, args.device, args.dtype)
    return 0


def launch(source: str | Path, host: str = "127.0.0.1", port: int = 7860, max_new_tokens: int = 256,
           device: str = "auto", dtype: str | None = None, block: bool = True):
    """Check the runs at ``source`` and load the first (errors come before the server starts),
    then serve the app; with ``block=False`` return it running (``app.close()`` stops it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local playground
    if importlib.util.find_spec("gradio") is None:
        raise RunError('the playground needs Gradio: pip install -e ".[app]"')
    with socket.socket() as probe:  # a taken port is the user's to change, before minutes of loading
        try:
            probe.bind((host, port))
        except OSError as e:
            raise RunError(f"cannot serve on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    runs = Runs(find_runs(source), device, dtype)
    first = next(iter(runs.folders))
    log.info(f"loading {first} ({len(runs.folders)} run{'s' * (len(runs.folders) > 1)} on offer)")
    runs.get(first)
    app = build(runs, max_new_tokens)
    app.queue(default_concurrency_limit=1, max_size=32)  # one generation at a time: the model is shared
    print(f"playground on http://{host}:{port}" + (" (Ctrl+C stops it)" if block else ""))
    app.launch(server_name=host, server_port=port, quiet=True, show_error=True, prevent_thread_lock=not block)
    return app
