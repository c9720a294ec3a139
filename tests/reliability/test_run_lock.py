"""One pocl process per run folder (pocl.training.output_dirs.run_lock): a second `pocl distill` on a folder
another process is writing into is refused at once and writes nothing; the lock file does not make the
folder foreign, and a killed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pocl.errors import ConfigError
from pocl.pipeline import distill
from pocl.training.output_dirs import LOCK_NAME, run_lock
from tests.conftest import tiny_config

HOLD = "import sys, time; from pocl.training.output_dirs import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('locked', flush=True); time.sleep(600)\n"


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, RANK="0"))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, tiny_pair, tiny_data):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(ConfigError, match=f"is in use by another pocl process \\(pid {holder.pid} on "):
            distill(tiny_config(tmp_path, tiny_pair, tiny_data))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock went with it; the lock file does not make the folder someone else's.
    result = distill(tiny_config(tmp_path, tiny_pair, tiny_data))
    assert result.status == "completed" and (out / "final").is_dir()


def test_the_lock_is_released_after_the_block_and_only_rank_0_locks(tmp_path, monkeypatch):
    with run_lock(tmp_path / "a"):
        with pytest.raises(ConfigError, match="in use"):
            with run_lock(tmp_path / "a"):
                pass
    with run_lock(tmp_path / "a"):  # released
        monkeypatch.setenv("RANK", "1")
        with run_lock(tmp_path / "a"):  # other ranks of the same launch do not lock
            time.sleep(0)
