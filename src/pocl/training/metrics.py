"""Metrics: a JSONL file (one JSON object per record), TensorBoard scalars and the console.

On resume, records written after the checkpoint's step are dropped from the JSONL file and
TensorBoard is told to purge them, so a resumed run's logs equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from pocl.errors import CheckpointError

log = logging.getLogger("pocl.train")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    def __init__(self, output_dir: Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed; no TensorBoard logs")
            else:
                kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
                self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), **kwargs)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any], *, tb_prefix: str | None = None) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        try:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.path}: {exc.strerror or exc} (errno {exc.errno}); the run "
                                  "stops here, the last checkpoint is intact: free some space and run the same "
                                  "command again to resume") from exc
        if self._writer is not None and tb_prefix is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key in ("step", "stage", "split", "time") or not isinstance(value, (int, float)):
                    continue
                if isinstance(value, bool):
                    continue
                self._writer.add_scalar(f"{tb_prefix}/{key}", value, step)
            self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
