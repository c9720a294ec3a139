"""The model card (``README.md``) of a run's ``final/`` and ``best/`` folders.

The card is a Hugging Face model card: YAML metadata built and checked with
:class:`huggingface_hub.ModelCardData` (library, base model, tags, datasets, license, pipeline tag and a
``model-index`` of the scores known), then a body that says how the model was made: the teacher and the
student, the data and its hash (the run's fingerprints), the method, the curriculum's stages, the budget,
the dev scores, the evaluations and the command line.

It is written into the folder's temporary copy before the manifest (:func:`write_card`, called while
:func:`pocl.artifacts.folders.atomic_folder_write` fills ``final/`` or ``best/``), so it is one of the
files the manifest lists and a crash never leaves half a card. :func:`refresh_cards` (``pocl card``)
rewrites the cards of a finished run with the results of ``pocl eval``: as a new atomic folder write
(the model's files hard-linked, a new manifest), only in folders pocl wrote whose files match their
manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pocl._version import __version__
from pocl.artifacts import atomic_write
from pocl.training.summary import (
    _fmt,  # the table cell of summary.md: the card's tables read the same
)

log = logging.getLogger("pocl.card")

CARD_FILE = "README.md"
#: The marker that tells a card pocl wrote (``pocl card`` only refreshes those).
MARKER = "<!-- written by pocl: `pocl card` regenerates this file -->"
#: The dev scores a card shows (metrics.jsonl's dev records, pocl.training.selection).
_DEV_METRICS = ("dev_rouge_l", "dev_ce", "dev_loss", "dev_kd")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: pocl eval's metrics and their names in a model-index.
_EVAL_METRICS = (("rouge_l", "rougeL", "ROUGE-L"), ("exact_match", "exact_match", "exact match"))


def _hub_id(value: Any) -> str | None:
    """``value`` when it names a Hub repository (``owner/name``, not a local path), else None."""
    if not isinstance(value, str) or not _HUB_ID.match(value) or Path(value).exists():
        return None
    return value


def _student_license(student: Any) -> str | None:
    """The license in the metadata of a local student folder's own card, if any."""
    if not isinstance(student, str) or not (Path(student) / CARD_FILE).is_file():
        return None
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(Path(student) / CARD_FILE).data.license
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):  # no license we can read
        return None


def last_dev_scores(output_dir: Path) -> dict[str, Any] | None:
    """The last dev evaluation of ``metrics.jsonl`` (its ``dev_*`` values and step), or None."""
    path = Path(output_dir) / "metrics.jsonl"
    last = None
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("split") == "dev":
                    last = rec
    except OSError:
        return None
    if last is None:
        return None
    return {"step": last.get("step"), **{k: v for k, v in last.items() if k in _DEV_METRICS}}


def eval_scores(results: dict[str, Any], folder: Path, source: str = "") -> list[dict[str, Any]]:
    """The entries of a ``pocl eval`` results.json (``results``) whose model is ``folder``: one per
    evaluation set, with its metrics (``rouge_l``, ``exact_match`` ...), ``n`` and ``source``."""
    out = []
    target = Path(folder).resolve()
    for name, entry in (results.get("models") or {}).items():
        spec = entry.get("path") or entry.get("spec") or entry.get("model")
        if not isinstance(spec, str) or Path(spec).resolve() != target:
            continue
        for set_name, scores in (entry.get("sets") or {}).items():
            path = ((results.get("sets") or {}).get(set_name) or {}).get("path")
            row = {"model": name, "set": set_name, "set_path": path, "source": source, "n": scores.get("n")}
            for key, _, _ in _EVAL_METRICS:
                value = scores.get(key)  # {"mean", "std", ...} (or a plain number)
                row[key] = value.get("mean") if isinstance(value, dict) else value
                row[key + "_std"] = value.get("std") if isinstance(value, dict) else None
            out.append(row)
    return out


def _finite(value: Any) -> bool:
    """A score the model-index can hold (a finite number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pm(row: dict[str, Any], key: str) -> str:
    """``mean ± std`` of a pocl eval metric (just the mean without a std)."""
    std = row.get(key + "_std")
    return _fmt(row.get(key)) + (f" ± {_fmt(std)}" if isinstance(std, (int, float)) else "")


def card_data(summary: dict[str, Any], config: dict[str, Any], *, evals: list[dict[str, Any]] = (),
              dev: dict[str, Any] | None = None, name: str = "final"):
    """The card's metadata (:class:`huggingface_hub.ModelCardData`)."""
    from huggingface_hub import EvalResult, ModelCardData

    model, data = config.get("model") or {}, config.get("data") or {}
    tags = ["knowledge-distillation", "distillation", "pocl", str(summary.get("method") or "kd")]
    if summary.get("curriculum") == "pocl":
        tags.append("curriculum-learning")
    datasets = [d for d in (_hub_id(data.get("train_file")), _hub_id(data.get("dev_file"))) if d]
    results = []
    dev_path = data.get("dev_file")
    for key, metric_type, metric_name in (("dev_rouge_l", "rougeL", "dev ROUGE-L"), ("dev_ce", "loss", "dev CE")):
        if dev and _finite(dev.get(key)):
            results.append(EvalResult(task_type="text-generation", dataset_type=_hub_id(dev_path) or "json",
                                      dataset_name=f"dev set ({Path(str(dev_path)).name})", dataset_split="dev",
                                      metric_type=metric_type, metric_name=metric_name, metric_value=dev[key]))
    for ev in evals:
        for key, metric_type, metric_name in _EVAL_METRICS:
            if _finite(ev.get(key)):
                results.append(EvalResult(task_type="text-generation",
                                          dataset_type=_hub_id(ev.get("set_path")) or "json",
                                          dataset_name=str(ev["set"]), metric_type=metric_type,
                                          metric_name=metric_name, metric_value=ev[key]))
    return ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=tags,
        base_model=_hub_id(model.get("student")), datasets=datasets or None,
        license=_student_license(model.get("student")),
        model_name=f"{Path(str(summary.get('output_dir') or 'pocl')).name}-{name}" if results else None,
        eval_results=results or None)


def _samples_trained(summary: dict[str, Any], batch_size: int) -> int:
    """Training samples the run's finished stages went through (a stage cut short: its steps x batch size),
    plus the steps after them (best/ written inside a stage) x batch size."""
    total, steps_in_stages = 0, 0
    for st in summary.get("stages") or []:
        steps = int(st.get("steps") or 0)
        full = round(float(st.get("num_samples") or 0) * float(st.get("epochs") or 0))
        total += full if steps >= int(st.get("planned_steps") or steps) else min(full, steps * batch_size)
        steps_in_stages += steps
    return total + max(int(summary.get("global_steps") or 0) - steps_in_stages, 0) * batch_size


def _stage_table(summary: dict[str, Any], config: dict[str, Any]) -> list[str]:
    stages = summary.get("stages") or []
    teachers = any(st.get("teacher") for st in stages)
    head = "| stage | samples | epochs | optimizer steps | T | alpha |" + (" teacher |" if teachers else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    default_teacher = (config.get("model") or {}).get("teacher")
    for st in stages:
        row = (f"| {st.get('name')} | {st.get('num_samples')} | {_fmt(st.get('epochs'))} | {st.get('steps')}"
               f"{' (plateau)' if st.get('advanced_early') else ''} | {_fmt(st.get('temperature'), '.3g')} | "
               f"{_fmt(st.get('alpha'), '.3g')} |")
        if teachers:
            teacher = st.get("teacher") or default_teacher
            row += f" `{teacher}` |" if teacher else " – |"
        lines.append(row)
    return lines


def render_card(summary: dict[str, Any], config: dict[str, Any], *, name: str = "final",
                evals: list[dict[str, Any]] = (), dev: dict[str, Any] | None = None) -> str:
    """The whole ``README.md`` of ``final/`` or ``best/`` (``name``) of the run ``summary``/``config``
    (``config``: the run's config as a dict, :meth:`pocl.config.DistillConfig.to_dict`). ``dev``: the dev
    scores of this model (:func:`last_dev_scores`); ``evals``: ``pocl eval`` scores (:func:`eval_scores`)."""
    from huggingface_hub import ModelCard

    model, data = config.get("model") or {}, config.get("data") or {}
    loss, train, cur = config.get("loss") or {}, config.get("train") or {}, config.get("curriculum") or {}
    fps = summary.get("fingerprints") or {}
    method = summary.get("method") or loss.get("method")
    what = ("the run's model after its last step" if name == "final" else
            f"the student at step {summary.get('best_step')}, the best by {summary.get('selection_metric')} "
            "so far in the run")
    lines = [MARKER, "", f"# {Path(str(summary.get('output_dir') or 'pocl')).name} ({name}/)", "",
             (f"A student distilled from a teacher with pocl {__version__} (white-box knowledge distillation of "
              f"causal LMs with the POCL curriculum). This folder is `{name}/`: {what}."), "",
             "## Models", "", "| role | model | fingerprint |", "|---|---|---|",
             (f"| teacher | `{model.get('teacher')}` | `{fps.get('teacher')}` |" if model.get("teacher") else
              f"| teacher | none (method {method}) | – |"),
             f"| student (initial) | `{model.get('student')}` | `{fps.get('student_init')}` |"]
    for path, fp in sorted((fps.get("stage_teachers") or {}).items()):
        lines.append(f"| stage teacher | `{path}` | `{fp}` |")
    lines += ["", "## Data", "", "| split | file | samples | hash of the tokenized data |", "|---|---|---|---|",
              f"| train | `{data.get('train_file')}` | {data.get('max_train_samples') or 'all'} | "
              + f"`{fps.get('train_data')}` |"]
    if data.get("dev_file"):
        lines.append(f"| dev | `{data.get('dev_file')}` | {summary.get('dev_rouge_samples', '–')} used for ROUGE-L "
                     f"| `{fps.get('dev_data')}` |")
    lines += ["", f"Data hash: `{fps.get('train_data')}` (train), stages: `{fps.get('stages')}`.", "",
              "## Method", "", f"- method (`loss.method`): **{method}**; divergence: **{loss.get('divergence')}**",
              f"- curriculum: **{summary.get('curriculum') or cur.get('curriculum')}**"
              + (f" (difficulty measurer: {summary.get('measurer')})" if summary.get("measurer") else ""),
              (f"- batch size {train.get('batch_size')}, learning rate "
               f"{_fmt((config.get('optim') or {}).get('lr'))}, seed {train.get('seed')}"), "", "## Curriculum", "",
              *([] if name == "final" else [f"Stages finished before this model was saved (step {summary.get('best_step')}):", ""]),
              *_stage_table(summary, config), "",
              "## Budget", ""]
    steps = summary.get("global_steps") or 0
    samples = _samples_trained(summary, int(train.get("batch_size") or 0))
    lines += [f"- optimizer steps: {steps} ({summary.get('skipped_steps', 0)} skipped as non-finite)",
              f"- samples trained: {samples} (each stage's samples x epochs; steps x batch size if cut short)",
              f"- wall time: {_fmt(summary.get('train_seconds'), '.1f')} s of training"
              + (f", {_fmt((summary.get('ranking') or {}).get('measure_seconds'), '.1f')} s of difficulty measurement"
                 if summary.get("ranking") else ""), "", "## Evaluation", ""]
    if dev:
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in dev.items() if k != "step")
        lines.append(f"- dev set at step {dev.get('step')}: {scores}")
    if summary.get("best_metric") is not None:
        lines.append(f"- best/ by {summary.get('selection_metric')}: {_fmt(summary['best_metric'])} at step "
                     f"{summary.get('best_step')}")
    if not dev and summary.get("best_metric") is None:
        lines.append("- no dev evaluation (no dev set)")
    if evals:
        lines += ["", "`pocl eval`:", "", "| set | ROUGE-L | exact match | n | results |", "|---|---|---|---|---|"]
        for ev in evals:
            lines.append(f"| {ev['set']} | {_pm(ev, 'rouge_l')} | {_pm(ev, 'exact_match')} | "
                         f"{_fmt(ev.get('n'))} | `{ev.get('source')}` |")
    else:
        lines += ["", (f"No `pocl eval` results yet: `pocl card {summary.get('output_dir')} --eval RESULTS.json` "
                       "adds them to this card.")]
    lines += ["", "## How it was made", "", f"- pocl {__version__}",
              f"- command: `{summary.get('command') or 'pocl distill --config config.yaml'}`",
              "- the run's full settings: `config.yaml` and `summary.json` in the run folder", ""]
    card = ModelCard.from_template(card_data(summary, config, evals=evals, dev=dev, name=name),
                                   template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body="\n".join(lines))
    return str(card)


def write_card(folder: Path, *, summary: dict[str, Any], config: dict[str, Any], name: str,
               evals: list[dict[str, Any]] = (), output_dir: Path | None = None) -> Path:
    """Write ``folder/README.md`` (``folder``: the temporary folder of final/ or best/, before its manifest;
    ``output_dir``: the run folder, whose metrics.jsonl has the dev scores)."""
    output_dir = Path(output_dir) if output_dir is not None else Path(folder).parent
    dev = last_dev_scores(output_dir) if name == "final" else None
    if name == "best" and summary.get("best_metric") is not None:
        dev = {"step": summary.get("best_step"), summary.get("selection_metric"): summary.get("best_metric")}
    path = Path(folder) / CARD_FILE
    atomic_write(path, render_card(summary, config, name=name, evals=evals, dev=dev))
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def refresh_cards(run_dir: Path, results_files: list[Path] = ()) -> list[Path]:
    """``pocl card``: rewrite the cards of ``run_dir``'s final/ and best/ from its summary.json and
    config.yaml, with the scores of the ``pocl eval`` results files that evaluated those folders. Each
    folder is replaced atomically with its files hard-linked (copied where links are impossible) and a
    new manifest; a folder that does not match its manifest, or holds files pocl did not write, is
    refused (CheckpointError) and left unchanged. Returns the cards written."""
    import yaml

    from pocl.artifacts.folders import atomic_folder_write, verify_folder
    from pocl.errors import CheckpointError

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{run_dir} is not a finished pocl run (summary.json, config.yaml): {exc}") from exc
    results = []
    for f in results_files:
        try:
            results.append((str(f), json.loads(Path(f).read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the pocl eval results {f}: {exc}") from exc
    if not any((run_dir / name).is_dir() for name in ("final", "best")):
        raise CheckpointError(f"{run_dir} has no final/ or best/ model (the run is not finished)")
    written = []
    for name in ("final", "best"):
        folder = run_dir / name
        if not folder.is_dir():
            continue
        manifest = verify_folder(folder)  # CheckpointError: not intact, nothing changed
        card = folder / CARD_FILE
        if CARD_FILE not in manifest["files"] or MARKER not in card.read_text(encoding="utf-8"):
            raise CheckpointError(f"{card} is not a card pocl wrote; nothing was changed")
        evals = [ev for source, res in results for ev in eval_scores(res, folder, source)]
        summary_best = summary
        if name == "best":  # as when best/ was written: the stages recorded before its step
            step = manifest.get("step", summary.get("best_step"))
            summary_best = dict(summary, best_step=step, global_steps=step, stages=[
                st for st in summary.get("stages") or [] if step is None or st.get("end_global_step", 0) < step])
        extra = {k: v for k, v in manifest.items() if k not in ("format", "files")}

        def fill(tmp: Path, folder=folder, files=manifest["files"], s=summary_best, n=name, e=evals) -> None:
            for rel in files:
                if rel != CARD_FILE:
                    _link_or_copy(folder / rel, tmp / rel)
            write_card(tmp, summary=s, config=config, name=n, evals=e, output_dir=run_dir)

        atomic_folder_write(folder, fill, manifest_extra=extra)
        log.info("wrote %s (%d pocl eval score(s))", card, len(evals))
        written.append(card)
    return written
