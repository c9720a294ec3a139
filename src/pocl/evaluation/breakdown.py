"""Scores per difficulty bucket, from a ranking of the evaluated samples.

A ranking file (``ranking.jsonl``, written by ``pocl rank``) has one JSON object per line with at
least ``"id"`` (string or integer) and ``"rank"`` (integer, 1 = easiest); other keys (``score``,
``rouge_l``, ``loss`` ...) are kept. Lines without both ``id`` and ``rank`` that hold neither of them
(a header or stamp line) are skipped; a line with only one of them is an error.

The buckets are quantiles of rank **among the evaluated ids that the ranking contains**: those ids
are sorted by (rank, id) and cut into ``num_buckets`` slices of equal size (sizes differ by at most
one; with 4 buckets: quartiles Q1 = easiest ... Q4 = hardest). Per bucket, each seed's mean over the
bucket's samples is computed, then mean and std over seeds, as for the whole set.

Coverage: evaluated ids missing from the ranking are left out of the breakdown and counted. If no
evaluated id is in the ranking (for example a *training-set* ranking given for a test set), a
:class:`pocl.errors.DataError` explains how to make an evaluation-set ranking.

``pocl eval`` is stricter (:func:`verify_ranking`, before anything is generated): every evaluated
sample must be in the ranking **with the same sample hash** (``sample_hash``, which ``pocl rank``
writes on every line: a hash of the id, the rendered prompt and the references, computed by
:func:`pocl.fingerprints.sample_hashes`). Ids alone prove nothing: rows without an ``id`` are
numbered ``000000``, ``000001`` ... in every file, so a training-set ranking would otherwise "cover"
a test set. A ranking that lacks an evaluated sample, has no hash for it, or has another hash stops
the run with a :class:`pocl.errors.CheckpointError` naming both files and the samples.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pocl.data import id_sort_key
from pocl.errors import CheckpointError, ConfigError, DataError
from pocl.evaluation.metrics import mean_std


@dataclasses.dataclass
class Ranking:
    """``ranks[id]`` = rank (1 = easiest); ``rows[id]`` = the whole line's object."""

    path: str
    ranks: dict[str, int]
    rows: dict[str, dict[str, Any]]

    def __len__(self) -> int:
        return len(self.ranks)

    def ordered_ids(self) -> list[str]:
        return sorted(self.ranks, key=lambda i: (self.ranks[i], id_sort_key(i)))


def load_ranking(path: str | Path) -> Ranking:
    """Read a ranking.jsonl; a malformed line raises DataError naming the file, line and field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError("ranking file not found", path=str(path))
    ranks: dict[str, int] = {}
    rows: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"invalid JSON: {e}", path=str(path), line=number) from None
            if not isinstance(row, Mapping):
                raise DataError("a ranking line must be a JSON object", path=str(path), line=number)
            has_id, has_rank = row.get("id") is not None, row.get("rank") is not None
            if not has_id and not has_rank:
                continue  # a header / stamp line
            if not has_id:
                raise DataError("missing sample id", path=str(path), line=number, field="id")
            if not has_rank:
                raise DataError("missing rank (an integer, 1 = easiest)", path=str(path), line=number, field="rank")
            rid, rank = row["id"], row["rank"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise DataError("must be a string or an integer", path=str(path), line=number, field="id")
            if (isinstance(rank, bool) or not isinstance(rank, (int, float))
                    or (isinstance(rank, float) and not rank.is_integer()) or rank < 1):
                raise DataError(f"must be an integer >= 1, got {rank!r}", path=str(path), line=number, field="rank")
            rid = str(rid)
            if rid in ranks:
                raise DataError(f"duplicate id '{rid}' (also on line {first_line[rid]})", path=str(path),
                                line=number, field="id")
            ranks[rid], rows[rid], first_line[rid] = int(rank), dict(row), number
    if not ranks:
        raise DataError("no ranked samples (no line with 'id' and 'rank')", path=str(path))
    return Ranking(str(path), ranks, rows)


def ranking_specs(specs: Sequence[str], set_names: Sequence[str]) -> dict[str, str]:
    """``[SET=]FILE`` specs -> {set name: ranking path}. SET may be omitted only with one set."""
    from pocl.config.eval import split_named_spec

    out: dict[str, str] = {}
    for spec in specs:
        name, path = split_named_spec(spec, kind="ranking")
        if name is None:
            if len(set_names) != 1:
                raise ConfigError(f"--ranking {spec}: with several evaluation sets ({', '.join(set_names)}) say which "
                                  f"set it ranks: --ranking SET={path}")
            name = set_names[0]
        if name not in set_names:
            raise ConfigError(f"--ranking {spec}: no evaluation set named '{name}' (sets: {', '.join(set_names)})")
        if name in out:
            raise ConfigError(f"two rankings for set '{name}'")
        out[name] = path
    return out


def check_coverage(ranking: Ranking, evaluated_ids: Sequence[str], *, set_name: str = "",
                   set_path: str = "EVAL_FILE") -> dict[str, Any]:
    """How many evaluated ids the ranking has; raise DataError when it has none of them."""
    evaluated = list(evaluated_ids)
    covered = [i for i in evaluated if i in ranking.ranks]
    missing = [i for i in evaluated if i not in ranking.ranks]
    if not covered:
        example_r = ", ".join(repr(i) for i in ranking.ordered_ids()[:3])
        example_e = ", ".join(repr(i) for i in evaluated[:3])
        what = f"set '{set_name}'" if set_name else "the evaluated set"
        raise DataError(
            f"none of the {len(evaluated)} evaluated ids of {what} (e.g. {example_e}) is in this ranking of "
            f"{len(ranking)} samples (e.g. {example_r}). It ranks another data set, e.g. the training set, which "
            f"cannot grade a test set. Make a ranking of the evaluation set with the initial student: "
            f"`pocl rank --student INITIAL_STUDENT --train-file {set_path}`, and pass that file to --ranking.",
            path=ranking.path)
    return {"evaluated": len(evaluated), "covered": len(covered), "fraction": len(covered) / len(evaluated),
            "missing_ids": missing[:20], "missing": len(missing)}


def ranking_settings(path: str | Path) -> dict[str, Any] | None:
    """The data settings (``template``, ``use_prompt_field`` ...) that ``pocl rank`` stamped into the
    ``ranking.meta.json`` next to ``path``, or None when there is no readable metadata file."""
    from pocl.curriculum.ranking import meta_path

    mpath = meta_path(Path(path).expanduser())
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    settings = ((meta.get("signals_inputs") or {}).get("data") or {}).get("settings")
    return dict(settings) if isinstance(settings, Mapping) and settings.get("template") else None


def _examples(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def verify_ranking(ranking: Ranking, records: Sequence, template, *, set_name: str = "",
                   set_path: str = "EVAL_FILE", template_note: str = "") -> dict[str, Any]:
    """Check that ``ranking`` ranks exactly these evaluated ``records`` (pocl Records): every record's
    id is in it, with the ``sample_hash`` that ``pocl rank`` computes for the record rendered with
    ``template``. Raises :class:`CheckpointError` naming the ranking file, the data file and the
    mismatching samples; returns the coverage (all evaluated samples) otherwise.

    ``template`` must be the prompt template the ranking was made with (its ``ranking.meta.json``
    says which), since the rendered prompt is part of the hash.
    """
    from pocl.fingerprints import sample_hashes  # the hash pocl rank writes; one definition

    records = list(records)
    hashes = sample_hashes(records, template)
    missing, unhashed, differ = [], [], []
    for record, expected in zip(records, hashes):
        if record.id not in ranking.ranks:
            missing.append(record.id)
            continue
        stored = ranking.rows[record.id].get("sample_hash")
        if not stored:
            unhashed.append(record.id)
        elif stored != expected:
            differ.append(record.id)
    if missing or unhashed or differ:
        what = f"evaluation set '{set_name}' ({set_path})" if set_name else f"the evaluation set {set_path}"
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the {len(records)} evaluated samples are not in the ranking "
                            f"({_examples(missing)})")
        if differ:
            problems.append(f"{len(differ)} have the same id but another sample hash, i.e. another prompt or "
                            f"reference: the ranking was made from other rows ({_examples(differ)})")
        if unhashed:
            problems.append(f"{len(unhashed)} have no sample_hash in the ranking, so they cannot be checked "
                            f"({_examples(unhashed)})")
        raise CheckpointError(
            f"the ranking {ranking.path} does not rank {what}: " + "; ".join(problems) + ". "
            f"Sample hashes cover the id, the prompt rendered with the template{template_note} and the references; "
            f"rows without an id are numbered 000000, 000001 ... in every file, so equal ids alone do not make "
            f"a ranking of this set (a training-set ranking cannot grade a test set). Make a ranking of the "
            f"evaluation set with the initial student: `pocl rank --student INITIAL_STUDENT --train-file "
            f"{set_path}`, and pass that file to --ranking.")
    return {"evaluated": len(records), "covered": len(records), "fraction": 1.0, "missing_ids": [], "missing": 0,
            "hash_checked": len(records)}


def bucket_names(num_buckets: int) -> list[str]:
    if num_buckets == 4:
        return ["Q1 (easiest)", "Q2", "Q3", "Q4 (hardest)"]
    if num_buckets == 1:
        return ["all"]
    names = [f"B{k + 1}" for k in range(num_buckets)]
    names[0] += " (easiest)"
    names[-1] += " (hardest)"
    return names


def assign_buckets(ranking: Ranking, ids: Sequence[str], num_buckets: int = 4) -> dict[str, int]:
    """{id: bucket index (0 = easiest)} for the ids the ranking contains (equal-size slices by rank)."""
    if num_buckets < 1:
        raise ConfigError(f"num_buckets must be >= 1, got {num_buckets}")
    present = sorted({i for i in ids if i in ranking.ranks}, key=lambda i: (ranking.ranks[i], id_sort_key(i)))
    m = len(present)
    if m >= num_buckets:
        return {i: (pos * num_buckets) // m for pos, i in enumerate(present)}
    # fewer samples than buckets: spread them so that the easiest and the hardest bucket are used
    return {i: round(pos * (num_buckets - 1) / max(m - 1, 1)) for pos, i in enumerate(present)}


@dataclasses.dataclass
class Bucket:
    name: str
    index: int
    n: int
    rank_min: int | None
    rank_max: int | None
    rouge_l: dict[str, Any] | None  # {mean, std, per_seed}
    exact_match: dict[str, Any] | None


@dataclasses.dataclass
class Breakdown:
    set_name: str
    ranking_path: str
    coverage: dict[str, Any]
    buckets: list[Bucket]
    std: str

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set_name, "ranking": self.ranking_path, "coverage": self.coverage, "std": self.std,
                "buckets": [dataclasses.asdict(b) for b in self.buckets]}


def breakdown(result, ranking: Ranking, *, num_buckets: int = 4, std: str = "sample") -> Breakdown:
    """Scores of ``result`` (a :class:`pocl.evaluation.runner.SetResult`) per difficulty bucket."""
    ids = [s.id for s in result.samples]
    coverage = check_coverage(ranking, ids, set_name=result.name)
    assignment = assign_buckets(ranking, ids, num_buckets)
    names = bucket_names(num_buckets)
    buckets = []
    for b in range(num_buckets):
        members = [s for s in result.samples if assignment.get(s.id) == b]
        if not members:
            buckets.append(Bucket(names[b], b, 0, None, None, None, None))
            continue
        ranks = [ranking.ranks[s.id] for s in members]
        scores = {}
        for metric in ("rouge_l", "exact_match"):
            per_seed = [sum(getattr(s, metric)[k] for s in members) / len(members) for k in range(len(result.seeds))]
            mean, sd = mean_std(per_seed, std=std)
            scores[metric] = {"mean": mean, "std": sd, "per_seed": per_seed}
        buckets.append(Bucket(names[b], b, len(members), min(ranks), max(ranks), scores["rouge_l"],
                              scores["exact_match"]))
    return Breakdown(result.name, ranking.path, coverage, buckets, std)
