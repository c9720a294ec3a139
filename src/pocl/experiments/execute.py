"""Running the matrix: pocl commands as subprocesses (or in this process), the models made once
(GGUF conversion, init-student of the student and the assistant teacher, healing), the shared ranking, the training runs and the cached
evaluations."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from pocl.artifacts import Stamp, atomic_write, atomic_write_json
from pocl.config.eval import EvalConfig
from pocl.errors import ConfigError, PoclError
from pocl.experiments.plan import (
    Run,
    assistant_dir,
    build_plan,
    heal_run,
    merge,
    model_dirs,
    read_json,
    run_dir,
    training_status,
)
from pocl.experiments.spec import Spec
from pocl.fingerprints import model_fingerprint, stable_hash

log = logging.getLogger("pocl.matrix")


class Interrupted(Exception):
    """A pocl command of the matrix was interrupted (exit 130): the matrix stops; rerunning resumes it."""


def _command(kind: str, config_path: Path, extra: list[str]) -> list[str]:
    return ["distill" if kind == "distill" else "rank", "--config", str(config_path), *extra]


#: Runs a pocl command line in this process and returns its exit status: ``pocl.cli.main``, handed in
#: by the caller (``pocl matrix`` or the example script), since pocl.cli imports this package.
PoclMain = Callable[[list[str]], int]


def run_pocl(argv: list[str], log_path: Path, *, pocl_main: PoclMain | None) -> int:
    """``pocl ARGV`` as a subprocess (output appended to ``log_path``), or through ``pocl_main`` in this
    process when given; returns its exit status. Ctrl-C / SIGTERM are passed on to the run (it saves a
    checkpoint) and raise Interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("$ pocl %s   (log: %s)", " ".join(argv), log_path)
    if pocl_main is not None:
        code = pocl_main(argv)
    else:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ pocl {' '.join(argv)}\n")
            fh.flush()
            # Its own session: a Ctrl-C in the terminal reaches the run once, through this loop (pocl stops
            # at the second signal without saving, so it must not get the terminal's copy as well).
            proc = subprocess.Popen([sys.executable, "-m", "pocl", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
            try:
                while True:
                    try:
                        code = proc.wait()
                        break
                    except KeyboardInterrupt:
                        proc.send_signal(signal.SIGINT)
            finally:
                signal.signal(signal.SIGTERM, previous)
    if code == 130:
        raise Interrupted(f"pocl {argv[0]} was interrupted; run the same command again to resume")
    return code


def _write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` as YAML to ``path`` (atomically; left untouched when it already holds that text)."""
    text = yaml.safe_dump(data, sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write(path, text, make_parents=True)
    return path


def prepare_models(spec: Spec, *, pocl_main: PoclMain | None = None) -> None:
    """Convert a .gguf teacher once; make the student (and the assistant teacher of pocl-assistant) with
    init-student once; heal each once. Returns nothing; a healing run made with another config, or one that
    fails, raises."""
    from pocl.student_init import init_student  # loads torch

    teacher, student = model_dirs(spec, healed=False)

    def done(folder: str, source: str, options: dict) -> bool:
        info = read_json(Path(folder) / "init_student.json")
        return info is not None and info.get("teacher") == source and info.get("options") == options

    if spec.teacher.endswith(".gguf") and not done(teacher, spec.teacher, {"keep_every": 1}):
        log.info("converting the GGUF teacher %s -> %s", spec.teacher, teacher)
        init_student(spec.teacher, teacher, keep_every=1, extra_info={"options": {"keep_every": 1}})
    for role, options, folder in (("student", spec.student, student),
                                  ("assistant", spec.assistant, assistant_dir(spec, healed=False))):
        if isinstance(options, dict) and not done(folder, teacher, options):
            log.info("making the %s from %s with %s -> %s", role, teacher, options, folder)
            init_student(teacher, folder, keep_layers=options.get("keep_layers"),
                         keep_every=options.get("keep_every"), num_layers=options.get("num_layers"),
                         keep_last=options.get("keep_last", True), extra_info={"options": options})
        heal = heal_run(spec, role)
        if heal is not None:
            _heal(spec, heal, pocl_main=pocl_main)


def _heal(spec: Spec, heal: Run, *, pocl_main: PoclMain | None) -> None:
    """Train the healing run ``heal`` (:func:`pocl.experiments.plan.heal_run`) unless it is done."""
    status, diff = training_status(spec, heal)
    if status == "changed":
        raise ConfigError(f"{spec.path}: models.heal: the healing run in {run_dir(spec, heal)} was made with "
                          f"another config ({'; '.join(diff[:6])}); delete that folder to heal again (every run "
                          "starts from it)")
    if status != "done":
        cfg = _write_yaml(spec.output_dir / "configs" / f"{heal.name}.yaml", heal.config)
        if run_pocl(_command("distill", cfg, []), spec.output_dir / "logs" / f"{heal.name}.log", pocl_main=pocl_main):
            raise PoclError(f"the healing run {heal.name} failed; see {spec.output_dir / 'logs' / (heal.name + '.log')}")


def rank_config(spec: Spec, plan: list[Run]) -> dict:
    """The ``pocl rank`` config: the first POCL run's of ``plan``, with the paper's measurer (both signals).
    Only the model, data and measurer settings matter for the ranking (they are its stamp)."""
    first = next(r for r in plan if r.is_pocl)
    config = merge(first.config, {"train": {"output_dir": str(spec.output_dir / "ranking")},
                                  "curriculum": {"measurer": "rrf"}})
    return config


def seed_ranking(spec: Spec, run: Run) -> None:
    """Start a POCL run from the shared ranking (pocl checks its stamp and re-orders for its measurer):
    copies ranking.jsonl and its meta file into the run's folder unless it has one. Returns nothing."""
    src = spec.output_dir / "ranking" / "ranking.jsonl"
    dst = run_dir(spec, run) / "ranking.jsonl"
    if dst.exists() or not src.is_file():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    for name in ("ranking.jsonl", "ranking.meta.json"):
        shutil.copyfile(src.with_name(name), dst.with_name(name))


def train_all(spec: Spec, plan: list[Run], *, pocl_main: PoclMain | None, rerun_changed: bool) -> dict[str, str]:
    """Rank once, then every training run that is not done. Returns run name -> status."""
    statuses = {r.name: training_status(spec, r) for r in plan if r.config is not None}
    changed = [(n, d) for n, (s, d) in statuses.items() if s == "changed"]
    if changed and not rerun_changed:
        lines = "\n".join(f"  {n}: " + "; ".join(d[:6]) for n, d in changed)
        raise ConfigError(f"{len(changed)} finished runs were made with another config (spec {spec.path}):\n{lines}\n"
                          "Delete their folders under " + str(spec.output_dir / "runs") + " or pass --rerun-changed.")
    todo = [r for r in plan if r.config is not None and statuses[r.name][0] != "done"]
    if any(r.is_pocl for r in todo):
        # from the whole matrix, not this --only selection: ranking.yaml is then the same file on every call
        cfg = _write_yaml(spec.output_dir / "configs" / "ranking.yaml", rank_config(spec, build_plan(spec)))
        if run_pocl(_command("rank", cfg, []), spec.output_dir / "logs" / "ranking.log", pocl_main=pocl_main):
            raise PoclError(f"pocl rank failed; see {spec.output_dir / 'logs' / 'ranking.log'}")
    result = {n: s for n, (s, _) in statuses.items()}
    for i, run in enumerate(todo, 1):
        log.info("[%d/%d] %s (%s)", i, len(todo), run.name, statuses[run.name][0])
        cfg = _write_yaml(spec.output_dir / "configs" / f"{run.name}.yaml", run.config)
        if run.is_pocl:
            seed_ranking(spec, run)
        extra = ["--overwrite"] if statuses[run.name][0] == "changed" else []
        t0 = time.perf_counter()
        code = run_pocl(_command("distill", cfg, extra), spec.output_dir / "logs" / f"{run.name}.log",
                        pocl_main=pocl_main)
        result[run.name] = "done" if code == 0 else f"failed (exit {code})"
        log.info("%s: %s in %.0f s", run.name, result[run.name], time.perf_counter() - t0)
    return result


# ------------------------------------------------------------------------------------------ evaluation
def eval_config_dict(spec: Spec, name: str, model_path: str) -> dict:
    """The ``pocl eval`` config of one model: the spec's ``eval`` with the model and OUTPUT/eval/NAME."""
    return {**spec.eval, "models": [f"{name}={model_path}"], "output_dir": str(spec.output_dir / "eval" / name)}


def model_path_of(spec: Spec, run: Run) -> Path | str:
    """The model a run is evaluated on: its final/ (or best/, per the spec's checkpoint), or the reference model."""
    return run.model_path if run.config is None else run_dir(spec, run) / spec.checkpoint


def evaluate(spec: Spec, run: Run, *, progress: bool = True) -> dict | None:
    """The run's ``pocl eval`` results.json, from the cache when its stamp still matches. None when the
    model does not exist (the run is not finished)."""
    from pocl.evaluation.runner import run_eval

    path = model_path_of(spec, run)
    if run.config is not None and not Path(path).is_dir():
        return None
    values = eval_config_dict(spec, run.name, str(path))
    config = EvalConfig.from_dict({**values, "progress": progress and values.get("progress", True)})
    settings = {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "progress")}
    # stamp.json holds the stamp's inputs (a hash of the settings, the model's fingerprint), written
    # after results.json: results without a matching stamp are evaluated again.
    stamp = Stamp({"settings": stable_hash(settings), "model": model_fingerprint(str(path))},
                  labels={"settings": "evaluation settings (hash)", "model": "model (fingerprint)"})
    out = Path(config.output_dir)
    cached = read_json(out / "results.json")
    stored = read_json(out / "stamp.json")
    if cached is not None and stored == dict(stamp.inputs):
        return cached
    why = "no results yet" if cached is None or stored is None else stamp.why_stale(stored)
    log.info("evaluating %s (%s): %s", run.name, path, why)
    if isinstance(stored, dict) and set(stored) == set(stamp.inputs):
        # the matrix's own stamp of an older evaluation: removed first, so that the folder holds only
        # pocl eval's files again and pocl eval may replace them (it refuses a folder with other entries)
        (out / "stamp.json").unlink()
    report = run_eval(config)
    atomic_write_json(out / "stamp.json", dict(stamp.inputs), indent=None)
    return report.data
