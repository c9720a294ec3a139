"""SeqKD teacher caches stamp the settings handed to transformers' generate, so a cache written before
pocl passed every decoding setting explicitly (sampled with top-k 50 or the teacher's own
generation_config) is generated again instead of being reused."""

from __future__ import annotations

import json

import pocl.baselines as baselines
from pocl.config.schema import stable_hash
from pocl.data import get_template, load_records, tokenize_records
from pocl.generation import DecodingConfig
from tests.conftest import make_llama


def test_cache_without_the_transformers_settings_is_regenerated(tmp_path, suite_tokenizer, tiny_data):
    teacher = make_llama(suite_tokenizer, hidden=16, layers=1, seed=3)
    records = load_records(tiny_data[2]).records[:6]
    samples = tokenize_records(records, suite_tokenizer, get_template("alpaca"), max_length=48,
                               max_prompt_length=32).samples
    decoding = DecodingConfig(max_new_tokens=4, no_repeat_ngram_size=0)  # SeqKD sampling: T = 1, no top-k
    path = tmp_path / baselines.SEQKD_FILE
    kw = dict(teacher=teacher, tokenizer=suite_tokenizer, samples=samples, decoding=decoding, batch_size=8,
              teacher_fingerprint="t")
    assert baselines.teacher_responses(path, **kw)[1]["action"] == "generated"
    meta_file = path.with_name("seqkd_teacher.meta.json")
    meta = json.loads(meta_file.read_text())
    settings = meta["stamp_inputs"]["transformers_generate"]
    assert settings["top_k"] == 0 and settings["do_sample"] is True and settings["max_new_tokens"] == 4
    assert baselines.teacher_responses(path, **kw)[1]["action"] == "reused"

    # what an earlier pocl wrote: the same stamp without the transformers settings, hashed as it was
    del meta["stamp_inputs"]["transformers_generate"]
    meta["stamp_hash"] = stable_hash(meta["stamp_inputs"])[:16]
    meta_file.write_text(json.dumps(meta))
    _, info = baselines.teacher_responses(path, **kw)
    assert info["action"] == "generated" and "passed every decoding setting" in info["reason"]
    assert baselines.teacher_responses(path, **kw)[1]["action"] == "reused"
