from __future__ import annotations

import pytest

from pocl.data.builtin import build_tokenizer
from pocl.data.records import Record
from pocl.data.templates import (
    ChatTemplate,
    PromptTemplate,
    get_template,
)
from pocl.errors import ConfigError, DataError, UnknownNameError

NO_INPUT = Record(id="1", instruction="Name a fruit.", output="apple")
WITH_INPUT = Record(id="2", instruction="Summarise.", input="A long text.", output="Short.")

EXPECTED_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response:\n")
EXPECTED_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSummarise.\n\n### Input:\nA long text.\n\n### Response:\n")


def test_alpaca_exact_strings():
    t = get_template("alpaca")
    assert t.render(NO_INPUT) == EXPECTED_NO_INPUT
    assert t.render(WITH_INPUT) == EXPECTED_WITH_INPUT
    assert get_template().render(NO_INPUT) == EXPECTED_NO_INPUT  # the default
    assert t.add_special_tokens(NO_INPUT) is True


def test_alpaca_keeps_braces_in_text():
    r = Record(id="3", instruction="Print {x} and {{y}}.", input="{input}", output="o")
    assert "### Instruction:\nPrint {x} and {{y}}.\n\n### Input:\n{input}\n\n" in \
        get_template("alpaca").render(r)


def test_ready_made_prompt_used_as_is():
    r = Record(id="4", instruction="Name a fruit.", prompt="PROMPT >>> ", output="apple")
    assert get_template("alpaca").render(r) == "PROMPT >>> "
    assert get_template("alpaca", use_prompt_field=False).render(r) == EXPECTED_NO_INPUT
    # an explicitly chosen non-Alpaca template is applied unless asked otherwise
    assert get_template("plain").render(r) == "Name a fruit.\n"
    assert get_template("plain", use_prompt_field=True).render(r) == "PROMPT >>> "


def test_prompt_only_row_needs_the_prompt_field():
    r = Record(id="5", instruction="", prompt="P:", source="f.jsonl", line=4)
    assert get_template("alpaca").render(r) == "P:"
    with pytest.raises(DataError, match=r"f\.jsonl:4: field 'instruction'"):
        get_template("alpaca", use_prompt_field=False).render(r)


def test_plain():
    t = get_template("plain")
    assert t.render(NO_INPUT) == "Name a fruit.\n"
    assert t.render(WITH_INPUT) == "Summarise.\n\nA long text.\n"


def test_custom_template_with_and_without_input():
    t = get_template("Q: {instruction}\nI: {input}\nA:")
    assert t.render(WITH_INPUT) == "Q: Summarise.\nI: A long text.\nA:"
    assert t.render(NO_INPUT) == "Q: Name a fruit.\nI: \nA:"
    # a template without {input}: the input follows the instruction, never dropped
    t2 = get_template("Task: {instruction}\nAnswer:")
    assert t2.render(NO_INPUT) == "Task: Name a fruit.\nAnswer:"
    assert t2.render(WITH_INPUT) == "Task: Summarise.\n\nA long text.\nAnswer:"
    # literal braces
    assert get_template("{{json}} {instruction}").render(NO_INPUT) == "{json} Name a fruit."


@pytest.mark.parametrize("spec, names", [
    ("{instruction} {output}", "{output}"),
    ("{instruction} {}", "{}"),
    ("{instruction} {input!r}", "{input!r}"),
    ("{instruction} {Input} {ctx}", "{Input}, {ctx}"),
])
def test_unknown_placeholder(spec, names):
    with pytest.raises(ConfigError) as e:
        get_template(spec)
    assert names in str(e.value)


def test_template_must_have_instruction_and_valid_braces():
    with pytest.raises(ConfigError, match=r"\{instruction\}"):
        get_template("only {input}")
    with pytest.raises(ConfigError, match="malformed"):
        get_template("{instruction")


def test_unknown_template_name_suggests():
    with pytest.raises(UnknownNameError, match="alpaca"):
        get_template("alpacca")


def test_template_files(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("### Q\n{instruction}\n### A\n", encoding="utf-8")
    assert get_template(str(txt)).render(NO_INPUT) == "### Q\nName a fruit.\n### A\n"
    yml = tmp_path / "t.yaml"
    yml.write_text('with_input: "Q: {instruction}\\nC: {input}\\nA: "\n'
                   'no_input: "Q: {instruction}\\nA: "\n', encoding="utf-8")
    t = get_template(yml)
    assert t.render(WITH_INPUT) == "Q: Summarise.\nC: A long text.\nA: "
    assert t.render(NO_INPUT) == "Q: Name a fruit.\nA: "
    bad = tmp_path / "bad.yaml"
    bad.write_text('with_input: "{instruction} {foo}"\nno_input: "{instruction}"\n',
                   encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\{foo\}"):
        get_template(bad)
    extra = tmp_path / "extra.yaml"
    extra.write_text('no_input: "{instruction}"\nwith_input: "{instruction} {input}"\n'
                     'withinput: "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="withinput"):
        get_template(extra)
    no_inp = tmp_path / "noinp.yaml"
    no_inp.write_text('no_input: "{instruction}"\nwith_input: "{instruction}"\n',
                      encoding="utf-8")
    with pytest.raises(ConfigError, match=r"with_input.*\{input\}"):
        get_template(no_inp)
    with pytest.raises(ConfigError, match="does not exist"):
        get_template(tmp_path / "missing.yaml")


TINY_CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["hello world 123", "Name a fruit."] * 10, vocab_size=300)


def test_chat_template(tokenizer):
    tokenizer.chat_template = TINY_CHAT
    try:
        t = get_template("chat", tokenizer)
        assert isinstance(t, ChatTemplate)
        assert t.render(NO_INPUT) == "<|user|>Name a fruit.<|end|><|assistant|>"
        assert t.render(WITH_INPUT) == "<|user|>Summarise.\n\nA long text.<|end|><|assistant|>"
        assert t.template_adds_special_tokens
        assert t.add_special_tokens(NO_INPUT) is False
        # the data's Alpaca prompt does not override an explicitly chosen chat template
        r = Record(id="9", instruction="Name a fruit.", prompt="ALPACA", output="x")
        assert t.render(r).startswith("<|user|>")
        t2 = get_template("chat", tokenizer, use_prompt_field=True)
        assert t2.render(r) == "ALPACA" and t2.add_special_tokens(r) is True
    finally:
        tokenizer.chat_template = None


def test_chat_template_missing(tokenizer):
    assert not getattr(tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match="no chat template"):
        get_template("chat", tokenizer)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        get_template("chat")


def test_template_instance_passes_through():
    t = get_template("plain")
    assert get_template(t) is t
    assert isinstance(t, PromptTemplate)
