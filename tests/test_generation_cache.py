"""Speed-only generation knobs (issue 17): a static KV cache and compiled decoding give the same
tokens as today's dynamic-cache path, and bad values are refused with a clear error."""

from __future__ import annotations

import pytest

from pocl.data import get_template, load_records, tokenize_prompts
from pocl.errors import ConfigError
from pocl.generation import DecodingConfig, effective_settings, generate, speed_settings
from tests.conftest import make_llama


@pytest.fixture(scope="module")
def prompts(tiny_data, suite_tokenizer):
    records = load_records(tiny_data[2]).records
    return tokenize_prompts(records, suite_tokenizer, get_template("alpaca"), max_prompt_length=32)


class _EosAs:
    """The suite tokenizer with another EOS id, so that a random model stops early in some rows."""

    def __init__(self, tokenizer, eos: int):
        self._tok, self.eos_token_id, self.pad_token_id = tokenizer, eos, tokenizer.pad_token_id

    def decode(self, *a, **kw):
        return self._tok.decode(*a, **kw)


def _eos_in_some_rows(model, tokenizer, prompts, decoding):
    """A token that greedy decoding emits mid-answer in some rows but not in all (else None)."""
    gens = generate(model, tokenizer, prompts, decoding, batch_size=4)
    counts: dict[int, int] = {}
    for g in gens:
        for t in set(g.token_ids[1:]):
            counts[t] = counts.get(t, 0) + 1
    found = [t for t, n in sorted(counts.items(), key=lambda kv: -kv[1]) if 0 < n < len(gens)]
    return found[0] if found else None


def test_static_cache_greedy_equals_dynamic(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=11)
    assert len({len(p) for p in prompts}) > 1  # mixed lengths: left padding inside each batch
    # no_repeat_ngram_size=2: a tiny random model otherwise repeats one token in every row
    decoding = DecodingConfig.greedy(max_new_tokens=10, no_repeat_ngram_size=2)
    eos = _eos_in_some_rows(model, suite_tokenizer, prompts, decoding)
    assert eos is not None
    tokenizer = _EosAs(suite_tokenizer, eos)
    dynamic = generate(model, tokenizer, prompts, decoding, batch_size=4)
    static = generate(model, tokenizer, prompts, decoding, batch_size=4, cache="static")
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]
    assert [g.stopped_at_eos for g in static] == [g.stopped_at_eos for g in dynamic]
    stopped = [g.stopped_at_eos for g in dynamic]
    assert any(stopped) and not all(stopped)  # EOS stopping is exercised, in some rows of a batch


def test_static_cache_sampling_same_seed_same_tokens(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=12)
    decoding = DecodingConfig(max_new_tokens=6)
    a = generate(model, suite_tokenizer, prompts, decoding, batch_size=4, seed=3)
    b = generate(model, suite_tokenizer, prompts, decoding, batch_size=4, seed=3, cache="static")
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


@pytest.mark.slow
def test_compiled_static_greedy_equals_dynamic(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=32, layers=2, seed=13)
    decoding = DecodingConfig.greedy(max_new_tokens=6, no_repeat_ngram_size=2)
    dynamic = generate(model, suite_tokenizer, prompts, decoding, batch_size=4)
    compiled = generate(model, suite_tokenizer, prompts, decoding, batch_size=4, cache="static", compile=True)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in dynamic]


def test_speed_knobs_are_validated(suite_tokenizer, prompts):
    model = make_llama(suite_tokenizer, hidden=16, layers=1, seed=14)
    with pytest.raises(ConfigError, match="cache must be one of dynamic, static"):
        generate(model, suite_tokenizer, prompts[:1], DecodingConfig.greedy(max_new_tokens=2), cache="offloaded")
    with pytest.raises(ConfigError, match="needs cache='static'"):
        speed_settings("dynamic", compile=True)
    with pytest.raises(ConfigError, match="true or false"):
        speed_settings("static", compile="yes")
    assert speed_settings() == {"disable_compile": True}
    assert speed_settings("static")["cache_implementation"] == "static"


def test_speed_knobs_stay_out_of_the_stamped_settings():
    settings = effective_settings(DecodingConfig.greedy(max_new_tokens=4), eos_token_id=0, pad_token_id=1)
    assert settings["cache_implementation"] is None
    assert "compile_config" not in settings and "disable_compile" not in settings
