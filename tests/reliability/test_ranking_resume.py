"""An interrupted ranking pass resumes where it stopped: finished batches are kept in
``ranking.partial.jsonl`` (stamped, checksummed per line) and only the others are measured."""

from __future__ import annotations

import json
import threading

import pytest

import pocl.curriculum.difficulty as difficulty
import pocl.curriculum.measurement as measurement
import pocl.curriculum.ranking_journal as journal_mod
import pocl.curriculum.ranking_stamps as stamps_mod
import pocl.fingerprints as fingerprints
from pocl.config import CurriculumConfig
from pocl.curriculum import load_or_compute_ranking, read_ranking
from pocl.curriculum.ranking import partial_path
from pocl.data import Record, generate_suite
from tests.conftest import make_llama

SETTINGS = {"template": "alpaca", "use_prompt_field": None, "max_length": 40, "max_prompt_length": 24,
            "truncation_side": "left"}
N, BATCH = 20, 4  # 5 loss batches and 5 generation batches
REAL_HIDDEN, REAL_GENERATE = measurement.hidden_states, measurement.generate


@pytest.fixture(scope="module")
def student(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=16, layers=1, seed=2)


@pytest.fixture(scope="module")
def records():
    rows = generate_suite(n_train=N, n_dev=0, n_test=0, seed=4)["train"]
    return [Record(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"]) for r in rows]


def rank(path, records, tokenizer, model, *, fingerprint="student-a", **cur):
    curriculum = CurriculumConfig(**{"rank_max_new_tokens": 4, "rank_batch_size": BATCH, **cur})
    return load_or_compute_ranking(path, records=records, tokenizer=tokenizer, model=model,
                                   model_fingerprint=fingerprint, curriculum=curriculum, data_settings=SETTINGS,
                                   seed=0, progress=False)


class Interrupted(Exception):
    """Stands for the process dying in the middle of the pass."""


class Spy:
    """Counts measured batches: one ``hidden_states`` call per loss batch (the tiny student has a fused
    head), one ``generate`` call per generation batch; ``fail_after`` generation batches raise."""

    def __init__(self, monkeypatch, fail_after: int | None = None, exc: type[BaseException] = Interrupted):
        self.loss = self.generate = 0
        real_hidden, real_generate = REAL_HIDDEN, REAL_GENERATE

        def hidden(*a, **k):
            self.loss += 1
            return real_hidden(*a, **k)

        def generate(*a, **k):
            if fail_after is not None and self.generate >= fail_after:
                raise exc("simulated interruption")
            self.generate += 1
            return real_generate(*a, **k)

        monkeypatch.setattr(measurement, "hidden_states", hidden)
        monkeypatch.setattr(measurement, "generate", generate)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, records, suite_tokenizer, student):
    path = tmp_path_factory.mktemp("whole") / "ranking.jsonl"
    ranking, info = rank(path, records, suite_tokenizer, student)
    assert info["batches"] == {"loss": {"measured": 5, "reused": 0}, "rouge_l": {"measured": 5, "reused": 0}}
    assert not partial_path(path).exists()  # deleted once the ranking is written
    return path, ranking


def _entries(path):
    lines = partial_path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def test_an_interrupted_pass_measures_only_the_missing_batches(tmp_path, records, suite_tokenizer, student,
                                                               uninterrupted, monkeypatch):
    path = tmp_path / "ranking.jsonl"
    Spy(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        rank(path, records, suite_tokenizer, student)
    assert not path.exists()
    header, entries = _entries(path)
    assert header["format"] == "pocl-ranking-partial" and len(header["signals_hash"]) == 16
    assert sorted((e["signal"], e["batch"]) for e in entries) == \
        [("loss", b) for b in range(5)] + [("rouge_l", 0), ("rouge_l", 1)]

    spy = Spy(monkeypatch)
    ranking, info = rank(path, records, suite_tokenizer, student)
    assert (spy.loss, spy.generate) == (0, 3)  # only the 3 generation batches that were missing
    assert info["batches"] == {"loss": {"measured": 0, "reused": 5}, "rouge_l": {"measured": 3, "reused": 2}}
    assert "resumed an interrupted measurement (5 of 5 loss batches and 2 of 5 generation batches" in info["reason"]
    assert ranking == uninterrupted[1]
    assert path.read_bytes() == uninterrupted[0].read_bytes()
    assert not partial_path(path).exists()
    assert {"loss_seconds", "generate_seconds"} <= set(read_ranking(path)[1]["timings"])


def test_a_line_cut_by_a_crash_costs_only_its_batch(tmp_path, records, suite_tokenizer, student, uninterrupted,
                                                    monkeypatch):
    path = tmp_path / "ranking.jsonl"
    Spy(monkeypatch, fail_after=3)
    with pytest.raises(Interrupted):
        rank(path, records, suite_tokenizer, student)
    part = partial_path(path)
    blob = part.read_bytes()
    part.write_bytes(blob[:-25])  # the last batch line (generation batch 2) loses its end, like a kill mid-write
    lines = part.read_bytes().split(b"\n")
    edited = json.loads(lines[2])
    edited["loss"][0] += 1.0  # and one loss batch was changed after the fact: its checksum no longer matches
    lines[2] = json.dumps(edited).encode()
    part.write_bytes(b"\n".join(lines))
    spy = Spy(monkeypatch)
    ranking, info = rank(path, records, suite_tokenizer, student)
    assert (spy.loss, spy.generate) == (1, 3)  # the damaged loss batch and the 3 missing generation batches
    assert info["batches"]["loss"] == {"measured": 1, "reused": 4}
    assert info["batches"]["rouge_l"] == {"measured": 3, "reused": 2}
    assert ranking == uninterrupted[1]


def test_a_partial_file_of_another_measurement_is_not_used(tmp_path, records, suite_tokenizer, student, uninterrupted,
                                                          monkeypatch, caplog):
    path = tmp_path / "ranking.jsonl"
    Spy(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        rank(path, records, suite_tokenizer, student, fingerprint="student-b")
    spy = Spy(monkeypatch)
    with caplog.at_level("WARNING", logger="pocl.curriculum"):
        ranking, info = rank(path, records, suite_tokenizer, student)
    assert "was made for other inputs" in caplog.text and "starting over" in caplog.text
    assert (spy.loss, spy.generate) == (5, 5)
    assert info["batches"]["rouge_l"] == {"measured": 5, "reused": 0}
    assert ranking == uninterrupted[1]


def test_a_leftover_partial_file_is_removed_when_the_ranking_is_reused(tmp_path, records, suite_tokenizer, student,
                                                                       uninterrupted, monkeypatch):
    """Killed after writing the ranking and before deleting the partial file: the ranking is reused."""
    path = tmp_path / "ranking.jsonl"
    Spy(monkeypatch, fail_after=1)
    with pytest.raises(Interrupted):
        rank(path, records, suite_tokenizer, student)
    leftover = partial_path(path).read_bytes()
    Spy(monkeypatch)
    rank(path, records, suite_tokenizer, student)
    partial_path(path).write_bytes(leftover)
    spy = Spy(monkeypatch)
    _, info = rank(path, records, suite_tokenizer, student)
    assert info["action"] == "reused" and (spy.loss, spy.generate) == (0, 0)
    assert not partial_path(path).exists()


def test_pocl_rank_reports_the_resumed_batches(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    from tests.reliability.helpers import run_cli

    out = tmp_path / "run"
    argv = ["rank", "--student", str(tiny_pair[1]), "--train-file", str(tiny_data[0]), "--max-length", "48",
            "--max-prompt-length", "32", "--rank-max-new-tokens", "4", "--rank-batch-size", "8", "--output-dir",
            str(out), "--no-progress"]
    Spy(monkeypatch, fail_after=4, exc=KeyboardInterrupt)
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and "pocl: interrupted" in err  # Ctrl-C during the ranking pass
    assert partial_path(out / "ranking.jsonl").exists() and not (out / "ranking.jsonl").exists()
    Spy(monkeypatch)
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    assert "loss batches: 0 measured now, 6 reused from an interrupted run" in stdout
    assert "generation batches: 2 measured now, 4 reused from an interrupted run" in stdout


# ----------------------------------------------------------------------------------- several processes
class _Board:
    def __init__(self, world):
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world


class _FakeDist:
    """Two 'processes' as threads: barrier and gather as accelerate's, rank 0 is the main process."""

    def __init__(self, board, rank, world):
        self.board, self.rank, self.world = board, rank, world
        self.is_main = rank == 0
        self.state = object()

    def barrier(self):
        self.board.barrier.wait()

    def gather(self, items):
        self.board.slots[self.rank] = items
        self.board.barrier.wait()
        out = list(self.board.slots)
        self.board.barrier.wait()
        return out


def _fake_generate(model, tokenizer, prompts, decoding, *, batch_size, seed, progress=None, batch_plan=None):
    """Deterministic answers (the threads would otherwise share torch's global RNG)."""
    from pocl.generation import Generation

    out = [None] * len(prompts)
    for _, batch in batch_plan:
        for i in batch:
            out[i] = Generation([], f"{len(prompts[i])} {seed}", True)
    return out


def test_sharded_processes_resume_from_the_same_partial_file(tmp_path, records, suite_tokenizer, student,
                                                             monkeypatch):
    """A one-process pass is interrupted; two 'processes' resume it. Each round's batches are
    gathered, only the main process appends, and both end with every sample's values, equal to a
    one-process pass; the partial file is the one a single process would have written."""
    monkeypatch.setattr(measurement, "generate", _fake_generate)
    whole_path = tmp_path / "one" / "ranking.jsonl"
    whole, _ = rank(whole_path, records, suite_tokenizer, student)

    path = tmp_path / "two" / "ranking.jsonl"
    calls = {"n": 0}

    def failing(*a, **k):
        if calls["n"] >= 2:
            raise Interrupted
        calls["n"] += 1
        return _fake_generate(*a, **k)

    monkeypatch.setattr(measurement, "generate", failing)
    with pytest.raises(Interrupted):
        rank(path, records, suite_tokenizer, student)
    monkeypatch.setattr(measurement, "generate", _fake_generate)

    import copy

    board = _Board(2)
    appended_by = []
    real_append = journal_mod.PartialMeasurement._append

    def append(self, entry):
        appended_by.append((self.dist.rank, entry["signal"], entry["batch"]))
        real_append(self, entry)

    monkeypatch.setattr(journal_mod.PartialMeasurement, "_append", append)
    models = [student, copy.deepcopy(student)]
    results, errors = {}, []
    settings, template = stamps_mod.resolve_settings(SETTINGS, suite_tokenizer)
    curriculum = CurriculumConfig(rank_max_new_tokens=4, rank_batch_size=BATCH)
    hashes = fingerprints.sample_hashes(records, template)
    sig_hash = fingerprints.stamp_hash(stamps_mod.signals_inputs(
        records=records, tokenizer=suite_tokenizer, model_fingerprint="student-a", curriculum=curriculum,
        data_settings=settings, _hashes=hashes))

    def worker(rank):
        try:
            dist = _FakeDist(board, rank, 2)
            journal = journal_mod.PartialMeasurement(partial_path(path), sig_hash, dist)
            results[rank] = (difficulty.measure_difficulty(
                models[rank], suite_tokenizer, records, template=template, max_length=40, max_prompt_length=24,
                decoding=difficulty.ranking_decoding(curriculum), batch_size=BATCH, seed=0, progress=False,
                shard=(rank, 2), journal=journal), journal)
            journal.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            board.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    by_id = {r.id: r for r in whole}
    for rank_ in range(2):
        measured, journal = results[rank_]
        assert [(d.loss, d.rouge_l, d.generation) for d in measured] == \
            [(by_id[d.id].loss, by_id[d.id].rouge_l, by_id[d.id].generation) for d in measured]
        assert journal.reused == {"loss": 5, "rouge_l": 2} and journal.measured == {"loss": 0, "rouge_l": 3}
    assert {r for r, _, _ in appended_by} == {0} and sorted(b for _, _, b in appended_by) == [2, 3, 4]
    _, entries = _entries(path)
    assert sorted((e["signal"], e["batch"]) for e in entries) == \
        [("loss", b) for b in range(5)] + [("rouge_l", b) for b in range(5)]


def test_sigterm_during_the_ranking_pass_exits_130_and_keeps_the_finished_batches(tmp_path, tiny_pair, tiny_data,
                                                                                  capsys, monkeypatch):
    import os
    import signal

    from tests.reliability.helpers import run_cli

    out = tmp_path / "run"
    argv = ["rank", "--student", str(tiny_pair[1]), "--train-file", str(tiny_data[0]), "--max-length", "48",
            "--max-prompt-length", "32", "--rank-max-new-tokens", "4", "--rank-batch-size", "8", "--output-dir",
            str(out), "--no-progress"]
    calls = {"n": 0}

    def generate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a job scheduler would
        return REAL_GENERATE(*a, **k)

    monkeypatch.setattr(measurement, "generate", generate)
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and "pocl: interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back after the command
    header, entries = _entries(out / "ranking.jsonl")
    assert sorted({e["signal"] for e in entries}) == ["loss", "rouge_l"] and len(entries) >= 6 + 2
