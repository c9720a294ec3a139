"""Batched generation: padding invariance, token limit, EOS, seeds."""

from __future__ import annotations

import pytest
import torch

from pocl.data import get_template, load_records, tokenize_prompts
from pocl.generation import DecodingConfig, generate, left_pad, length_sorted_batches
from tests.conftest import make_llama


@pytest.fixture(scope="module")
def prompts(tiny_data, suite_tokenizer):
    records = load_records(tiny_data[2]).records
    return tokenize_prompts(records, suite_tokenizer, get_template("alpaca"), max_prompt_length=32)


def test_left_padding_layout():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=1, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_length_sorted_batches_cover_everything_once():
    batches = length_sorted_batches([3, 9, 1, 9, 4], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_greedy_batched_equals_one_at_a_time(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=5)
    assert len({len(p) for p in prompts}) > 1  # mixed lengths, so padding is exercised
    decoding = DecodingConfig.greedy(max_new_tokens=8, no_repeat_ngram_size=0)
    batched = generate(model, suite_tokenizer, prompts, decoding, batch_size=8)
    single = [generate(model, suite_tokenizer, [p], decoding, batch_size=1)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_token_limit_and_text(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=6)
    gens = generate(model, suite_tokenizer, prompts, DecodingConfig.greedy(max_new_tokens=5), batch_size=4)
    assert all(len(g.token_ids) <= 5 for g in gens)
    assert all(len(g.token_ids) == 5 for g in gens if not g.stopped_at_eos)
    assert all(g.text == suite_tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens)


def test_stops_at_eos(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=7)
    with torch.no_grad():  # all logits equal -> greedy picks id 0, which is EOS
        model.model.norm.weight.zero_()
    assert suite_tokenizer.eos_token_id == 0
    gens = generate(model, suite_tokenizer, prompts[:3], DecodingConfig.greedy(max_new_tokens=5))
    assert all(g.stopped_at_eos and g.token_ids == [] and g.text == "" for g in gens)


def test_sampling_is_reproducible_for_a_seed(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=8)
    decoding = DecodingConfig(max_new_tokens=6)
    a = generate(model, suite_tokenizer, prompts, decoding, batch_size=4, seed=10)
    b = generate(model, suite_tokenizer, prompts, decoding, batch_size=4, seed=10)
    c = generate(model, suite_tokenizer, prompts, decoding, batch_size=4, seed=20)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_decoding_validation():
    from pocl.errors import ConfigError

    with pytest.raises(ConfigError):
        DecodingConfig(temperature=0.0)
    with pytest.raises(ConfigError):
        DecodingConfig(top_p=1.5)
    hf = DecodingConfig().to_hf(eos_token_id=0, pad_token_id=1)
    # top_k 0 (not None: transformers would fill in the model's value or 50; see test_generation_settings.py)
    assert hf.do_sample and hf.top_k == 0 and hf.no_repeat_ngram_size == 6 and hf.max_new_tokens == 256
    assert DecodingConfig(no_repeat_ngram_size=0).to_hf(eos_token_id=0, pad_token_id=1).no_repeat_ngram_size == 0
