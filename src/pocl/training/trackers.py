"""Experiment trackers of a run (``train.report_to``): TensorBoard, Weights & Biases and trackio.

They are accelerate's own tracker classes (``accelerate.tracking``: ``TensorBoardTracker``, ``WandBTracker``,
``TrackioTracker``), created, started, given the config, logged to and finished the way
``Accelerator.init_trackers`` / ``Accelerator.log`` / ``Accelerator.end_training`` do it, on the main process
only. pocl drives them itself rather than through the trainer's Accelerator for three reasons: the run folder,
the resume step and the config are only known when training starts (long after the Accelerator is made);
``Accelerator.init_trackers`` gives every tracker the same project name, while TensorBoard's folder must stay
``OUTPUT_DIR/tensorboard`` and W&B's project stays ``pocl``; and ``Accelerator.end_training`` also destroys the
process group, which the trainer still needs after the logs are closed.

* ``tensorboard``: ``OUTPUT_DIR/tensorboard``, the tags ``train/KEY`` and ``dev/KEY`` (as before); a resumed
  run purges the events after its checkpoint's step (``purge_step``).
* ``wandb`` (``pip install 'pocl[wandb]'``): project ``$WANDB_PROJECT`` or ``pocl``, run name ``$WANDB_NAME`` or
  the run folder's name, files in ``OUTPUT_DIR/wandb`` (``WANDB_MODE=offline`` works: ``wandb sync OUTPUT_DIR/wandb/offline-run-*``).
* ``trackio`` (``pip install 'pocl[trackio]'``): project ``$TRACKIO_PROJECT`` or ``pocl``, its own storage.

W&B and trackio runs are resumable: the run id (name) and the last step logged are kept in
``OUTPUT_DIR/NAME/pocl-tracker.json``; a resumed pocl run continues the same tracker run (``resume="allow"``)
and does not send again the steps it replays (up to the last one logged: those keep their first values, which
an exact resume reproduces). A fresh run (no checkpoint) starts a new tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pocl.errors import ConfigError

log = logging.getLogger("pocl.train")

#: The trackers ``train.report_to`` accepts -> the pocl extra that installs their package (None: a dependency).
TRACKER_EXTRAS: dict[str, str | None] = {"tensorboard": None, "wandb": "wandb", "trackio": "trackio"}
#: The Python package each tracker imports.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
#: The file (in ``OUTPUT_DIR/NAME``) that keeps a resumable tracker's run id and last logged step.
STATE_FILE = "pocl-tracker.json"
#: Record keys that are not metrics (no tracker gets them).
NOT_METRICS = ("step", "stage", "split", "time")


def parse_report_to(values) -> list[str]:
    """``train.report_to`` as a list of tracker names: entries may hold several names separated by commas or
    spaces (``--report-to tensorboard,wandb``); ``none`` alone means no tracker. ConfigError for an unknown
    name, or ``none`` with others."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for entry in values:
        for name in str(entry).replace(",", " ").split():
            name = name.strip().lower()
            if name not in (*TRACKER_EXTRAS, "none"):
                raise ConfigError(f"train.report_to: unknown tracker {name!r}; choose from "
                                  f"{', '.join(TRACKER_EXTRAS)} or none")
            if name not in names:
                names.append(name)
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"train.report_to: none cannot be combined with other trackers (got {names})")
        return []
    return names


def check_report_to(values, *, tensorboard: bool) -> list[str]:
    """``train.report_to`` normalised (:func:`parse_report_to`); ConfigError when ``train.tensorboard`` is false
    and report_to names tensorboard among other trackers (a contradiction; ``report_to: [tensorboard]``, the
    default, with ``tensorboard: false`` is simply no TensorBoard)."""
    names = parse_report_to(values)
    if not tensorboard and "tensorboard" in names and names != ["tensorboard"]:
        raise ConfigError(f"train.report_to: {', '.join(names)} names tensorboard, but train.tensorboard is false "
                          "(--no-tensorboard): leave tensorboard out of --report-to, or drop --no-tensorboard")
    return names


def effective_trackers(train_config) -> list[str]:
    """The trackers a run logs to: ``train.report_to`` less tensorboard when ``train.tensorboard`` is false
    (``--no-tensorboard`` turns off the default ``report_to: [tensorboard]``; with a ``report_to`` that names
    tensorboard among others it is refused when the config is built)."""
    names = parse_report_to(getattr(train_config, "report_to", ["tensorboard"]))
    if not getattr(train_config, "tensorboard", True):
        names = [n for n in names if n != "tensorboard"]
    return names


def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_available(names) -> None:
    """ConfigError naming the pip extra when a tracker's package is missing (before any training)."""
    for name in names:
        if _installed(TRACKER_PACKAGES[name]):
            continue
        extra = TRACKER_EXTRAS[name]
        how = f"pip install 'pocl[{extra}]'" if extra else f"pip install {TRACKER_PACKAGES[name]}"
        raise ConfigError(f"train.report_to: {name} needs the {TRACKER_PACKAGES[name]} package, which is not "
                          f"installed: {how} (or leave {name} out of --report-to)")


def numeric_metrics(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a record as ``PREFIX/KEY`` (booleans, strings and the non-metric keys left out): what
    every tracker gets, and TensorBoard's tags."""
    return {f"{prefix}/{key}": value for key, value in record.items()
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class _State:
    """A resumable tracker's ``OUTPUT_DIR/NAME/pocl-tracker.json``: its run id and the last step logged."""

    def __init__(self, folder: Path, *, resume: bool):
        self.path = folder / STATE_FILE
        old = self._read() if resume else {}
        self.resumed = bool(old.get("id"))
        self.id = old.get("id") or uuid.uuid4().hex[:12]
        self.last_step = int(old.get("last_step", -1)) if self.resumed else -1
        self.replayed_until = self.last_step  # steps up to here were logged by an earlier process
        folder.mkdir(parents=True, exist_ok=True)
        self.save()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> None:
        from pocl.artifacts import atomic_write

        atomic_write(self.path, json.dumps({"id": self.id, "last_step": self.last_step}) + "\n")


class RunTrackers:
    """The trackers of one run on the main process: ``log(record, prefix)`` and ``finish()``.

    ``names``: :func:`effective_trackers`; ``resume_step``: the checkpoint step a resumed run continues from
    (None: a fresh run); ``config``: the run's configuration (``config.yaml``), stored with W&B and trackio runs.
    """

    def __init__(self, output_dir: Path, names, *, resume_step: int | None = None,
                 config: dict[str, Any] | None = None):
        import torch
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        # accelerate's trackers log through its state (the trainer's, else made here; as
        # pocl.launch.distributed_state, which imports this module: no cycle)
        PartialState(cpu=not torch.cuda.is_available())
        self.output_dir = Path(output_dir)
        self.names = list(names)
        check_available(self.names)
        self.trackers: list[tuple[Any, _State | None]] = []
        try:
            for name in self.names:
                cls = LOGGER_TYPE_TO_CLASS[name]
                if name == "tensorboard":
                    kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
                    self._start(cls("tensorboard", str(self.output_dir), **kwargs), None, None)
                    continue
                state = _State(self.output_dir / name, resume=resume_step is not None)
                project = os.environ.get(f"{name.upper()}_PROJECT") or "pocl"
                run_name = self.output_dir.resolve().name
                if name == "wandb":
                    kwargs = {"dir": str(self.output_dir), "id": state.id, "resume": "allow",
                              "name": os.environ.get("WANDB_NAME") or run_name}
                else:  # trackio: runs are named within a project
                    kwargs = {"name": f"{run_name}-{state.id}", "resume": "allow"}
                self._start(cls(project, **kwargs), state, config)
                if state.resumed:
                    log.info("%s: continuing run %s after step %d", name, state.id, state.last_step)
        except BaseException:
            self.finish()
            raise

    def _start(self, tracker, state: _State | None, config: dict[str, Any] | None) -> None:
        """``tracker.start()`` and its configuration, as ``Accelerator.init_trackers`` does."""
        try:
            tracker.start()
        except Exception as exc:
            raise ConfigError(f"train.report_to: {tracker.name} did not start: {type(exc).__name__}: {exc}"
                              + (" (offline: WANDB_MODE=offline)" if tracker.name == "wandb" else "")) from exc
        self.trackers.append((tracker, state))
        if config is not None and state is not None:
            tracker.store_init_configuration(config)

    def log(self, record: dict[str, Any], prefix: str) -> None:
        """Send the numbers of ``record`` (it has a ``step``) to every tracker as ``PREFIX/KEY``; a resumed W&B
        or trackio run skips the steps an earlier process already sent."""
        step = int(record["step"])
        values = numeric_metrics(record, prefix)
        if not values:
            return
        for tracker, state in self.trackers:
            if state is not None and step <= state.replayed_until:
                continue
            tracker.log(values, step=step)
            if state is not None and step > state.last_step:
                state.last_step = step
                state.save()

    def finish(self) -> None:
        """Finish every tracker (``Accelerator.end_training`` without destroying the process group)."""
        trackers, self.trackers = self.trackers, []
        for tracker, _ in trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - a tracker that cannot close must not hide the run's result
                log.warning("%s did not finish cleanly: %s", tracker.name, exc)


def run_config(output_dir: Path) -> dict[str, Any] | None:
    """The run's configuration as written to ``OUTPUT_DIR/config.yaml`` (None without one)."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
