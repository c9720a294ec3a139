"""The teacher cache on the tiny models: rows equal a direct teacher forward (hidden states and top-k),
invalidation by kind / teacher / data / k / schedule / dtype, damaged shards rebuilt and never read, an
interrupted pass (exception and a real SIGKILL) resumes with only the missing shards, the default
(hidden) cache reproduces the live run at T = 1, 1.33, 1.67 and 2, the top-k approximation is measured
and refused unless accepted, no teacher forward after the cache pass except on on-policy steps, config
and resume rules, and two data-parallel processes sharing one cache."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pocl.config import DistillConfig, LossConfig
from pocl.data import collate
from pocl.errors import ConfigError
from pocl.models import decoder_of
from pocl.pipeline import kd_stages, prepare_run
from pocl.training import checkpoint as ckpt
from pocl.training import teacher_cache as tcache
from pocl.training.metrics import read_metrics
from pocl.training.stages import Stage
from pocl.training.trainer import DistillTrainer
from tests.conftest import make_llama, save_model, tiny_config
from tests.reliability.helpers import distill_argv, subprocess_env

#: The top-k approximation, accepted: tests of the cache mechanics on its three arrays.
CACHE = {"teacher_cache": "topk", "teacher_cache_topk": 8, "accept_approximation": "topk-cache"}
HIDDEN = {"teacher_cache": "hidden"}
#: The POCL stage temperatures (1 -> 2 over four stages).
POCL_TEMPERATURES = (1.0, 4 / 3, 5 / 3, 2.0)


def _trainer(cfg, stages=None, inputs=None, **kw):
    inputs = inputs or prepare_run(cfg)
    return DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                          train_data=inputs.train_data, dev_data=inputs.dev_data, stages=stages or kd_stages(cfg),
                          vocab_size=inputs.vocab_size, fused=inputs.fused, fingerprints=inputs.fingerprints, **kw)


def _prepared(cfg, stages=None, inputs=None):
    trainer = _trainer(cfg, stages, inputs)
    trainer.prepare_teacher_cache()
    return trainer


def _two_stages(temperature_2: float = 2.0) -> list[Stage]:
    return [Stage("s1", epochs=1, temperature=1.0, alpha=0.7), Stage("s2", epochs=1, temperature=temperature_2)]


def _count_teacher_forwards(trainer) -> list[int]:
    """A counter of the teacher body's forward calls (the fused path runs the decoder only)."""
    calls = [0]
    decoder_of(trainer.teacher).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _same_rows(a, b, *, exact: bool) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    if isinstance(a, dict):  # TeacherCache.rows of any kind
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], **tol)
        return
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logits, b.logits, **tol)
    torch.testing.assert_close(a.tail_lse, b.tail_lse, **tol)


# ------------------------------------------------------------------------------------------- contents
def test_rows_are_what_the_teacher_computes(tmp_path, tiny_pair, tiny_data, monkeypatch):
    """For any sample id (and any order of ids), the cache returns the top-k ids, logits and tail
    logsumexps of a direct forward pass of the teacher on that sample alone. The teacher runs in
    float64 so that a near-tie at the k-th logit cannot flip between batched and single passes."""
    monkeypatch.setattr(tcache, "SHARD_SAMPLES", 16)  # 3 shards
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss=CACHE)
    inputs = prepare_run(cfg)
    inputs.teacher.double()
    trainer = _prepared(cfg, _two_stages(), inputs)
    cache, k = trainer.train_signal.cache, 8
    assert trainer.summary_extra["teacher_cache"]["train"]["shards"] == 3
    assert cache.temperatures == (1.0, 2.0)
    ids = inputs.train_data.ids
    random.Random(0).shuffle(ids)
    for sample_id in ids:
        sample = inputs.train_data.by_id[sample_id]
        input_ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            logits = inputs.teacher(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0]
        labels = torch.tensor(sample.labels)
        z = logits[:-1][labels[1:] != -100][:, :inputs.vocab_size]  # positions that predict a response token
        got = cache.lookup([sample_id])
        top = torch.sort(torch.topk(z, k, dim=-1).indices, dim=-1).values
        assert torch.equal(got.token_ids, top), sample_id
        torch.testing.assert_close(got.logits.double(), z.gather(-1, top), rtol=1e-6, atol=1e-6)
        rest = z.scatter(-1, top, float("-inf"))
        for column, t in enumerate((1.0, 2.0)):
            torch.testing.assert_close(got.tail_lse[:, column].double(), torch.logsumexp(rest / t, -1),
                                       rtol=1e-6, atol=1e-6)
    # several samples at once: their rows in the order asked, as select_response_tokens lays out a batch
    batch = cache.lookup(ids[:5])
    singles = [cache.lookup([i]) for i in ids[:5]]
    assert torch.equal(batch.token_ids, torch.cat([s.token_ids for s in singles]))
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup(["no-such-sample"])


def test_hidden_rows_are_the_teachers_final_hidden_states(tmp_path, tiny_pair, tiny_data, monkeypatch):
    """The default cache holds, per sample id, the final (normed) hidden states of the teacher at the
    positions that predict a response token, as a forward pass of that sample alone gives them."""
    monkeypatch.setattr(tcache, "SHARD_SAMPLES", 16)
    inputs = prepare_run(tiny_config(tmp_path, tiny_pair, tiny_data))
    trainer = _prepared(tiny_config(tmp_path, tiny_pair, tiny_data), _two_stages(), inputs)
    assert trainer.train_signal.name == "hidden-cache" and trainer.train_signal.exact
    cache = trainer.train_signal.cache
    assert (cache.kind, cache.stamp["dtype"], "temperatures" in cache.stamp) == ("hidden", "float32", False)
    for sample_id in inputs.train_data.ids[:12]:
        sample = inputs.train_data.by_id[sample_id]
        input_ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            out = inputs.teacher(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 output_hidden_states=True)
        labels = torch.tensor(sample.labels)
        want = out.hidden_states[-1][0][:-1][labels[1:] != -100]
        got = cache.rows([sample_id])["hidden"]
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # through the head they are the teacher's own logits at those positions
        head = trainer.teacher_head
        torch.testing.assert_close(head.logits(got), out.logits[0][:-1][labels[1:] != -100], rtol=1e-4, atol=1e-5)
    assert trainer.summary_extra["teacher_cache"]["train"]["bytes_per_token"] == 4 * 32  # float32 x H


def test_stamp_changes_rebuild_the_cache_and_say_why(tmp_path, tiny_pair, tiny_data, suite_tokenizer, caplog):
    where = {"teacher_cache_dir": str(tmp_path / "cache")}

    def train_info(run, stages=None, **sections):
        sections["loss"] = {**CACHE, **where, **sections.get("loss", {})}
        cfg = tiny_config(tmp_path / run, tiny_pair, tiny_data, **sections)
        return _prepared(cfg, stages).summary_extra["teacher_cache"]["train"]

    first = train_info("a")
    assert (first["action"], first["computed"]) == ("built", first["shards"])
    again = train_info("b")  # another output folder, the same cache folder and stamp
    assert (again["action"], again["computed"], again["reused"]) == ("reused", 0, again["shards"])

    other_teacher = save_model(make_llama(suite_tokenizer, hidden=32, layers=2, seed=9), suite_tokenizer,
                               tmp_path / "other-teacher")
    changes = [  # each compared with the step before
        ("kind", dict(loss=HIDDEN), "kind 'topk' -> 'hidden'"),
        ("back", dict(loss={}), "kind 'hidden' -> 'topk'"),
        ("k", dict(loss={"teacher_cache_topk": 4}), "k 8 -> 4"),
        ("dtype", dict(loss={"teacher_cache_topk": 4, "teacher_cache_dtype": "float16"}),
         "stored dtype 'float32' -> 'float16'"),
        ("schedule", dict(loss={"teacher_cache_topk": 4, "teacher_cache_dtype": "float16"}, stages=_two_stages()),
         "temperatures [1.0] -> [1.0, 2.0]"),
        ("data", dict(loss={"teacher_cache_topk": 4, "teacher_cache_dtype": "float16"}, stages=_two_stages(),
                      data={"max_train_samples": 40}), "data (fingerprint)"),
        ("teacher", dict(loss={"teacher_cache_topk": 4, "teacher_cache_dtype": "float16"}, stages=_two_stages(),
                         data={"max_train_samples": 40}, model={"teacher": str(other_teacher)}),
         "teacher (fingerprint)"),
    ]
    for name, change, reason in changes:
        caplog.clear()
        stages = change.pop("stages", None)
        with caplog.at_level("INFO", logger="pocl.teacher_cache"):
            info = train_info(name, stages, **change)
        assert info["action"] == "rebuilt" and info["computed"] == info["shards"], name
        assert reason in info["reason"], (name, info["reason"])
        if name not in ("kind", "back"):  # a change of kind also adds or drops k and the temperatures
            assert info["reason"].count("->") == 1, (name, info["reason"])
        assert f"built for another {reason}" in caplog.text, name
    assert info["tokens"] < first["tokens"]  # 40 samples now


# ------------------------------------------------------------------------------------------- damage
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_shard_is_rebuilt_and_never_read(tmp_path, tiny_pair, tiny_data, monkeypatch, damage):
    monkeypatch.setattr(tcache, "SHARD_SAMPLES", 16)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)  # the default: a hidden cache
    inputs = prepare_run(cfg)
    trainer = _prepared(cfg, inputs=inputs)
    ids = inputs.train_data.ids
    reference = {i: trainer.train_signal.cache.rows([i]) for i in ids}
    shard = tmp_path / "run" / "teacher_cache" / "train" / "shard-00001"
    target = shard / "hidden.npy"
    original = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(original[:-9])
    else:  # one byte of the array data changed, same size: only the checksum can tell
        blob = bytearray(original)
        blob[len(blob) - 5] ^= 0x01
        target.write_bytes(bytes(blob))

    again = _prepared(cfg, inputs=inputs)
    info = again.summary_extra["teacher_cache"]["train"]
    assert (info["action"], info["computed"], info["reused"]) == ("repaired", 1, 2)
    assert "shard-00001" in info["reason"] and target.name in info["reason"]
    assert target.read_bytes() == original  # rebuilt: the same values as before the damage
    for i in ids:
        _same_rows(again.train_signal.cache.rows([i]), reference[i], exact=True)


# ------------------------------------------------------------------------------------------- interruption
class Interrupted(Exception):
    """Stands for Ctrl-C in the middle of the cache pass."""


def test_interrupted_pass_computes_only_the_missing_shards(tmp_path, tiny_pair, tiny_data, monkeypatch):
    monkeypatch.setattr(tcache, "SHARD_SAMPLES", 8)  # 6 shards of 8 samples = 2 teacher batches of 4 each
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss=CACHE)
    inputs = prepare_run(cfg)
    reference = _prepared(tiny_config(tmp_path / "ref", tiny_pair, tiny_data, loss=CACHE), inputs=inputs)

    first = _trainer(cfg, inputs=inputs)
    real, calls = first.live_teacher.topk_rows, [0]

    def dies_in_shard_four(batch, **kw):
        calls[0] += 1
        if calls[0] == 7:  # the first batch of shard 4: shards 1-3 are on disk
            raise Interrupted
        return real(batch, **kw)

    first.live_teacher.topk_rows = dies_in_shard_four
    with pytest.raises(Interrupted):
        first.prepare_teacher_cache()
    root = tmp_path / "run" / "teacher_cache" / "train"
    assert sorted(p.name for p in root.iterdir()) == ["shard-00000", "shard-00001", "shard-00002"]

    second = _trainer(cfg, inputs=inputs)
    real2, calls2 = second.live_teacher.topk_rows, [0]
    second.live_teacher.topk_rows = lambda batch, **kw: (calls2.__setitem__(0, calls2[0] + 1), real2(batch, **kw))[1]
    second.prepare_teacher_cache()
    info = second.summary_extra["teacher_cache"]["train"]
    assert (info["action"], info["computed"], info["reused"]) == ("resumed", 3, 3)
    assert calls2[0] == 3 * 2 + 4  # three train shards of two batches, then the dev cache's 16 samples
    for i in inputs.train_data.ids:
        _same_rows(second.train_signal.cache.lookup([i]), reference.train_signal.cache.lookup([i]), exact=True)


KILLER = """
import os, signal, sys
import numpy as np
import pocl.training.teacher_cache as tc

tc.SHARD_SAMPLES = 8
written = []
real_write = tc.artifacts.atomic_folder_write

def dies_writing_the_fourth_shard(target, write, **kw):
    written.append(target.name)
    if len(written) < 4:
        return real_write(target, write, **kw)

    def partial(tmp):  # one file of the shard is in its temporary folder when the process dies
        np.save(tmp / "hidden.npy", np.zeros((3, 8), np.float32))
        os.kill(os.getpid(), signal.SIGKILL)

    return real_write(target, partial, **kw)

tc.artifacts.atomic_folder_write = dies_writing_the_fourth_shard
from pocl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_in_the_cache_pass_resumes_with_the_missing_shards(tmp_path, tiny_pair, tiny_data, monkeypatch):
    out = tmp_path / "run"
    argv = distill_argv(tiny_pair, tiny_data, out)  # the default: a hidden cache
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == -9, proc.stderr[-3000:]
    root = out / "teacher_cache" / "train"
    names = sorted(p.name for p in root.iterdir())  # what the killed pass left
    assert names[1:] == ["shard-00000", "shard-00001", "shard-00002"] and not (root / ckpt.MANIFEST).exists()
    assert names[0].startswith(".tmp-shard-00003-") and (root / names[0] / "hidden.npy").is_file()

    monkeypatch.setattr(tcache, "SHARD_SAMPLES", 8)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)
    resumed = _prepared(cfg)
    info = resumed.summary_extra["teacher_cache"]["train"]
    assert (info["action"], info["computed"], info["reused"]) == ("resumed", 3, 3)
    assert sorted(p.name for p in root.iterdir()) == [ckpt.MANIFEST] + [f"shard-0000{j}" for j in range(6)]
    ckpt.verify_folder(root)  # every shard file is listed with its checksum
    reference = _prepared(tiny_config(tmp_path / "ref", tiny_pair, tiny_data))
    for i in resumed.train_data.ids:  # (three shards were computed in another process: float noise)
        _same_rows(resumed.train_signal.cache.rows([i]), reference.train_signal.cache.rows([i]), exact=False)


# ------------------------------------------------------------------------------------------- training
def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _logged(run_dir, split="train", key="loss"):
    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


def _pocl_stages() -> list[Stage]:
    """Four stages at the POCL temperatures with alpha rising 0.7 -> 1 (the last stage pure KD)."""
    return [Stage(f"s{i + 1}", epochs=1, temperature=t, alpha=a)
            for i, (t, a) in enumerate(zip(POCL_TEMPERATURES, (0.7, 0.8, 0.9, 1.0)))]


@pytest.mark.parametrize("divergence", ["jsd", "srkl"])
def test_default_cache_reproduces_the_live_run_at_every_pocl_temperature(tmp_path, tiny_pair, tiny_data,
                                                                          divergence):
    """The default teacher signal (the hidden cache) gives the same per-stage losses (train and dev, the
    divergence, the CE and the total, at T = 1, 1.33, 1.67, 2) and the same final weights as the live
    teacher, with no teacher forward pass after the cache pass.

    With one sample per micro-batch the cache pass runs the teacher on exactly the tensors the live run
    does, so the training run is reproduced bit for bit (a padded batch reorders float sums, and 20 Adam
    steps amplify that: the padded case is checked per step, loss and gradients, in the next test). The
    dev set is evaluated in padded batches of 16 but cached one by one: float32 reordering there."""
    sections = dict(loss={"divergence": divergence}, train={"micro_batch_size": 1})
    live_cfg = tiny_config(tmp_path / "live", tiny_pair, tiny_data, **sections)
    live = _trainer(live_cfg.replace(loss={"teacher_cache": "off"}), _pocl_stages()).train()
    assert "teacher_cache" not in live.summary
    cfg = tiny_config(tmp_path / "hidden", tiny_pair, tiny_data, **sections)
    assert cfg.loss.teacher_cache == "hidden"  # the default
    trainer = _trainer(cfg, _pocl_stages())
    calls, after_cache = _count_teacher_forwards(trainer), []
    real = trainer.prepare_teacher_cache
    trainer.prepare_teacher_cache = lambda: (real(), after_cache.append(calls[0]))
    cached = trainer.train()
    assert after_cache[0] == 48 + 16  # the cache pass: every training and dev sample once
    assert calls[0] == after_cache[0]  # training steps and dev evaluations read the cache
    info = cached.summary["teacher_cache"]
    assert (info["signal"], info["exact"], info["train"]["action"]) == ("hidden-cache", True, "built")

    for key in ("loss", "kd", "ce"):
        assert _logged(cached.output_dir, "train", key) == _logged(live.output_dir, "train", key), key
    for key in ("dev_loss", "dev_kd", "dev_ce"):
        assert _logged(cached.output_dir, "dev", key) == pytest.approx(_logged(live.output_dir, "dev", key),
                                                                       rel=1e-5, abs=1e-7), key
    stages = cached.summary["stages"]
    assert [s["temperature"] for s in stages] == pytest.approx(list(POCL_TEMPERATURES))
    assert [s["temperature"] for s in stages] == [s["temperature"] for s in live.summary["stages"]]
    a, b = _weights(live.final_dir), _weights(cached.final_dir)
    for name in a:
        assert torch.equal(b[name], a[name]), name


@pytest.mark.parametrize("temperature", POCL_TEMPERATURES)
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
def test_cached_loss_and_gradients_equal_the_live_ones(tmp_path_factory, tiny_pair, tiny_data, divergence,
                                                       temperature):
    """One micro-batch: the loss and every student gradient from the hidden cache equal those from the
    live teacher (float32 reordering only), at each POCL temperature, for every divergence."""
    tmp_path = tmp_path_factory.mktemp("grad")
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"divergence": divergence})
    stages = [Stage("s", epochs=1, temperature=temperature, alpha=0.8)]
    trainer = _prepared(cfg, stages)
    batch = trainer._to_device(collate([trainer.train_data[i] for i in range(5, 13)], trainer.tokenizer.pad_token_id))
    results = []
    for signal in (trainer.live_teacher, trainer.train_signal):
        trainer.student.zero_grad(set_to_none=True)
        out = trainer._micro_loss(batch, stages[0], normalizer=100.0, signal=signal)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in trainer.student.named_parameters()}))
    (live, live_grads), (cached, cached_grads) = results
    assert trainer.train_signal.name == "hidden-cache"
    # float32 values reordered by other padding in the cache pass: relative 1e-5 on sums of ~100 tokens
    torch.testing.assert_close(cached.loss, live.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached.divergence_sum, live.divergence_sum, rtol=1e-5, atol=1e-7)
    assert float(live.divergence_sum) > 0
    for name, g in live_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(cached_grads[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_topk_cache_is_measured_and_refused_unless_accepted(tmp_path, tiny_pair, tiny_data, caplog):
    """The top-k cache is an approximation: before training its divergence is compared with the live
    teacher's at every stage temperature; a run whose error exceeds the threshold stops with an error
    that names the way out; accepted by name, it runs and records the measured error; k >= V is exact."""
    loss = {"divergence": "jsd", "teacher_cache": "topk", "teacher_cache_topk": 4}
    refused = _trainer(tiny_config(tmp_path / "refused", tiny_pair, tiny_data, loss=loss), _pocl_stages())
    with pytest.raises(ConfigError) as err:
        refused.train()
    message = str(err.value)
    assert "--accept-approximation topk-cache" in message and "loss.teacher_cache_max_error" in message
    for t in ("T = 1:", "T = 1.33333:", "T = 2:"):
        assert t in message, message
    assert not (tmp_path / "refused" / "run" / "final").exists()

    with caplog.at_level("INFO", logger="pocl.teacher_signal"):
        accepted = _trainer(tiny_config(tmp_path / "accepted", tiny_pair, tiny_data,
                                        loss=dict(loss, accept_approximation="topk-cache")), _pocl_stages()).train()
    errors = accepted.summary["teacher_cache"]["error_vs_live"]
    assert [e["temperature"] for e in errors] == pytest.approx(list(POCL_TEMPERATURES))
    # a lower bound, whose gap grows with T, as the teacher's mass outside its top 4 does
    assert all(e["relative_error"] < 0 for e in errors)
    assert [e["tail_mass"] for e in errors] == sorted(e["tail_mass"] for e in errors)
    assert abs(errors[-1]["relative_error"]) > abs(errors[0]["relative_error"])
    assert "APPROXIMATION" in caplog.text and "T = 2" in caplog.text
    assert accepted.summary["teacher_cache"]["signal"] == "topk-cache"

    # the reported tail mass is the teacher's probability outside its top 4, from its full logits
    trainer = _trainer(tiny_config(tmp_path / "mass", tiny_pair, tiny_data, loss=dict(loss, accept_approximation="topk-cache")),
                       _pocl_stages())
    samples = [trainer.train_data[i] for i in range(16)]
    logits = []
    for i in range(0, 16, 4):
        batch = trainer._to_device(collate(samples[i:i + 4], trainer.tokenizer.pad_token_id))
        side = trainer.live_teacher.side(batch)
        logits.append(trainer.teacher_head.logits(side.hidden))
    z = torch.cat(logits)
    for e in errors:
        p = torch.softmax(z / e["temperature"], dim=-1)
        want = 1 - p.topk(4, dim=-1).values.sum(-1).mean()
        assert e["tail_mass"] == pytest.approx(float(want), rel=1e-4), e

    # k >= V keeps every token: no error, no refusal
    exact = _trainer(tiny_config(tmp_path / "all", tiny_pair, tiny_data, loss=dict(loss, teacher_cache_topk=100000)),
                     _pocl_stages())
    exact.prepare_teacher_cache()
    assert all(abs(e["relative_error"]) < 1e-5 for e in exact.summary_extra["teacher_cache"]["error_vs_live"])


def test_half_precision_hidden_cache_is_measured_and_close(tmp_path, tiny_pair, tiny_data):
    """float16 hidden states halve the disk; the error is measured (not assumed) and stays far below the
    threshold."""
    trainer = _prepared(tiny_config(tmp_path, tiny_pair, tiny_data,
                                    loss={"divergence": "srkl", "teacher_cache_dtype": "float16"}), _pocl_stages())
    info = trainer.summary_extra["teacher_cache"]
    assert (info["signal"], info["exact"]) == ("hidden-cache", False)
    assert info["train"]["bytes_per_token"] == 2 * 32
    errors = info["error_vs_live"]
    assert len(errors) == 4 and all(0 < abs(e["relative_error"]) < 1e-2 for e in errors), errors


def test_on_policy_steps_use_the_live_teacher(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"epochs": 2},
                      loss=dict(CACHE, on_policy_fraction=0.5, on_policy_max_new_tokens=4))
    trainer = _trainer(cfg)
    calls, after_cache = _count_teacher_forwards(trainer), []
    real = trainer.prepare_teacher_cache
    trainer.prepare_teacher_cache = lambda: (real(), after_cache.append(calls[0]))
    result = trainer.train()
    on_policy = result.summary["on_policy_steps"]
    assert 0 < on_policy < result.summary["global_steps"]
    assert calls[0] - after_cache[0] == on_policy * 2  # two micro-batches of 4 student samples per step


def test_no_cache_without_teacher_forced_kd_steps(tmp_path, tiny_pair, tiny_data):
    for name, sections in (("sft", {"loss": dict(CACHE, method="sft")}),
                           ("alpha0", {"loss": dict(CACHE, alpha=0.0)}),
                           ("all-on-policy", {"loss": dict(CACHE, on_policy_fraction=1.0)}),
                           ("off", {"loss": {"teacher_cache": "off"}})):
        trainer = _prepared(tiny_config(tmp_path / name, tiny_pair, tiny_data, **sections))
        assert trainer.train_signal is trainer.live_teacher and "teacher_cache" not in trainer.summary_extra, name
        assert not (tmp_path / name / "run" / "teacher_cache").exists(), name


# ------------------------------------------------------------------------------------------- config
def test_config_fields_are_validated():
    with pytest.raises(ConfigError, match=r"loss\.teacher_cache_topk: must be >= 1"):
        LossConfig(teacher_cache_topk=0)
    with pytest.raises(ConfigError, match=r"loss\.teacher_cache_dtype: must be one of float32, float16, bfloat16"):
        LossConfig(teacher_cache_dtype="int8")
    with pytest.raises(ConfigError, match=r"loss\.teacher_cache: must be one of off, hidden, topk"):
        DistillConfig.from_dict({"loss": {"teacher_cache": "yes"}})
    with pytest.raises(ConfigError, match=r"'on' was the top-k cache, an approximation"):
        DistillConfig.from_dict({"loss": {"teacher_cache": "on"}})
    with pytest.raises(ConfigError, match=r"loss\.accept_approximation: must be one of none, topk-cache"):
        LossConfig(accept_approximation="topk")
    assert LossConfig().teacher_cache == "hidden" and LossConfig().teacher_cache_dtype == "float32"


def test_resume_rules_of_the_cache_settings():
    """The cache folder never matters to a resume; k and dtype matter only while the cache is on;
    turning the cache on or off changes the objective."""
    def differences(saved_cfg, new_cfg):
        saved = {"config": saved_cfg.to_dict(), "config_hash": saved_cfg.training_hash(), "fingerprints": {},
                 "num_processes": 1}
        return ckpt.resume_differences(saved, config=new_cfg, fingerprints={}, num_processes=1)

    on = DistillConfig().replace(loss=dict(CACHE))
    off = on.replace(loss={"teacher_cache": "off"})
    assert differences(on, on.replace(loss={"accept_approximation": "none", "teacher_cache_max_error": 0.5})) == []
    assert differences(on, on.replace(loss={"teacher_cache_dir": "/elsewhere"})) == []
    assert differences(on, on.replace(loss={"teacher_cache_topk": 16})) == ["loss.teacher_cache_topk: 8 -> 16"]
    assert differences(on, on.replace(loss={"teacher_cache_dtype": "bfloat16"})) == [
        "loss.teacher_cache_dtype: 'float32' -> 'bfloat16'"]
    assert differences(off, off.replace(loss={"teacher_cache_topk": 16, "teacher_cache_dtype": "float16"})) == []
    hidden = on.replace(loss={"teacher_cache": "hidden"})
    assert differences(hidden, hidden.replace(loss={"teacher_cache_topk": 16})) == []  # hidden does not read k
    assert differences(hidden, hidden.replace(loss={"teacher_cache_dtype": "float16"})) == [
        "loss.teacher_cache_dtype: 'float32' -> 'float16'"]
    assert differences(on, off) == ["loss.teacher_cache: 'topk' -> 'off'"]


# ------------------------------------------------------------------------------------------- processes
DRIVER = """
import sys
import pocl.training.teacher_cache as tc
tc.SHARD_SAMPLES = 8
from pocl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_share_one_cache(tmp_path, tiny_pair, tiny_data):
    """Two gloo processes: the shards are computed in rounds (rank r takes shard round + r), the main
    process alone writes them, both train on the same cache; the result equals one process's."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER), encoding="utf-8")
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        argv = distill_argv(tiny_pair, tiny_data, out, "--micro-batch-size", "2")  # the default hidden cache
        launcher = [sys.executable, str(driver)] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
        argv += ["--num-processes", str(processes)]
        proc = subprocess.run([*launcher, *argv], capture_output=True, text=True, timeout=600, env=subprocess_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[processes] = out
    one, two = (json.loads((runs[p] / "summary.json").read_text()) for p in (1, 2))
    assert two["num_processes"] == 2
    assert two["teacher_cache"]["train"]["computed"] == 6 and two["teacher_cache"]["dev"]["computed"] == 2
    for split in ("train", "dev"):
        a, b = (runs[p] / "teacher_cache" / split for p in (1, 2))
        names = sorted(p.name for p in b.iterdir())
        assert names == sorted(p.name for p in a.iterdir()) and not any(n.startswith(".") for n in names)
        ckpt.verify_folder(b)
        for shard in (n for n in names if n.startswith("shard-")):
            assert (a / shard / "samples.json").read_text() == (b / shard / "samples.json").read_text()
            torch.testing.assert_close(torch.from_numpy(np.load(a / shard / "hidden.npy")),
                                       torch.from_numpy(np.load(b / shard / "hidden.npy")), rtol=1e-5, atol=1e-6)
    assert _logged(runs[2]) == pytest.approx(_logged(runs[1]), rel=1e-4, abs=1e-6)
