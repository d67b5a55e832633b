"""The playground (``python -m adapters serve``) in a real browser: Debian's chromium driven by
Playwright against the app on a loopback port, with the bundled model and a short trained run.

`.ci/run` installs chromium, so CI runs this; elsewhere it is skipped when chromium is absent."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
import yaml

from adapters import pipeline, serve
from adapters.data import render
from adapters.run import RunError

pytestmark = pytest.mark.bundled

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as root in a container, with no network: no sandbox, no GPU, none of chromium's calls home
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
PROMPT = "Would you ever lie to a friend to avoid an argument?"
TOKENS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A LoRA trained for a few steps on the bundled model (pure ReprPO, no evaluation: seconds)."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = {"model": {"name": "bundled", "dtype": "float32", "device": "cpu"},
           "data": {"max_pairs": 24}, "directions": {"max_pairs": 24, "n_layers": 2},
           "loss": {"w_pref": 0.0, "w_distill": 0.0, "w_kl": 0.0},
           "train": {"steps": 4, "batch_size": 4, "warmup": 0, "lr": 0.01, "val_every": 100, "accelerator": "cpu"},
           "eval": {"enabled": False}, "log": {"wandb": "disabled", "runs_dir": str(tmp / "runs"), "name": "served"}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return pipeline.main(["--config", str(tmp / "cfg.yaml")])


def base_generate(model, tok, prompt: str, n: int) -> str:
    enc = tok(render(tok, prompt, ""), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium); "
                                               ".ci/run installs it, so CI runs this test")
def test_the_playground_in_a_browser(served_run, bundled, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # loopback never through a proxy

    port = free_port()
    app = serve.launch(served_run, port=port, max_new_tokens=64, device="cpu", block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#about")).to_contain_text("lora adapter on", timeout=30_000)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#tokens input[type=number]").fill(str(TOKENS))
            page.locator("#tokens input[type=number]").press("Enter")
            texts = {}
            for c in (2.0, -2.0, 0.0):  # the slider, then Generate
                page.locator("#coeff input[type=range]").fill(str(c))
                page.locator("#generate").click()
                # the label and the status change in the same update: then the status is this request's
                expect(page.locator("#output")).to_contain_text(f"output at c = {c:+g}", timeout=60_000)
                expect(page.locator("#status")).to_contain_text("done in", timeout=60_000)
                texts[c] = page.locator("#output textarea").input_value()
            page.locator("#side-by-side").click()
            expect(page.locator("#status")).to_contain_text("(5 coefficients)", timeout=60_000)
            side = {float(page.locator(f"#side-{i} label, #side-{i} [data-testid=block-info]").first.inner_text()
                          .removeprefix("c = ")): page.locator(f"#side-{i} textarea").input_value() for i in range(5)}
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            page.get_by_role("tab", name="Report").click()
            expect(page.locator("#report")).to_contain_text("no evaluation report")
            browser.close()
    finally:
        app.close()
    model, tok = bundled
    want = base_generate(model, tok, PROMPT, TOKENS)
    assert texts[0.0] == want, "the playground at c = 0 is not the base model"
    assert sorted(side) == [-2.0, -1.0, 0.0, 1.0, 2.0] and side[0.0] == want
    for c in (2.0, -2.0):
        assert texts[c] and texts[c] != want, f"c = {c:+g} came back empty or equal to the base model"
        assert side[c] == texts[c], f"side by side at c = {c:+g} differs from the single generation"
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def test_serve_refuses_bad_input_before_starting(tmp_path):
    with pytest.raises(RunError, match="holds no finished run"):
        serve.find_runs(tmp_path)
    with pytest.raises(RunError, match="neither a folder here nor a Hub repo"):
        serve.find_runs("no-such-user/no-such-run")  # offline (HF_HUB_OFFLINE=1) and not cached
    with pytest.raises(RunError, match="not a folder"):
        serve.find_runs(tmp_path / "missing")  # a local path is never sent to the Hub
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(RunError, match="choose another --port"):
            serve.launch(tmp_path, port=taken.getsockname()[1], block=False)
    assert serve.parse_coeffs("-2, -1 0 1 2 2") == [-2.0, -1.0, 0.0, 1.0, 2.0]
    for bad, why in (("", "give 1 to"), ("1 x", "numbers"), ("nan", "finite"), ("5", "within ±4"),
                     ("1e4", "within ±4"), (" ".join(["1"] * 9), "give 1 to")):
        with pytest.raises(ValueError, match=why):
            serve.parse_coeffs(bad)


def test_a_folder_of_runs_offers_each_and_reads_eval_reports(tmp_path):
    from PIL import Image

    for name in ("a", "b"):  # runs as compare writes them (the model is loaded only when picked)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}")
        (tmp_path / name / "adapter.safetensors").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    runs = serve.Runs(serve.find_runs(tmp_path))
    assert list(runs.folders) == ["a", "b"]
    png, text = runs.report("a")
    assert png is None and "no evaluation report" in text
    (tmp_path / "b" / "eval").mkdir()  # `python -m adapters eval` writes here
    (tmp_path / "b" / "eval" / "report.md").write_text("# Evaluation of b")
    Image.new("RGB", (40, 30), "white").save(tmp_path / "b" / "eval" / "report.png")
    png, text = runs.report("b")
    assert text == "# Evaluation of b" and png.size == (40, 30)  # pixels: Gradio serves no path outside its folders
