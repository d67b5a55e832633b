"""``python -m adapters push --run runs/<name> --repo user/name``: a run folder onto the Hugging Face Hub.

What goes up is the run's own files (``run.RUN_FILES``: adapter, config, directions, behaviour
completions, report, timing, model card) and its ``eval/`` reports; never the wandb folder, a
checkpoint or a lock. ``load_run("user/name")`` and ``serve --run user/name`` bring it back
(``run.resolve``: ``snapshot_download``, from the local cache when offline).
"""

from __future__ import annotations

from pathlib import Path

from .run import HUB_REPO, RUN_FILES, RunError, is_finished

UPLOAD = [*RUN_FILES, "eval/*"]
"""The ``allow_patterns`` of the upload: the files a run folder's reader needs."""


def push(folder: str | Path, repo: str, private: bool = False, token: str | None = None,
         message: str | None = None) -> str:
    """Create ``repo`` (a model repo; kept when it exists) and upload the run's files in one
    commit. Returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError  # HTTPError: its client's
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    if not is_finished(folder):
        raise RunError(f"{folder} is not a finished run folder (needs config.yaml and adapter.safetensors)")
    try:
        validate_repo_id(repo)
        ok = HUB_REPO.fullmatch(repo) and "@" not in repo
    except HFValidationError:
        ok = False
    if not ok:
        raise RunError(f"--repo {repo!r} is not a Hub repo id; give user/name (or org/name: letters, digits, "
                       "'-', '_', '.', at most 96 characters)")
    if not (folder / "README.md").is_file():
        from .card import write_card

        write_card(folder)  # a run from before model cards: its card first
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model", allow_patterns=UPLOAD,
                                 commit_message=message or f"contrastive-adapters run {folder.name}")
    except (HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OSError) as e:  # offline, no token, no access
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(f"push to {repo} failed: {first} (offline: unset HF_HUB_OFFLINE; no token: `hf auth login` "
                       "or --token)") from None
    return str(info)
