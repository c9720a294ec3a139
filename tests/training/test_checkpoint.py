"""Atomic folder writes and manifest verification."""

from __future__ import annotations

import json

import pytest

from pocl.errors import CheckpointError
from pocl.training import checkpoint as ckpt


def _write(files):
    def write(tmp):
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return write


def test_write_and_verify(tmp_path):
    target = tmp_path / "checkpoints" / ckpt.step_dir_name(12)
    ckpt.atomic_folder_write(target, _write({"a.bin": b"x" * 100, "b.json": b"{}"}), manifest_extra={"step": 12})
    manifest = ckpt.verify_folder(target)
    assert manifest["step"] == 12 and set(manifest["files"]) == {"a.bin", "b.json"}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000012"]


def test_truncated_and_corrupt_files_are_detected(tmp_path):
    target = tmp_path / "c"
    ckpt.atomic_folder_write(target, _write({"w.bin": b"0123456789"}))
    (target / "w.bin").write_bytes(b"01234")
    with pytest.raises(CheckpointError, match="5 bytes, the manifest says 10"):
        ckpt.verify_folder(target)
    (target / "w.bin").write_bytes(b"0123456780")
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.verify_folder(target)
    (target / "w.bin").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.verify_folder(target)
    (target / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        ckpt.verify_folder(target)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "step-00000001"
    ckpt.atomic_folder_write(target, _write({"w.bin": b"old"}))

    def failing(tmp):
        (tmp / "w.bin").write_bytes(b"new, half writ")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match=r"cannot write .*step-00000001: No space left on device \(errno 28\)"):
        ckpt.atomic_folder_write(target, failing)
    assert (target / "w.bin").read_bytes() == b"old"
    ckpt.verify_folder(target)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no temporary left behind


def test_latest_valid_skips_corrupt_and_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3):
        ckpt.atomic_folder_write(tmp_path / ckpt.step_dir_name(step), _write({"w": str(step).encode()}))
    manifest = json.loads((tmp_path / "step-00000003" / "manifest.json").read_text())
    manifest["files"]["w"]["size"] = 99
    (tmp_path / "step-00000003" / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.latest_valid_checkpoint(tmp_path).name == "step-00000002"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 2]


def test_leftover_temporaries_are_cleaned(tmp_path):
    (tmp_path / ".tmp-step-00000005-abcd").mkdir()
    (tmp_path / ".tmp-step-00000005-abcd" / "x").write_text("partial")
    ckpt.clean_temporaries(tmp_path)
    assert list(tmp_path.iterdir()) == []
