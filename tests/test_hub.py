"""``--push-to-hub``: final/ (with its card) uploaded through a mocked HfApi; a failed upload is a clear
error and leaves the local model as it was. The options do not change the training hash."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from pocl.config import DistillConfig
from pocl.hub import HubError, command_line, push_folder
from pocl.pipeline import distill
from pocl.training.checkpoint import verify_folder
from tests.conftest import tiny_config


class FakeApi:
    """Records create_repo and upload_folder (and the files the folder held then); ``fail``: upload_folder raises."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.created: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, **kwargs):
        self.created.append(kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{kwargs['repo_id']}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.uploads.append(dict(kwargs, files=sorted(p.relative_to(folder).as_posix()
                                                      for p in folder.rglob("*") if p.is_file())))
        if self.fail is not None:
            raise self.fail


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_pair, tiny_data):
    result = distill(tiny_config(tmp_path_factory.mktemp("hub"), tiny_pair, tiny_data,
                                 data={"dev_file": None}, train={"epochs": 1}))
    assert result.status == "completed"
    return result


def test_push_folder_creates_the_repo_and_uploads_final_with_its_card(run):
    api = FakeApi()
    url = push_folder(run.final_dir, "me/tiny-student", private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-student"
    assert api.created == [{"repo_id": "me/tiny-student", "repo_type": "model", "private": True, "exist_ok": True}]
    (upload,) = api.uploads
    assert upload["repo_id"] == "me/tiny-student" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == run.final_dir
    assert {"README.md", "config.json", "model.safetensors", "manifest.json"} <= set(upload["files"])
    assert set(upload["files"]) == set(json.loads((run.final_dir / "manifest.json").read_text())["files"]) | {
        "manifest.json"}


def test_a_failed_upload_is_a_clear_error_and_leaves_final_as_it_was(run):
    before = _snapshot(run.final_dir)
    api = FakeApi(fail=OSError("401 Client Error: Unauthorized"))
    with pytest.raises(HubError) as e:
        push_folder(run.final_dir, "me/tiny-student", api=api)
    message = str(e.value)
    assert "me/tiny-student" in message and "401" in message and "unchanged" in message
    assert f"hf upload me/tiny-student {run.final_dir}" in message
    assert _snapshot(run.final_dir) == before
    verify_folder(run.final_dir)
    assert api.created[0]["private"] is False


def test_a_folder_that_does_not_match_its_manifest_is_not_uploaded(run, tmp_path):
    import shutil

    from pocl.errors import CheckpointError

    copy = tmp_path / "final"
    shutil.copytree(run.final_dir, copy)
    (copy / "README.md").write_text("changed\n")
    api = FakeApi()
    with pytest.raises(CheckpointError):
        push_folder(copy, "me/x", api=api)
    assert api.created == [] and api.uploads == []


def test_distill_with_push_to_hub_uploads_after_the_run(tmp_path, tiny_pair, tiny_data, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, data={"dev_file": None},
                      train={"epochs": 1, "push_to_hub": "me/pushed", "hub_private": True})
    result = distill(cfg)
    assert result.status == "completed"
    assert [c["repo_id"] for c in api.created] == ["me/pushed"] and api.created[0]["private"] is True
    assert Path(api.uploads[0]["folder_path"]) == result.final_dir and "README.md" in api.uploads[0]["files"]
    # a rerun of the completed run trains nothing and uploads again (the retry after a failed upload)
    api.fail = OSError("network unreachable")
    before = _snapshot(result.final_dir)
    with pytest.raises(HubError, match="network unreachable"):
        distill(cfg)
    assert _snapshot(result.final_dir) == before
    verify_folder(result.final_dir)


def test_hub_options_do_not_change_the_training_hash_and_have_flags(capsys):
    from pocl.cli import main

    base = DistillConfig().training_hash()
    changed = DistillConfig.from_dict({"train": {"push_to_hub": "me/x", "hub_private": True}})
    assert changed.training_hash() == base
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--push-to-hub" in out and "--hub-private" in out


def test_command_line():
    assert command_line(["/venv/bin/pocl", "distill", "--teacher", "a b"]) == "pocl distill --teacher 'a b'"
    assert command_line(["/x/src/pocl/__main__.py", "eval"]) == "pocl eval"
