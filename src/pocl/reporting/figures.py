"""What every plot shares: a figure without pyplot state, the atomic PNG write, and the readers of a run
folder's files (``metrics.jsonl``-style JSON lines, ``summary.json``, the newest checkpoint's trainer state).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from pocl.errors import DataError

log = logging.getLogger("pocl.report")

__all__ = ["as_finite", "latest_trainer_state", "new_figure", "read_jsonl", "read_summary", "save_figure"]


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            # a line cut by a crash at the very end of a file is tolerated
            if number == len(lines):
                log.warning("%s:%d: skipping an incomplete last line", path, number)
                continue
            raise DataError(f"invalid JSON: {e}", path=str(path), line=number) from None
    return rows


def as_finite(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    return None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"invalid JSON: {e}", path=str(path)) from None


def latest_trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """trainer_state.json of the run's newest checkpoint (``state`` and the stage plan ``stages``), or None
    when there is none or it cannot be read (only used to fill in what summary.json lacks)."""
    best: tuple[int, Path] | None = None
    for path in (run_dir / "checkpoints").glob("step-*/trainer_state.json"):
        try:
            step = int(path.parent.name.split("-", 1)[1])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        return None
    try:
        data = json.loads(best[1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s: unreadable, not used for the stage plan", best[1])
        return None
    return data if isinstance(data, dict) else None
