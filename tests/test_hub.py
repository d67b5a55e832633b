"""The Hugging Face Hub: ``push`` a run, then ``load_run("user/name")`` back through
``snapshot_download``, online against a loopback stand-in for the Hub's HTTP API, then offline
from the cache that huggingface_hub itself laid out."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants as hf
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import adapters
from adapters import __main__ as cli
from adapters import pipeline
from adapters.hub import push
from adapters.run import RunError
from adapters.steer import steer
from conftest import logits, make_batch, tiny_config


class FakeHub:
    """The endpoints that create_repo, upload_folder and snapshot_download call, on loopback:
    files committed in memory, every request recorded."""

    def __init__(self):
        self.repos, self.requests, self.yaml = {}, [], None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def post(self, path: str, body: bytes):
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            d = json.loads(body)
            repo = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
            self.repos.setdefault(repo, {"files": {}, "sha": "0" * 40})
            return {"url": f"{self.url}/{repo}", "name": repo}
        if path == "/api/validate-yaml":  # the model card's metadata
            self.yaml = json.loads(body)
            return {"errors": [], "warnings": []}
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                              for f in json.loads(body)["files"]]}
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = self.repos["/".join(parts[2:4])]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo["sha"] = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(repo["files"].items()))).hexdigest()
            return {"commitUrl": f"{self.url}/{'/'.join(parts[2:4])}/commit/{repo['sha']}", "commitOid": repo["sha"]}
        return None

    def get(self, path: str):
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = self.repos.get("/".join(parts[2:4]))
            if repo is None:
                return None
            if parts[4] == "revision":
                return {"id": "/".join(parts[2:4]), "sha": repo["sha"],
                        "siblings": [{"rfilename": f} for f in sorted(repo["files"])]}
            if parts[4] == "tree":
                return [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in sorted(repo["files"].items())]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repos.get("/".join(parts[:2]), {"files": {}})
            data = repo["files"].get("/".join(parts[4:]))
            if data is not None:
                return data, {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        return None


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, answer, head: bool = False):
            code, headers, body = 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "not found"}'
            if isinstance(answer, tuple):
                (body, headers), code = answer, 200
            elif answer is not None:
                code, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_POST(self):
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path))
            self.reply(hub.post(path, self.rfile.read(int(self.headers.get("Content-Length") or 0))))

        def do_GET(self, head: bool = False):
            path = self.path.split("?")[0]
            hub.requests.append(("HEAD" if head else "GET", path))
            self.reply(hub.get(path), head)

        def do_HEAD(self):
            self.do_GET(head=True)

    return Handler


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(tiny_dir, tmp / "runs", "lora")))
    return pipeline.main(["--config", str(tmp / "tiny.yaml")])


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at a FakeHub, online, with an empty cache of its own."""
    fake = FakeHub()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # loopback never through a proxy
    monkeypatch.setattr(hf, "ENDPOINT", fake.url)
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield fake
    fake.server.shutdown()


def test_push_then_load_run_from_the_hub_online_and_offline(tiny_run, tiny_dir, tokenizer, hub, monkeypatch,
                                                           tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "wandb").mkdir()
    (run / "wandb" / "debug.log").write_text("a local log")
    (run / "notes.txt").write_text("not a run file")
    assert cli.main(["push", "--run", str(run), "--repo", "user/tiny", "--token", "hf_test"]) == 0
    assert "pushed" in capsys.readouterr().out
    posts = [path for method, path in hub.requests if method == "POST"]
    assert posts[0] == "/api/repos/create" and posts[-1] == "/api/models/user/tiny/commit/main"
    files = hub.repos["user/tiny"]["files"]
    assert {"adapter.safetensors", "config.yaml", "directions.safetensors", "README.md", "report.md"} <= set(files)
    assert not [f for f in files if f.startswith("wandb/") or f == "notes.txt"]
    assert files["adapter.safetensors"] == (run / "adapter.safetensors").read_bytes()
    pushed = ModelCard(files["README.md"].decode())
    assert pushed.data.library_name == "contrastive-adapters" and pushed.data.base_model is None  # a local path
    assert "contrastive-adapters" in hub.yaml["content"]

    online, tok = adapters.load_run("user/tiny", device="cpu")  # snapshot_download into the empty cache
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    offline, _ = adapters.load_run("user/tiny", device="cpu")  # the cache alone
    assert hub.requests == []
    local, _ = adapters.load_run(tiny_run, device="cpu")
    batch = make_batch(tokenizer, n=2)
    with steer(local, 1.0):
        want = logits(local, batch)
    for model in (online, offline):
        with steer(model, 1.0):
            assert torch.equal(logits(model, batch), want)
    with pytest.raises(RunError, match="neither a folder here nor a Hub repo"):
        adapters.load_run("user/not-pushed", device="cpu")  # offline, not cached
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(RunError, match="runs/tiny does not exist"):
        adapters.load_run("runs/tiny", device="cpu")  # runs/ is here: a local path, never a repo id


def test_push_refuses_bad_input_and_reports_a_failed_upload(tiny_run, hub, tmp_path):
    with pytest.raises(RunError, match="not a finished run folder"):
        push(tmp_path, "user/x")
    for bad in ("no slash", "user/a--b", "user/x.git", "user/x@main", "user/" + "x" * 97):
        with pytest.raises(RunError, match="not a Hub repo id"):
            push(tiny_run, bad)
    assert hub.requests == []  # refused before any request
    hub.server.shutdown()
    hub.server.server_close()  # the Hub unreachable
    with pytest.raises(RunError, match="push to user/x failed"):
        push(tiny_run, "user/x", token="hf_test")
    assert hub.repos == {}
