"""evaluate_records: reproducible per seed, token limit, EOS, padding invariance, scoring and aggregation."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from pocl.data import Record, load_records
from pocl.errors import ConfigError, DataError
from pocl.evaluation import rouge_l
from pocl.evaluation.runner import average_over_sets, evaluate_records, generation_rows
from pocl.generation import DecodingConfig, Generation
from tests.conftest import make_llama


@pytest.fixture(scope="module")
def records(tiny_data):
    return load_records(tiny_data[2]).records


@pytest.fixture(scope="module")
def model(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=32, layers=2, seed=11)


def run(model, tok, records, **kw):
    kw.setdefault("decoding", DecodingConfig(max_new_tokens=6))
    kw.setdefault("max_prompt_length", 32)
    kw.setdefault("batch_size", 4)
    return evaluate_records(model, tok, records, **kw)


def test_reproducible_for_a_seed(model, suite_tokenizer, records):
    a = run(model, suite_tokenizer, records, seeds=[10, 20])
    b = run(model, suite_tokenizer, records, seeds=[10])
    assert [s.generations[0] for s in a.samples] == [s.generations[0] for s in b.samples]
    assert [s.generations[0] for s in a.samples] != [s.generations[1] for s in a.samples]
    assert a.seeds == [10, 20] and [p.seed for p in a.per_seed] == [10, 20] and a.n == len(records)


def test_token_limit(model, suite_tokenizer, records):
    res = run(model, suite_tokenizer, records, seeds=[1], decoding=DecodingConfig(max_new_tokens=3))
    assert all(s.generated_tokens[0] <= 3 for s in res.samples)
    assert all(s.generated_tokens[0] == 3 for s in res.samples if not s.stopped_at_eos[0])


def test_stops_at_eos_and_scores_empty_generation_zero(suite_tokenizer, records):
    m = make_llama(suite_tokenizer, hidden=32, layers=2, seed=12)
    with torch.no_grad():  # all logits equal -> greedy picks id 0, which is EOS
        m.model.norm.weight.zero_()
    res = run(m, suite_tokenizer, records[:4], seeds=[1], decoding=DecodingConfig.greedy(max_new_tokens=5))
    assert all(s.stopped_at_eos == [True] and s.generations == [""] and s.rouge_l == [0.0] for s in res.samples)
    assert res.per_seed[0].stopped_at_eos == 4 and res.summary()["stopped_at_eos_fraction"] == 1.0


def test_padding_does_not_change_outputs(model, suite_tokenizer, records):
    greedy = DecodingConfig.greedy(max_new_tokens=8, no_repeat_ngram_size=0)
    batched = run(model, suite_tokenizer, records, seeds=[1], decoding=greedy, batch_size=16)
    single = run(model, suite_tokenizer, records, seeds=[1], decoding=greedy, batch_size=1)
    assert len({s.prompt_tokens for s in batched.samples}) > 1  # mixed lengths: padding is exercised
    assert [s.generations for s in batched.samples] == [s.generations for s in single.samples]
    assert batched.rouge_l == single.rouge_l


def test_prompt_truncation_is_recorded(model, suite_tokenizer, records):
    res = run(model, suite_tokenizer, records, seeds=[1], max_prompt_length=6)
    assert all(s.prompt_tokens <= 6 for s in res.samples)
    assert sum(s.prompt_truncated for s in res.samples) == res.summary()["prompts_truncated"] > 0


def test_scoring_and_aggregation(monkeypatch, suite_tokenizer):
    """Fixed generations per seed: the per-seed means, mean/std over seeds and the rows must follow."""
    recs = [Record(id="a", instruction="x", output="the cat sat"),
            Record(id="b", instruction="y", output=("dog", "dog runs")),
            Record(id="c", instruction="z", output="blue")]
    outputs = {10: ["the cat sat", "dogs running", "red"], 20: ["the cat sat", "", "blue"]}

    def fake_generate(model, tokenizer, prompts, decoding, *, batch_size, seed, progress=None):
        assert len(prompts) == 3
        if progress:
            progress(len(prompts))
        return [Generation(token_ids=[1] * len(t.split()), text=t, stopped_at_eos=True) for t in outputs[seed]]

    monkeypatch.setattr("pocl.evaluation.scoring.generate", fake_generate)
    calls = []
    res = evaluate_records(None, suite_tokenizer, recs, seeds=[10, 20], progress=calls.append, name="toy")
    expect = {seed: [rouge_l(t, r.references) for t, r in zip(outs, recs)] for seed, outs in outputs.items()}
    assert expect[10][1] == 100.0  # "dogs running" vs "dog runs": stemming, max over references
    per_seed = [statistics.fmean(expect[10]), statistics.fmean(expect[20])]
    assert res.values("rouge_l") == pytest.approx(per_seed)
    assert res.rouge_l == pytest.approx(statistics.fmean(per_seed))
    assert res.rouge_l_std == pytest.approx(statistics.stdev(per_seed))
    assert res.values("exact_match") == pytest.approx([100 / 3, 200 / 3])
    pop = dataclasses.replace(res, std="population")
    assert pop.exact_match_std == pytest.approx(statistics.pstdev([100 / 3, 200 / 3]))
    assert calls == [3, 3]
    summary = res.summary()
    assert summary["rouge_l"]["seeds"] == [10, 20] and summary["n"] == 3
    rows = generation_rows("m", res)
    assert len(rows) == 6 and rows[2] == {**rows[2], "id": "b", "seed": 10, "reference": ["dog", "dog runs"],
                                          "generation": "dogs running", "rouge_l": 100.0, "model": "m", "set": "toy"}
    assert rows[0]["reference"] == "the cat sat"

    other = dataclasses.replace(res, name="other", per_seed=[dataclasses.replace(p, rouge_l=0.0) for p in res.per_seed])
    avg = average_over_sets([res, other], "rouge_l")
    assert avg["per_seed"] == pytest.approx([v / 2 for v in per_seed]) and avg["sets"] == ["toy", "other"]
    assert avg["std"] == pytest.approx(statistics.stdev([v / 2 for v in per_seed]))


def test_exact_match_normalization(monkeypatch, suite_tokenizer):
    recs = [Record(id="a", instruction="x", output="Paris"), Record(id="b", instruction="y", output="the red cat"),
            Record(id="c", instruction="z", output="blue")]
    texts = ["paris.", "Red cat!", "blue"]

    def fake_generate(model, tokenizer, prompts, decoding, *, batch_size, seed, progress=None):
        return [Generation(token_ids=[1], text=t, stopped_at_eos=True) for t in texts]

    monkeypatch.setattr("pocl.evaluation.scoring.generate", fake_generate)
    squad = evaluate_records(None, suite_tokenizer, recs, seeds=[1])  # default: the papers' squad normalisation
    ws = evaluate_records(None, suite_tokenizer, recs, seeds=[1], em_normalization="whitespace")
    assert [s.exact_match for s in squad.samples] == [[100.0], [100.0], [100.0]] and squad.em_normalization == "squad"
    assert [s.exact_match for s in ws.samples] == [[0.0], [0.0], [100.0]] and ws.exact_match == pytest.approx(100 / 3)
    assert squad.rouge_l == ws.rouge_l  # ROUGE-L does not depend on it
    with pytest.raises(ConfigError, match="em_normalization"):
        evaluate_records(None, suite_tokenizer, recs, seeds=[1], em_normalization="lower")


def test_rejects_records_without_references(model, suite_tokenizer):
    with pytest.raises(DataError, match="no reference"):
        evaluate_records(model, suite_tokenizer, [Record(id="a", instruction="x")], seeds=[1])
    with pytest.raises(DataError, match="no samples"):
        evaluate_records(model, suite_tokenizer, [], seeds=[1])
