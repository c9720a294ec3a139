"""``--push-to-hub REPO_ID``: upload a run's ``final/`` (with its model card) to the Hugging Face Hub.

After a completed run, :func:`push_after_run` creates the repository (``exist_ok``; private with
``--hub-private``) and uploads the folder with :class:`huggingface_hub.HfApi` (the token is
huggingface_hub's own: ``HF_TOKEN`` or ``hf auth login``). The upload only reads the folder: a failed
upload raises :class:`HubError` saying so, and ``final/`` is left exactly as it was (its manifest
still verifies). Untested against the real Hub (no network in CI): see docs/training.md.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from pocl.errors import PoclError

log = logging.getLogger("pocl.hub")

__all__ = ["HubError", "command_line", "push_after_run", "push_folder"]


class HubError(PoclError):
    """An upload to the Hugging Face Hub failed (the local files are unchanged)."""


def command_line(argv: list[str] | None = None) -> str:
    """The command line of this process, as the model card shows it (``pocl distill ...`` when run by
    the ``pocl`` entry point or ``python -m pocl``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name == "pocl" or Path(argv[0]).parts[-2:] == ("pocl", "__main__.py")):
        argv = ["pocl", *argv[1:]]
    return shlex.join(argv)


def push_folder(folder: Path, repo_id: str, *, private: bool = False, api: Any = None,
                commit_message: str | None = None) -> str:
    """Upload ``folder`` (verified against its manifest first) to the model repository ``repo_id``,
    creating it if needed; returns the repository's URL. :class:`HubError` when it fails."""
    from pocl.artifacts.folders import verify_folder

    folder = Path(folder)
    verify_folder(folder)  # never upload a folder whose files do not match its manifest
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message=commit_message or f"pocl: upload {folder.parent.name}/{folder.name}")
    except Exception as exc:  # network, authentication, permissions, a name taken ...
        raise HubError(f"could not upload {folder} to the Hugging Face Hub repository {repo_id}: "
                       f"{type(exc).__name__}: {exc}. The local model in {folder} is complete and unchanged; "
                       f"log in (`hf auth login` or HF_TOKEN) and retry with `hf upload {repo_id} {folder}`, or "
                       f"rerun the same pocl command (a completed run only uploads)") from exc
    url = str(getattr(url, "url", url))
    log.info("uploaded %s to %s", folder, url)
    return url


def push_after_run(config, result, *, main: bool = True, api: Any = None):
    """``--push-to-hub``: upload ``result.final_dir`` of a completed run (main process); returns ``result``."""
    repo_id = config.train.push_to_hub
    if not repo_id or result.status != "completed" or result.final_dir is None or not main:
        return result
    push_folder(Path(result.final_dir), repo_id, private=config.train.hub_private, api=api)
    return result
