"""``onestep publish FOLDER --repo_id ORG/NAME``: push an exported student or teacher folder to a hub repo.

Everything is checked before any upload: the folder is a complete export (model_index.json or config.json, and
a README.md model card), a token is available, and the hub is not switched off (HF_HUB_OFFLINE). Network
failures are reported as such instead of as a traceback.

The card's usage snippet names the local folder; the uploaded card names the repo instead
(:func:`distill.export.model_card.card_for_repo`). The local README.md is left as it is, and everything goes up
in one commit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REQUIRED_ANY = ("model_index.json", "config.json", "adapter_config.json")


class PublishError(RuntimeError):
    pass


def files_to_push(folder: str | Path) -> list[str]:
    """The files ``publish`` would upload (relative paths), after validating the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(
            f"{folder} is not a folder; expected an exported model folder (e.g. outputs/sid/student)"
        )
    names = {p.name for p in folder.iterdir()}
    if not any(n in names for n in REQUIRED_ANY):
        raise PublishError(
            f"{folder} holds none of {', '.join(REQUIRED_ANY)}: not an exported diffusers/peft folder"
        )
    if "README.md" not in names:
        raise PublishError(f"{folder} has no README.md model card; export it with the recipe first")
    pickles = [p for p in folder.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".ckpt")]
    if pickles:
        raise PublishError(f"{folder} contains pickled weights ({pickles[0].name}); publish safetensors only")
    files = [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.suffix != ".pyc"
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
    ]
    return files


def hub_card(folder: str | Path, repo_id: str) -> str:
    """The README.md of ``folder`` as uploaded to ``repo_id``: its snippet loads the repo, not the folder."""
    from distill.export.model_card import card_for_repo
    from distill.pipelines import ADAPTER_INFO

    folder = Path(folder)
    # adapter folders load from local files (onestep_adapter.json), so their snippet downloads the repo first
    download = (folder / ADAPTER_INFO).is_file()
    text = card_for_repo((folder / "README.md").read_text(), folder, repo_id, download=download)
    if str(folder.resolve()) in text:
        raise PublishError(f"the model card still names the local folder {folder.resolve()}; edit README.md")
    return text


def publish(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload ``folder`` to ``repo_id``; returns the repo URL. Raises :class:`PublishError` with the reason."""
    files = files_to_push(folder)
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise PublishError(f"repo_id {repo_id!r} must look like 'organisation/name'")
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise PublishError(
            "HF_HUB_OFFLINE is set: the hub is switched off on this machine; unset it to publish"
        )
    token = token or get_token()
    if not token:
        raise PublishError("no hub token: run `hf auth login` or set HF_TOKEN, then publish again")
    folder = Path(folder)
    card = hub_card(folder, repo_id)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in files
        if name != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id,
            operations,
            commit_message=f"Upload {folder.name} with onestep publish",
            repo_type="model",
        )
    except OSError as err:  # requests' connection errors derive from OSError
        raise PublishError(f"could not reach the hub to push {folder} to {repo_id}: {err}") from err
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onestep publish", description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry_run", action="store_true", help="list the files that would be pushed and stop")
    args = parser.parse_args(argv)
    try:
        files = files_to_push(args.folder)
        if args.dry_run:
            print("\n".join(files))
            return 0
        print(publish(args.folder, args.repo_id, args.private))
    except PublishError as err:
        print(f"onestep publish: {err}", file=sys.stderr)
        return 1
    return 0
