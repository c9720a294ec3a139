"""train.report_to: the run's trackers (TensorBoard, W&B, trackio) through accelerate's tracker classes.

The W&B tests run offline (WANDB_MODE=offline) and read the offline run's ``.wandb`` file with wandb's own
protobuf records; they skip without wandb. trackio is a mocked module here (its real package is not installed in
the test environment)."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import types
from pathlib import Path

import pytest

from pocl.cli import build_config, make_parser, parse_command_line
from pocl.config import DistillConfig
from pocl.errors import ConfigError
from pocl.training import trackers
from pocl.training.metrics import MetricsLogger, read_metrics
from tests.conftest import tiny_config


def config_of(*argv: str) -> DistillConfig:
    return build_config(parse_command_line(make_parser(), ["distill", *argv]))


# ----------------------------------------------------------------------------------- the setting
def test_report_to_flag_accepts_commas_and_spaces_and_none():
    assert DistillConfig().train.report_to == ["tensorboard"]  # the default: as before
    assert config_of("--report-to", "tensorboard,wandb").train.report_to == ["tensorboard", "wandb"]
    assert config_of("--report-to", "wandb", "TensorBoard").train.report_to == ["wandb", "tensorboard"]
    assert config_of("--report-to", "trackio, wandb,trackio").train.report_to == ["trackio", "wandb"]
    assert config_of("--report-to", "none").train.report_to == []
    assert DistillConfig.from_dict({"train": {"report_to": []}}).train.report_to == []
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'mlflow'; choose from tensorboard, "
                                          r"wandb, trackio or none"):
        DistillConfig.from_dict({"train": {"report_to": ["mlflow"]}})
    with pytest.raises(ConfigError, match="none cannot be combined"):
        config_of("--report-to", "none,wandb")


def test_tensorboard_switch_maps_onto_report_to():
    eff = trackers.effective_trackers
    assert eff(DistillConfig().train) == ["tensorboard"]
    assert eff(config_of("--no-tensorboard").train) == []  # as before: --no-tensorboard, no TensorBoard
    assert eff(config_of("--no-tensorboard", "--report-to", "wandb").train) == ["wandb"]
    assert eff(config_of("--report-to", "wandb").train) == ["wandb"]  # report_to wins over the default true
    with pytest.raises(ConfigError, match=r"train.report_to: tensorboard, wandb names tensorboard, but "
                                          r"train.tensorboard is false \(--no-tensorboard\)"):
        config_of("--no-tensorboard", "--report-to", "tensorboard,wandb")


def test_report_to_does_not_change_the_training_hash_and_may_change_on_resume():
    from pocl.config.schema import weight_free_fields

    base = DistillConfig().training_hash()
    for value in (["wandb", "trackio"], ["none"], ["tensorboard", "wandb"]):
        assert DistillConfig.from_dict({"train": {"report_to": value}}).training_hash() == base
    assert "report_to" in weight_free_fields(DistillConfig().train)


def test_a_missing_tracker_package_names_the_extra_before_training(tmp_path, tiny_pair, tiny_data, monkeypatch):
    from pocl.launch import make_accelerator

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    monkeypatch.setitem(sys.modules, "trackio", None)
    for name in ("wandb", "trackio"):
        cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"report_to": [name]})
        with pytest.raises(ConfigError, match=rf"train.report_to: {name} needs the {name} package, which is not "
                                              rf"installed: pip install 'pocl\[{name}\]'"):
            make_accelerator(cfg)  # made before any model is trained (pocl.pipeline.distill)
        with pytest.raises(ConfigError, match=rf"pocl\[{name}\]"):
            MetricsLogger(tmp_path / "x", report_to=[name])
    assert not (tmp_path / "x").exists()  # nothing written


# ----------------------------------------------------------------------------------- trackio (mocked)
class FakeTrackio(types.ModuleType):
    """The calls accelerate's TrackioTracker makes: trackio.init(project, **kw) -> run; run.log; run.finish;
    trackio.config.update."""

    def __init__(self):
        super().__init__("trackio")
        self.inits, self.logs, self.finished, self.configs = [], [], 0, []
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logs.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        self.Run = Run
        self.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: fake.configs.append(values))

    def init(self, project, **kwargs):
        self.inits.append(dict(kwargs, project=project))
        return self.Run()


def test_trackio_gets_every_metric_and_a_resume_continues_without_replayed_steps(tmp_path, monkeypatch):
    fake = FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  seed: 3\n")
    logger = MetricsLogger(run, report_to=["trackio"])
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step, "lr": 0.1, "stage": "easy", "split": "train", "nan": math.nan,
                    "flag": True}, tb_prefix="train")
    logger.log({"step": 3, "dev_ce": 2.5, "stage": "easy", "split": "dev"}, tb_prefix="dev")
    logger.close()
    [init] = fake.inits
    assert init["project"] == "pocl" and init["resume"] == "allow" and init["name"].startswith("myrun-")
    assert fake.configs == [{"train": {"seed": 3}}]
    assert [s for s, _ in fake.logs] == [1, 2, 3, 3]
    assert fake.logs[0][1].keys() == {"train/loss", "train/lr", "train/nan"}  # numbers only, as TensorBoard's tags
    assert math.isnan(fake.logs[0][1]["train/nan"])
    assert fake.logs[3][1] == {"dev/dev_ce": 2.5}
    assert fake.finished == 1
    state = json.loads((run / "trackio" / trackers.STATE_FILE).read_text())
    assert state["last_step"] == 3 and init["name"] == f"myrun-{state['id']}"
    # resumed from the checkpoint of step 1: steps 2 and 3 are replayed (not sent again), 4 is new
    logger = MetricsLogger(run, report_to=["trackio"], resume_step=1)
    for step in (2, 3, 4):
        logger.log({"step": step, "loss": 1.0 / step}, tb_prefix="train")
    logger.close()
    assert fake.inits[1]["name"] == init["name"] and fake.inits[1]["resume"] == "allow"
    assert [s for s, _ in fake.logs] == [1, 2, 3, 3, 4]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]  # the JSONL file as before
    # a fresh run (no checkpoint) in the same folder is a new trackio run
    MetricsLogger(run, report_to=["trackio"]).close()
    assert fake.inits[2]["name"] != init["name"]


def test_a_tracker_that_cannot_start_stops_the_run_with_a_config_error(tmp_path, monkeypatch):
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(ConfigError, match=r"train.report_to: wandb did not start: RuntimeError: api_key not "
                                          r"configured \(no-tty\) \(offline: WANDB_MODE=offline\)"):
        MetricsLogger(tmp_path, report_to=["tensorboard", "wandb"])


def test_only_the_main_process_starts_trackers(tmp_path, monkeypatch):
    fake = FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    logger = MetricsLogger(tmp_path, report_to=["trackio", "tensorboard"], enabled=False)
    logger.log({"step": 1, "loss": 1.0}, tb_prefix="train")
    logger.close()
    assert fake.inits == [] and list(tmp_path.iterdir()) == []


def test_tensorboard_tracker_keeps_folder_tags_and_purges_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, report_to=["tensorboard"])
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": float(step), "stage_index": 0, "stage": "s", "split": "train"},
                   tb_prefix="train")
    logger.close()
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"], resume_step=1)
    logger.log({"step": 2, "loss": 20.0}, tb_prefix="train")
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/stage_index"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 20.0)]  # step 3 purged


# ----------------------------------------------------------------------------------- W&B offline
def wandb_history(run_dir: Path) -> list[tuple[str, dict]]:
    """(offline run folder, history row) of every W&B offline run in ``run_dir/wandb``, oldest first: the
    ``.wandb`` files read with wandb's protobuf records (32 KiB blocks of CRC, length, type chunks after a 7-byte
    ``:W&B`` header, as wandb's datastore writes them)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        [path] = folder.glob("run-*.wandb")
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0 and length == 0:
                break
            pending += chunk
            if kind in (1, 4):  # FULL, LAST
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "config":
                    rows.append((folder.name, {"_config": [item.key for item in record.config.update]}))
                if record.WhichOneof("record_type") == "history":
                    rows.append((folder.name, {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                               for item in record.history.item}))
    return rows


def expected_tracker_values(records: list[dict]) -> dict[int, dict[str, float]]:
    """metrics.jsonl as step -> {PREFIX/KEY: value}, the values every tracker gets."""
    out: dict[int, dict[str, float]] = {}
    for rec in records:
        out.setdefault(rec["step"], {}).update(trackers.numeric_metrics(rec, rec["split"]))
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # wandb's service logs, not the run's
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory
    return cwd


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_of_metrics_jsonl(tmp_path, tiny_pair, tiny_data, wandb_offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pocl.pipeline import distill

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"tensorboard": True, "report_to": ["tensorboard", "wandb"],
                                                             "selection_metric": "dev_ce", "eval_every": 3})
    result = distill(cfg)
    assert result.status == "completed"
    run = tmp_path / "run"
    assert list(wandb_offline.iterdir()) == []
    records = read_metrics(run / "metrics.jsonl")
    expected = expected_tracker_values(records)
    rows = wandb_history(run)
    assert len({folder for folder, _ in rows}) == 1
    configs = [row.pop("_config") for _, row in rows if "_config" in row]
    assert any({"model", "loss", "train"} <= set(keys) for keys in configs)  # config.yaml, stored with the run
    rows = [(folder, row) for folder, row in rows if row]
    got: dict[int, dict] = {}
    for _, row in rows:
        step = row.pop("_step")
        assert step not in got  # one row per step: train and dev of a step together
        got[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert got == expected
    assert {"train/loss", "train/ce", "train/kd", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/temperature", "train/alpha", "train/stage_index", "train/epoch"} <= got[1].keys()
    assert {"dev/dev_ce", "dev/dev_loss"} <= got[3].keys()
    state = json.loads((run / "wandb" / trackers.STATE_FILE).read_text())
    assert state["last_step"] == 6 and rows[0][0].endswith("-" + state["id"])
    # TensorBoard as before: OUTPUT/tensorboard, the same tags
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert tb.keys() == {(k, step) for step, values in expected.items() for k in values}
    assert tb[("train/loss", 1)] == pytest.approx(expected[1]["train/loss"], rel=1e-6)


@pytest.mark.slow
def test_wandb_resume_continues_the_same_run_without_duplicate_steps(tmp_path, tiny_pair, tiny_data,
                                                                      wandb_offline):
    from tests.training.test_trainer import _trainer, crash_at

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"report_to": ["wandb"], "epochs": 2, "save_every": 2,
                                                             "selection_metric": "dev_ce"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(cfg, step_callbacks=[crash_at(8)]).train()  # logged 1..7, checkpoint at 6
    run = tmp_path / "run"
    assert json.loads((run / "wandb" / trackers.STATE_FILE).read_text())["last_step"] == 7
    assert _trainer(cfg).train().status == "completed"  # replays step 7, then 8..12
    rows = [(folder, row) for folder, row in wandb_history(run) if "_config" not in row]
    folders = sorted({folder for folder, _ in rows})
    # the same run id twice (wandb adds "-1" to a folder name taken within the same second)
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", f).group(1) for f in folders}
    assert len(folders) == 2 and len(ids) == 1
    steps = [row["_step"] for _, row in rows]
    assert steps == sorted(set(steps)) == list(range(1, 13))  # no step twice, none missing
    expected = expected_tracker_values(read_metrics(run / "metrics.jsonl"))
    for _, row in rows:
        step = row["_step"]
        got = {k: v for k, v in row.items() if not k.startswith("_")}
        assert got.keys() == expected[step].keys()
        for key, value in got.items():  # step 7 was sent by the first process: the same numbers but its speed
            if key != "train/tokens_per_s":
                assert value == pytest.approx(expected[step][key], rel=1e-6), (step, key)


@pytest.mark.slow
def test_two_processes_make_one_wandb_run(tmp_path, tiny_pair, tiny_data, wandb_offline):
    """torchrun, 2 CPU processes (gloo): only the main process starts W&B; its run holds metrics.jsonl."""
    import subprocess

    teacher, student = tiny_pair
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pocl", "distill", "--teacher", str(teacher), "--student", str(student),
           "--train-file", str(tiny_data[0]), "--dev-file", str(tiny_data[1]), "--max-length", "48",
           "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2", "--alpha",
           "0.5", "--epochs", "1", "--no-progress", "--log-every", "2", "--selection-metric", "dev_ce",
           "--report-to", "wandb", "tensorboard", "--output-dir", str(out), "--num-processes", "2"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)  # WANDB_* from the fixture
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for _, row in wandb_history(out) if "_config" not in row]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    expected = expected_tracker_values(read_metrics(out / "metrics.jsonl"))
    assert sorted(expected) == [2, 4, 6]
    assert {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in rows} == expected
    assert list((out / "tensorboard").glob("events.out.tfevents*"))


def test_a_run_folder_with_wandb_files_is_still_a_run_folder(tmp_path):
    from pocl.training.output_dirs import check_output_dir

    (tmp_path / "run" / "wandb").mkdir(parents=True)
    (tmp_path / "run" / "trackio").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    check_output_dir(tmp_path / "run", kind="run")
