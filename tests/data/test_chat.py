"""Conversation rows (messages, TRL prompt/completion): parsing, errors, rendering with the chat
template, assistant-only labels; `pocl rank` and `pocl distill` on conversation files."""

from __future__ import annotations

import json
import shutil

import pytest

from pocl.data import build_suite_tokenizer, generate_suite, get_template, load_records
from pocl.data.tokenization import IGNORE_INDEX, tokenize_prompts, tokenize_records
from pocl.errors import DataError
from tests.conftest import write_jsonl

#: ChatML-like: every turn ends with the EOS token (the suite's <|endoftext|>)
EOS_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
#: turns end with a blank line: no EOS in the rendering
PLAIN_TEMPLATE = ("{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def chat_tokenizer(template: str | None = EOS_TEMPLATE):
    tok = build_suite_tokenizer(seed=0)  # a fresh copy: the session fixture is shared
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


MULTI = {"id": "m1", "topic": "math", "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 12 + 30"},
    {"role": "assistant", "content": "42"},
    {"role": "tool", "content": "checked 42", "tool_call_id": "c1"},
    {"role": "user", "content": "Sort 5 2 9"},
    {"role": "assistant", "content": "2 5 9"},
]}
PC = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                 {"role": "user", "content": "Add 4 + 4"}],
      "completion": [{"role": "assistant", "content": "I will add."}, {"role": "tool", "content": "8"},
                     {"role": "assistant", "content": "8"}]}


def load(tmp_path, rows, **kw):
    return load_records(write_jsonl(tmp_path / "chat.jsonl", rows), **kw)


def target_runs(tok, sample) -> list[str]:
    """The decoded runs of consecutive target positions."""
    runs, cur = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        assert label in (IGNORE_INDEX, token)
        if label != IGNORE_INDEX:
            cur.append(token)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ---------------------------------------------------------------------------------------------
# parsing


def test_messages_row_becomes_a_conversation_record(tmp_path):
    rows = [MULTI, {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]
    r, second = load(tmp_path, rows).records
    assert r.id == "m1" and second.id == "000001"  # the id rule of every row
    assert r.output == "2 5 9" and r.target == "2 5 9" and r.instruction == "" and r.meta == {"topic": "math"}
    conv = r.conversation
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "user"]
    assert conv.trained == (2,) and conv.key == "messages"
    assert conv.messages[3]["tool_call_id"] == "c1"  # extra keys reach the template
    assert r.messages == MULTI["messages"]


def test_prompt_completion_layouts(tmp_path):
    rows = [PC,
            {"prompt": "What is 2 + 2?", "completion": [{"role": "assistant", "content": "4"}]},
            {"prompt": [{"role": "user", "content": "Say yes"}], "completion": "yes"},
            {"prompt": "Below is a question.\n", "completion": "an answer"}]
    a, b, c, d = load(tmp_path, rows).records
    assert a.output == "8" and a.conversation.key == "prompt"
    assert a.conversation.trained == (3,)  # the completion's assistant turns only, not the prompt's
    assert b.messages == [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert c.messages == [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]
    # TRL's standard layout (strings): the prompt is the ready-made prompt, the completion the output
    assert d.conversation is None and d.prompt == "Below is a question.\n" and d.output == "an answer"


def test_prompt_only_conversations_need_require_output_false(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]},
            {"prompt": [{"role": "user", "content": "Add 1 + 1"}]}]
    with pytest.raises(DataError, match="chat.jsonl:1: field 'messages': no assistant turn"):
        load(tmp_path, rows)
    recs = load(tmp_path, rows, require_output=False).records
    assert [r.output for r in recs] == ["", ""] and len(recs[0].conversation.messages) == 1


BAD = [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages",
     "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages[2].role", "the final turn is 'user', not 'assistant'"),
    ({"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[0].role",
     "unknown role 'human'"),
    ({"messages": [{"role": 3, "content": "a"}]}, "messages[0].role", "role must be a string"),
    ({"messages": [{"content": "a"}]}, "messages[0].role", "missing role"),
    ({"messages": ["hello", {"role": "assistant", "content": "b"}]}, "messages[0]", "must be an object"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
     "messages[0].content", "content must be a string, got list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "messages[0].content",
     "missing content"),
    ({"messages": "hello"}, "messages", "must be a list of messages"),
    ({"messages": []}, "messages", "empty list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "the final assistant turn (the response) is empty"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": "b", "tool_calls": [{"name": "f"}]}]},
     "messages[1]", "'tool_calls': only its content is the response"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, "messages", "no turn before the final assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "output": "c"},
     "output", "cannot also have 'output'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prompt": "c"},
     "prompt", "cannot also have 'prompt'"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "tool", "content": "b"}]},
     "completion", "no assistant turn in the completion"),
    ({"prompt": [{"role": "user", "content": "a"}]}, "completion", "missing completion"),
    ({"completion": [{"role": "assistant", "content": "a"}]}, "prompt", "missing prompt"),
    ({"prompt": "q", "completion": 5}, "completion", "must be a string or a list of messages"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": " "}, "completion", "the response) is empty"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"},
                                                                    {"role": "tool", "content": "c"}]},
     "completion[1].role", "the final turn is 'tool'"),
    ({"prompt": "q", "completion": "a", "output": "b"}, "completion", "both 'output' and 'completion'"),
]


@pytest.mark.parametrize("row,field,reason", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_conversation_rows_name_file_line_and_field(tmp_path, row, field, reason):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError) as err:
        load(tmp_path, [good, row])
    assert str(err.value).startswith(f"{tmp_path / 'chat.jsonl'}:2: field '{field}': ")
    assert reason in str(err.value) and err.value.line == 2 and err.value.field == field
    result = load(tmp_path, [good, row], skip_invalid=True)  # listed, never skipped silently
    assert len(result.records) == 1 and [(s.line, s.field) for s in result.skipped] == [(2, field)]


# ---------------------------------------------------------------------------------------------
# rendering and labels


def test_every_assistant_turn_and_its_eos_are_the_only_targets(tmp_path, tok):
    rec = load(tmp_path, [MULTI]).records[0]
    s = tokenize_records([rec], tok, "alpaca", max_length=256, max_prompt_length=200)[0]
    assert target_runs(tok, s) == ["42<|endoftext|>", "2 5 9<|endoftext|>"]
    # the prompt: the chat template's rendering of the turns before the final one, generation prompt
    prompt = tok.apply_chat_template(MULTI["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(s.input_ids[:s.prompt_length]) == prompt
    assert get_template("chat", tok).render(rec) == prompt == get_template("alpaca", tok).render(rec)
    # the token prefix property: the sample is the tokenised full rendering (without the final "\n")
    full = tok.apply_chat_template(MULTI["messages"], tokenize=False)
    assert full.endswith("<|endoftext|>\n")
    assert s.input_ids == tok(full[:-1], add_special_tokens=False)["input_ids"]
    assert tokenize_prompts([rec], tok, "plain", max_prompt_length=200) == [s.input_ids[:s.prompt_length]]
    # the difficulty measurer scores the final turn only
    final = tokenize_records([rec], tok, "alpaca", max_length=256, max_prompt_length=200, context_targets=False)[0]
    assert target_runs(tok, final) == ["2 5 9<|endoftext|>"] and final.input_ids == s.input_ids


def test_prompt_completion_trains_the_completion_only(tmp_path, tok):
    rec = load(tmp_path, [PC]).records[0]
    s = tokenize_records([rec], tok, "chat", max_length=256, max_prompt_length=200)[0]
    assert target_runs(tok, s) == ["I will add.<|endoftext|>", "8<|endoftext|>"]  # not "hello there"


def test_template_without_eos_trains_the_contents_and_appends_eos_to_the_response(tmp_path):
    tok = chat_tokenizer(PLAIN_TEMPLATE)
    rec = load(tmp_path, [MULTI]).records[0]
    s = tokenize_records([rec], tok, "alpaca", max_length=256, max_prompt_length=200)[0]
    assert target_runs(tok, s) == ["42", "2 5 9<|endoftext|>"]
    assert tok.decode(s.input_ids).endswith("### user:\nSort 5 2 9\n\n### assistant:\n2 5 9<|endoftext|>")


def test_left_truncation_cuts_the_labels_with_the_prompt(tmp_path, tok):
    rec = load(tmp_path, [MULTI]).records[0]
    full = tokenize_records([rec], tok, "chat", max_length=256, max_prompt_length=200)[0]
    for keep in range(5, full.prompt_length):
        s = tokenize_records([rec], tok, "chat", max_length=256, max_prompt_length=keep)[0]
        assert s.prompt_truncated and s.prompt_length == keep
        n = len(s.input_ids)
        assert s.input_ids == full.input_ids[-n:] and s.labels == full.labels[-n:]


def test_a_template_that_is_not_prefix_stable_is_an_error(tmp_path):
    # the last message is rendered differently: earlier assistant turns cannot be located
    tok = chat_tokenizer("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.role }}: {{ m.content }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}")
    rec = load(tmp_path, [MULTI]).records[0]
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages\[2\]': sample 'm1': the chat template "
                                        r"does not render the conversation prefix by prefix"):
        tokenize_records([rec], tok, "chat", max_length=256, max_prompt_length=200)


def test_content_not_rendered_verbatim_is_an_error(tmp_path):
    tok = chat_tokenizer("{% for m in messages %}{{ m.role }}:\n{{ m.content | upper }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:\n{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "Say ok"}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages\[1\].content': .* verbatim"):
        tokenize_records(load(tmp_path, rows).records, tok, "chat", max_length=256, max_prompt_length=200)


def test_tokens_merging_across_the_content_boundary_is_an_error(tmp_path):
    # "assistant: red" is tokenised with the space glued to the word: no token boundary at the content
    tok = chat_tokenizer("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "Reverse red cat"}, {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "cat red"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages\[1\].content': .* tokens do not split "
                                        r"at the start"):
        tokenize_records(load(tmp_path, rows).records, tok, "chat", max_length=256, max_prompt_length=200)


def test_no_chat_template_and_a_failing_template_name_the_row(tmp_path):
    recs = load(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                           MULTI]).records
    plain = build_suite_tokenizer(seed=0)
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages': sample '000000' is a conversation, "
                                        r"rendered with the tokenizer's chat template, but the tokenizer .* has none"):
        tokenize_records(recs, plain, "alpaca", max_length=64, max_prompt_length=32)
    with pytest.raises(DataError, match="has none"):
        get_template("alpaca", plain).render(recs[0])
    with pytest.raises(DataError, match="no tokenizer was given"):
        get_template("alpaca").render(recs[0])
    failing = chat_tokenizer("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
                             "{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match=r"chat.jsonl:2: field 'messages': the tokenizer's chat template cannot "
                                        r"render the conversation of sample 'm1': TemplateError: no tools"):
        tokenize_records(recs, failing, "chat", max_length=64, max_prompt_length=32)
    broken = chat_tokenizer("{% for m in messages %}")
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*TemplateSyntaxError"):
        tokenize_prompts(recs, broken, "chat", max_prompt_length=32)


def test_instruction_rows_are_unchanged_next_to_conversations(tmp_path, tok):
    inst = {"instruction": "Add the two numbers.", "input": "1 + 2", "output": "3"}
    recs = load(tmp_path, [inst, MULTI]).records
    mixed = tokenize_records(recs, tok, "alpaca", max_length=256, max_prompt_length=200)
    alone = tokenize_records(recs[:1], tok, "alpaca", max_length=256, max_prompt_length=200)
    assert mixed[0] == alone[0] and target_runs(tok, mixed[0]) == ["3<|endoftext|>"]
    assert mixed.stats.response_tokens == sum(s.num_targets for s in mixed)


CHATML = ("{% for m in messages %}{% if loop.first and m.role != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
          "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}"
          "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chatml_with_the_gpt2_vocabulary(tmp_path):
    """A Qwen-style ChatML template ({% generation %} blocks, a default system prompt) on the real GPT-2
    BPE, <|im_end|> being the EOS: the sample is the tokenised conversation and the targets are exactly
    the assistant contents, each with its <|im_end|>."""
    from tests.data.test_tokenization import _gpt2_tokenizer

    tok = _gpt2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    turns = [{"role": "user", "content": "List two fruits."},
             {"role": "assistant", "content": "Sure!\n\n- apple\n- pear"},
             {"role": "user", "content": "And a number?"}, {"role": "assistant", "content": " 42 "},
             {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You're welcome."}]
    rec = load(tmp_path, [{"messages": turns}]).records[0]
    s = tokenize_records([rec], tok, "chat", max_length=512, max_prompt_length=400)[0]
    assert target_runs(tok, s) == ["Sure!\n\n- apple\n- pear<|im_end|>", " 42 <|im_end|>", "You're welcome.<|im_end|>"]
    full = tok.apply_chat_template(turns, tokenize=False)
    assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert s.input_ids == tok(full.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    mask = tok.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert mask["input_ids"][:-1] == s.input_ids  # the {% generation %} mask agrees with the labels
    assert [int(m) for m in mask["assistant_masks"][:-1]] == [int(x != IGNORE_INDEX) for x in s.labels]


def test_rows_of_a_saved_dataset(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    # Arrow gives every message every key of the column, None where a message had none
    rows = [{"id": "a", "messages": [{"role": "user", "content": "Add 1 + 2"}, {"role": "assistant", "content": "3"}]},
            {"id": "b", "messages": [{"role": "user", "content": "ping"},
                                     {"role": "tool", "content": "pong", "tool_call_id": "t1"},
                                     {"role": "assistant", "content": "pong"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = load_records(tmp_path / "ds").records
    assert recs[0].messages == rows[0]["messages"] and recs[1].messages == rows[1]["messages"]
    ds = tokenize_records(recs, tok, "chat", max_length=96, max_prompt_length=64)
    assert [target_runs(tok, s) for s in ds] == [["3<|endoftext|>"], ["pong<|endoftext|>"]]


# ---------------------------------------------------------------------------------------------
# the commands on conversation files


def suite_conversations(n: int, split: str = "train") -> list[dict]:
    """Suite rows as conversations: one turn, or two (the previous row's exchange first)."""
    rows = generate_suite(n_train=n, n_dev=n, n_test=4, seed=0)[split]
    out = []
    for i, r in enumerate(rows):
        turn = [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                {"role": "assistant", "content": r["output"]}]
        if i % 3 == 2:
            p = rows[i - 1]
            turn = [{"role": "user", "content": f"{p['instruction']}\n\n{p['input']}"},
                    {"role": "assistant", "content": p["output"]}] + turn
        out.append({"id": r["id"], "messages": turn})
    return out


def as_prompt_completion(rows: list[dict]) -> list[dict]:
    return [{"id": r["id"], "prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory, tiny_pair):
    """The tiny pair with the chat template saved in the folders' tokenizer (chat_template.jinja)."""
    root = tmp_path_factory.mktemp("chat_pair")
    tok = chat_tokenizer()
    out = []
    for src in tiny_pair:
        dst = root / src.name
        shutil.copytree(src, dst)
        tok.save_pretrained(dst)
        out.append(dst)
    return tuple(out)


def test_rank_on_a_chat_file(tmp_path, chat_pair, capsys):
    from pocl.cli import main
    from pocl.models import load_tokenizer

    assert load_tokenizer(str(chat_pair[1])).chat_template == EOS_TEMPLATE
    train = write_jsonl(tmp_path / "chat.jsonl", suite_conversations(12))
    out = tmp_path / "run"
    args = ["rank", "--student", str(chat_pair[1]), "--train-file", str(train), "--max-length", "96",
            "--max-prompt-length", "64", "--rank-max-new-tokens", "4", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    assert "12 samples ranked by rrf (computed" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "ranking.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(r["id"] for r in suite_conversations(12))
    assert main(args) == 0 and "(reused" in capsys.readouterr().out
    # without a chat template: a DataError naming the first row (exit 2)
    assert main(["rank", "--student", str(chat_pair[1]), "--tokenizer", str(_plain_tokenizer_dir(tmp_path)),
                 "--train-file", str(train), "--output-dir", str(tmp_path / "run2"), "--no-progress"]) != 0
    assert "chat.jsonl:1: field 'messages'" in capsys.readouterr().err


def _plain_tokenizer_dir(tmp_path):
    path = tmp_path / "plain_tok"
    build_suite_tokenizer(seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("layout,on_policy", [("messages", 0), ("prompt_completion", 1)])
def test_distill_trains_on_a_conversation_file(tmp_path, chat_pair, layout, on_policy):
    """Teacher-forced on the references (every assistant turn), or on-policy: the student answers the
    chat prompts (the conversation up to the final turn)."""
    from pocl.cli import main

    rows = suite_conversations(8)
    dev = suite_conversations(4, "dev")
    if layout == "prompt_completion":
        rows, dev = as_prompt_completion(rows), as_prompt_completion(dev)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    devf = write_jsonl(tmp_path / "dev.jsonl", dev)
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(chat_pair[0]), "--student", str(chat_pair[1]), "--train-file", str(train),
                 "--dev-file", str(devf), "--template", "chat", "--max-length", "96", "--max-prompt-length", "64",
                 "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "2", "--no-progress",
                 "--no-tensorboard", "--output-dir", str(out), "--on-policy-fraction", str(on_policy),
                 "--on-policy-max-new-tokens", "4"])
    assert code == 0
    assert (out / "final" / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_steps"] == 2 and summary["on_policy_steps"] == 2 * on_policy, summary


def test_difficulty_is_measured_on_the_final_assistant_turn(tmp_path, chat_pair):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from pocl.curriculum.measurement import measure_difficulty
    from pocl.generation import DecodingConfig

    tok = chat_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(chat_pair[1])
    rec = load(tmp_path, [MULTI]).records[0]
    [d] = measure_difficulty(model, tok, [rec], template="chat", max_length=128, max_prompt_length=96,
                             decoding=DecodingConfig.greedy(max_new_tokens=4), batch_size=1, need_rouge=False,
                             progress=False, fused=False)
    s = tokenize_records([rec], tok, "chat", max_length=128, max_prompt_length=96)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
    labels = torch.tensor(s.labels[1:])
    final = labels.clone()
    final[: s.prompt_length - 1] = IGNORE_INDEX  # the earlier assistant turn is not scored
    assert (labels != IGNORE_INDEX).sum() > (final != IGNORE_INDEX).sum()
    expected = F.cross_entropy(logits, final, ignore_index=IGNORE_INDEX).item()
    assert d.loss == pytest.approx(expected, rel=1e-4)


def test_evaluation_generates_from_the_conversation_prompt(tmp_path, chat_pair):
    from transformers import AutoModelForCausalLM

    from pocl.evaluation.scoring import evaluate_records
    from pocl.generation import DecodingConfig

    tok = chat_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(chat_pair[1])
    recs = load(tmp_path, [MULTI, PC]).records
    result = evaluate_records(model, tok, recs, template="alpaca", decoding=DecodingConfig.greedy(max_new_tokens=3),
                              seeds=(1,), batch_size=2)
    prompts = [tok.apply_chat_template(r.messages[:-1], tokenize=False, add_generation_prompt=True) for r in recs]
    assert [s.prompt for s in result.samples] == prompts
    assert [s.references for s in result.samples] == [["2 5 9"], ["8"]]  # the final assistant turns
