"""Teacher signal files (pocl.training.teacher_signal_io / _export): a top-k teacher cache exported by
`pocl teacher-signal export` and imported with loss.teacher_signal_file trains the same student as the
cache (to float rounding: the file holds logprobs z - c instead of logits z, and the k + 1 bucket
divergence is shift-invariant only up to rounding), through the same measured-and-accepted path; bad
files are refused naming the file, the row and the field; vLLM prompt_logprobs rows round-trip."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pocl.config import LossConfig
from pocl.errors import ConfigError
from pocl.fingerprints import tokenizer_fingerprint
from pocl.pipeline import distill, prepare_run
from pocl.training.metrics import read_metrics
from pocl.training.stages import Stage
from pocl.training.teacher_signal_export import vllm_row, write_signal_file
from pocl.training.teacher_signal_io import META_KEY, SignalFile, preflight
from tests.conftest import tiny_config

TOPK = {"divergence": "fkl", "teacher_cache": "topk", "teacher_cache_topk": 8, "accept_approximation": "topk-cache"}


def _stages() -> list[Stage]:
    """Two stages at T = 1 and T = 2: the file must carry the tail at every temperature."""
    return [Stage("s1", epochs=1, temperature=1.0, alpha=0.7), Stage("s2", epochs=1, temperature=2.0, alpha=0.5)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pair, tiny_data):
    """A distillation on the top-k cache, and its cache exported with the CLI."""
    from pocl.cli import main

    root = tmp_path_factory.mktemp("signal")
    cfg = tiny_config(root / "cache", tiny_pair, tiny_data, loss=TOPK)
    result = distill(cfg, stages=_stages())
    out = root / "teacher.parquet"
    assert main(["teacher-signal", "export", "--cache", str(result.output_dir / "teacher_cache"),
                 "--out", str(out)]) == 0
    return SimpleNamespace(root=root, cfg=cfg, result=result, file=out, inputs=prepare_run(cfg))


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


# ------------------------------------------------------------------------------------------- the format
def test_export_writes_one_row_per_sample_with_the_metadata(exported):
    table = pq.read_table(exported.file)
    meta = json.loads(table.schema.metadata[META_KEY])
    inputs = exported.inputs
    assert table.column_names == ["sample_id", "token_ids", "logprobs", "tail_logprob", "tail_lse"]
    assert sorted(table.column("sample_id").to_pylist()) == sorted(inputs.train_data.ids + inputs.dev_data.ids)
    assert meta["k"] == 8 and meta["temperature"] == 1.0 and meta["tail_temperatures"] == [1.0, 2.0]
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(inputs.tokenizer)
    assert meta["teacher_fingerprint"] == inputs.fingerprints["teacher"]
    assert set(meta["data_fingerprint"]) == {"train", "dev"} and meta["pocl_version"]
    # logprobs at T = 1: with the tail, every position holds probability 1
    row = table.slice(0, 1).to_pylist()[0]
    lp, tail = np.array(row["logprobs"]), np.array(row["tail_logprob"])
    assert (lp <= 0).all() and np.allclose(np.exp(lp).sum(1) + np.exp(tail), 1, atol=1e-5)
    assert np.allclose(np.array(row["tail_lse"])[:, 0], tail)
    sample = inputs.train_data.by_id[row["sample_id"]] if row["sample_id"] in inputs.train_data.by_id \
        else inputs.dev_data.by_id[row["sample_id"]]
    assert len(lp) == sum(1 for x in sample.labels[1:] if x != -100)


def test_hidden_cache_is_not_exported(tmp_path, tiny_pair, tiny_data):
    from pocl.training.teacher_signal_export import export_cache

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"max_steps": 1})
    result = distill(cfg)
    with pytest.raises(ConfigError, match="hidden cache; export reads top-k caches only"):
        export_cache(result.output_dir / "teacher_cache", tmp_path / "x.parquet", tokenizer_fingerprint="x")


# ------------------------------------------------------------------------------------------- import
def test_imported_signal_trains_like_the_topk_cache(exported, caplog):
    """Same losses at every step and the same final weights, to rtol 1e-5 (not bit for bit: the file's
    logprobs are the cached logits shifted by their logsumexp, rounded to float32)."""
    cfg = exported.cfg.replace(loss={"teacher_signal_file": str(exported.file)},
                               train={"output_dir": str(exported.root / "file" / "run")})
    assert cfg.training_hash() == exported.cfg.training_hash()
    with caplog.at_level(logging.INFO, logger="pocl.teacher_signal"):
        result = distill(cfg, stages=_stages())
    tc = result.summary["teacher_cache"]
    assert tc["signal"] == "topk-file" and tc["exact"] is False and tc["train"]["dev"] == "file"
    cached = exported.result.summary["teacher_cache"]["error_vs_live"]
    assert [e["temperature"] for e in tc["error_vs_live"]] == [1.0, 2.0]
    for mine, theirs in zip(tc["error_vs_live"], cached):
        assert mine["tail_mass"] == pytest.approx(theirs["tail_mass"], rel=1e-5)
        assert mine["relative_error"] == pytest.approx(theirs["relative_error"], rel=1e-4, abs=1e-6)
    assert "teacher signal topk-file vs live" in caplog.text and "APPROXIMATION" in caplog.text
    a = [r for r in read_metrics(exported.result.output_dir / "metrics.jsonl") if r.get("split") == "train"]
    b = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if r.get("split") == "train"]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (y["loss"], y["kd"], y["ce"]) == pytest.approx((x["loss"], x["kd"], x["ce"]), rel=1e-5, abs=1e-7)
    wa, wb = _weights(exported.result.output_dir), _weights(result.output_dir)
    # Weights to 1e-5: a thousandth of one AdamW update at lr 1e-2. Adam divides by sqrt(v), so an element
    # whose gradient is near zero can move by ~1e-6 on float32 rounding alone (seen with 2 threads).
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_refused_approximation_names_the_file(exported):
    cfg = exported.cfg.replace(loss={"teacher_signal_file": str(exported.file), "accept_approximation": "none"},
                               train={"output_dir": str(exported.root / "refused" / "run")})
    with pytest.raises(ConfigError, match=r"loss\.teacher_signal_file: .*--accept-approximation topk-cache"):
        distill(cfg, stages=_stages())


def test_config_field_defaults_and_off():
    assert LossConfig().teacher_signal_file is None and LossConfig().teacher_signal_ignore_tokenizer is False
    with pytest.raises(ConfigError, match="teacher_signal_file"):
        LossConfig(teacher_signal_file="x.parquet", teacher_cache="off")


# ------------------------------------------------------------------------------------------- bad files
def _rewrite(exported, tmp_path, edit_rows=None, edit_meta=None, drop=()):
    table = pq.read_table(exported.file)
    meta = json.loads(table.schema.metadata[META_KEY])
    rows = table.to_pylist()
    if edit_rows:
        edit_rows(rows)
    if edit_meta:
        edit_meta(meta)
    schema = pa.schema([f for f in table.schema if f.name not in drop], metadata={META_KEY: json.dumps(meta)})
    out = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in drop} for r in rows],
                                        schema=schema), out)
    return out


def _preflight(exported, path, **loss):
    cfg = exported.cfg.replace(loss={"teacher_signal_file": str(path), **loss})
    return preflight(cfg, exported.inputs)


def _row_of(rows, sample_id):
    return next(r for r in rows if r["sample_id"] == sample_id)


def test_the_exported_file_passes_preflight_and_joins_the_fingerprints(exported):
    inputs = _preflight(exported, exported.file)
    assert inputs.fingerprints["teacher_signal"] == SignalFile(exported.file).fingerprint
    assert "teacher_signal" not in exported.inputs.fingerprints


def test_missing_training_sample(exported, tmp_path):
    gone = exported.inputs.train_data[5].id
    path = _rewrite(exported, tmp_path, lambda rows: rows.remove(_row_of(rows, gone)))
    with pytest.raises(ConfigError, match=rf"{path}.*sample_id='{gone}', field sample_id: the training sample"):
        _preflight(exported, path)


def test_position_count_of_another_tokenizer(exported, tmp_path):
    sid = exported.inputs.train_data[2].id

    def cut(rows):
        row = _row_of(rows, sid)
        for name in ("token_ids", "logprobs", "tail_logprob", "tail_lse"):
            row[name] = row[name][:-1]
    path = _rewrite(exported, tmp_path, cut)
    with pytest.raises(ConfigError, match=rf"{path}.*sample_id='{sid}', field token_ids: .* positions, but the "
                                          r"tokenized response has"):
        _preflight(exported, path)


def test_token_id_outside_the_vocabulary(exported, tmp_path):
    sid, vocab = exported.inputs.train_data[0].id, exported.inputs.vocab_size
    path = _rewrite(exported, tmp_path, lambda rows: _row_of(rows, sid)["token_ids"][1].__setitem__(0, vocab + 7))
    with pytest.raises(ConfigError, match=rf"sample_id='{sid}', field token_ids, response position 1: token id "
                                          rf"{vocab + 7} is outside the student vocabulary \[0, {vocab}\)"):
        _preflight(exported, path)


def test_positive_logprob(exported, tmp_path):
    sid = exported.inputs.train_data[1].id
    path = _rewrite(exported, tmp_path, lambda rows: _row_of(rows, sid)["logprobs"][0].__setitem__(2, 0.5))
    with pytest.raises(ConfigError, match=rf"{path}, row sample_id='{sid}', field logprobs, response position 0: "
                                          r"logprobs must be <= 0"):
        _preflight(exported, path)


def test_mass_above_one(exported, tmp_path):
    sid = exported.inputs.train_data[1].id
    path = _rewrite(exported, tmp_path, lambda rows: _row_of(rows, sid)["logprobs"].__setitem__(
        1, [math.log(0.3)] * 8), drop=("tail_logprob",))
    with pytest.raises(ConfigError, match=rf"sample_id='{sid}', field logprobs, response position 1: their "
                                          r"probabilities sum to 2\.4 > 1"):
        _preflight(exported, path)


def test_tokenizer_fingerprint_differs_unless_overridden(exported, tmp_path, caplog):
    path = _rewrite(exported, tmp_path, edit_meta=lambda m: m.update(tokenizer_fingerprint="0123456789abcdef"))
    with pytest.raises(ConfigError, match=rf"{path}, field tokenizer_fingerprint: the file's tokenizer fingerprint "
                                          r"0123456789abcdef differs from the student's .*--teacher-signal-ignore-"):
        _preflight(exported, path)
    with caplog.at_level(logging.WARNING, logger="pocl.teacher_signal"):
        _preflight(exported, path, teacher_signal_ignore_tokenizer=True)
    assert "used anyway" in caplog.text


# ------------------------------------------------------------------------------------------- vLLM
class _Logprob:  # what vLLM puts in prompt_logprobs dicts
    def __init__(self, logprob: float):
        self.logprob = logprob


@torch.no_grad()
def _vllm_style(teacher, sample, vocab_size: int, k: int) -> list:
    """vLLM's prompt_logprobs of ``sample``'s input_ids from ``teacher``: top k per position, plus the actual token."""
    lp = torch.log_softmax(teacher(input_ids=torch.tensor([sample.input_ids])).logits[0, :, :vocab_size].double(), -1)
    plp = [None]
    for i in range(1, len(sample.input_ids)):
        top = lp[i - 1].topk(k)
        entry = {int(t): _Logprob(float(v)) for v, t in zip(top.values, top.indices)}
        entry.setdefault(int(sample.input_ids[i]), _Logprob(float(lp[i - 1, sample.input_ids[i]])))
        plp.append(entry)
    return plp


def test_a_vllm_file_trains_at_t1(exported, tmp_path):
    """A file without tails (vLLM) trains a T = 1 run through the same measured and accepted path."""
    inputs, k = exported.inputs, 5
    teacher = inputs.teacher.eval()
    rows = [vllm_row(s.id, _vllm_style(teacher, s, inputs.vocab_size, k), s.labels, k=k)
            for data in (inputs.train_data, inputs.dev_data) for s in data]
    path = write_signal_file(rows, tmp_path / "vllm.parquet", metadata={
        "source": "vllm", "k": k, "tokenizer_fingerprint": tokenizer_fingerprint(inputs.tokenizer)})
    cfg = exported.cfg.replace(loss={"teacher_signal_file": str(path)},
                               train={"output_dir": str(tmp_path / "run"), "max_steps": 2})
    result = distill(cfg)
    tc = result.summary["teacher_cache"]
    assert tc["signal"] == "topk-file" and tc["train"]["k"] == k and tc["train"]["dev"] == "file"
    assert [e["temperature"] for e in tc["error_vs_live"]] == [1.0] and 0 < tc["error_vs_live"][0]["tail_mass"] < 1
    with pytest.raises(ConfigError, match=r"field tail_lse: the run's stages need the teacher's tail at T = 2"):
        distill(cfg.replace(train={"output_dir": str(tmp_path / "run2")}), stages=_stages())


@torch.no_grad()
def test_vllm_prompt_logprobs_round_trip(exported, tmp_path):
    """Rows made from vLLM-style prompt_logprobs (top 5 per position plus the actual token when it is not among
    them; the first entry None) hold the teacher's top-5 log-softmax at the response positions, and read back
    as the TopKTeacher of those logprobs with the tail 1 - their mass (T = 1 only)."""
    inputs, k = exported.inputs, 5
    teacher = inputs.teacher.eval()
    rows, want = [], {}
    for sample in inputs.train_data:
        rows.append(vllm_row(sample.id, _vllm_style(teacher, sample, inputs.vocab_size, k), sample.labels, k=k))
        ids = torch.tensor([sample.input_ids])
        lp = torch.log_softmax(teacher(input_ids=ids).logits[0, :, :inputs.vocab_size].double(), dim=-1)
        sel = [i - 1 for i in range(1, len(sample.labels)) if sample.labels[i] != -100]
        top = lp[sel].topk(k)
        idx, order = top.indices.sort(dim=-1)
        want[sample.id] = (idx, top.values.gather(-1, order))
    fp = tokenizer_fingerprint(inputs.tokenizer)
    path = write_signal_file(rows, tmp_path / "vllm.parquet", metadata={"source": "vllm", "k": k,
                                                                        "tokenizer_fingerprint": fp})
    signal = SignalFile(path)
    signal.check_tokenizer(fp, ignore=False)
    assert signal.check_data(inputs.train_data, vocab_size=inputs.vocab_size)
    signal.prepare([1.0])
    for sample in list(inputs.train_data)[:6]:
        table = signal.lookup([sample.id])
        idx, values = want[sample.id]
        assert torch.equal(table.token_ids, idx)
        torch.testing.assert_close(table.logits.double(), values, rtol=0, atol=1e-6)
        tail = torch.log1p(-values.exp().sum(-1))
        torch.testing.assert_close(table.tail_at(1.0).double(), tail, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"field tail_lse: the run's stages need the teacher's tail at T = 2"):
        signal.prepare([1.0, 2.0])
    with pytest.raises(ConfigError, match="prompt_logprobs has 2 entries"):
        vllm_row("x", [None, {}], [1, 2, 3], k=1)
