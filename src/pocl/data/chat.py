"""Conversation rows: parsing, rendering with the tokenizer's chat template, assistant label masks.

Two row layouts hold a conversation (see ``docs/data.md``):

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- the whole conversation; every
  assistant turn is trained;
* TRL's prompt/completion layout, ``{"prompt": [...messages], "completion": [...messages]}`` -- a
  string ``prompt`` is one user turn and a string ``completion`` one assistant turn; only the
  assistant turns of the completion are trained (the prompt is the prompt). A string prompt with
  a string completion is TRL's *standard* layout, not a conversation: the completion is the
  row's output and the prompt its ready-made prompt (:func:`completion_as_output`).

The final assistant turn is the record's response (``Record.output``); ``Conversation.messages``
holds the turns before it, which render, with the chat template's generation prompt, into the
record's prompt. Tokenisation (:func:`context_labels`) locates the earlier assistant turns in the
rendered prompt by rendering the conversation prefix by prefix; a chat template or a tokenizer that
does not keep prefixes (text or tokens) is a :class:`DataError` naming the row and the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pocl.errors import DataError

from .readers import RowError, type_name

ROLES = ("system", "user", "assistant", "tool")
MESSAGES_KEY = "messages"
PROMPT_KEY = "prompt"
COMPLETION_KEY = "completion"
IGNORE_INDEX = -100

#: instruction-layout keys that a conversation row must not have (they would be ignored)
_INSTRUCTION_KEYS = ("instruction", "input", "context", "output", "response")


@dataclass(frozen=True)
class Conversation:
    """The turns of a conversation row before its final assistant turn (the response).

    ``messages``: the turns as ``{"role", "content", ...}`` dicts (extra keys such as ``name`` or
    ``tool_call_id`` are passed to the chat template); ``trained``: the indices in ``messages`` of
    the assistant turns that are training targets besides the response; ``key``: the row's field
    (``messages`` or ``prompt``); ``paths``: each message's place in the row (``messages[2]``,
    ``completion[0]``), for error messages.
    """

    messages: tuple[dict[str, Any], ...]
    trained: tuple[int, ...] = ()
    key: str = MESSAGES_KEY
    paths: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def path(self, index: int) -> str:
        return self.paths[index] if index < len(self.paths) else f"{self.key}[{index}]"


# ---------------------------------------------------------------------------------------------
# parsing


def row_kind(row: Mapping[str, Any]) -> str | None:
    """``"conversation"`` (messages or conversational prompt/completion), ``"completion"``
    (TRL's standard string prompt + string completion), or None (an instruction row)."""
    if row.get(MESSAGES_KEY) is not None:
        return "conversation"
    prompt, completion = row.get(PROMPT_KEY), row.get(COMPLETION_KEY)
    if isinstance(prompt, (list, tuple)) or isinstance(completion, (list, tuple)):
        return "conversation"
    if completion is not None:
        return "completion"
    return None


def completion_as_output(row: Mapping[str, Any]) -> dict[str, Any]:
    """A standard prompt/completion row as an instruction row: the completion is the output."""
    completion = row[COMPLETION_KEY]
    clash = [k for k in ("output", "response") if row.get(k) is not None]
    if clash:
        raise RowError(COMPLETION_KEY, f"both '{clash[0]}' and '{COMPLETION_KEY}' are given; they spell "
                                       "the same field, keep one")
    if not isinstance(completion, str):
        raise RowError(COMPLETION_KEY, "must be a string or a list of messages, got "
                                       f"{type_name(completion)}")
    out = {k: v for k, v in row.items() if k != COMPLETION_KEY}
    out["output"] = completion
    return out


def _messages(value: Any, key: str) -> tuple[list[dict[str, Any]], list[str]]:
    if not isinstance(value, (list, tuple)):
        raise RowError(key, f"must be a list of messages ({{role, content}} objects), got {type_name(value)}")
    if not value:
        raise RowError(key, "is an empty list of messages")
    out, paths = [], []
    for i, message in enumerate(value):
        path = f"{key}[{i}]"
        if not isinstance(message, Mapping):
            raise RowError(path, f"a message must be an object with 'role' and 'content', got {type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise RowError(f"{path}.role", "missing role")
        if not isinstance(role, str):
            raise RowError(f"{path}.role", f"role must be a string, got {type_name(role)}")
        if role not in ROLES:
            raise RowError(f"{path}.role", f"unknown role '{role}'; the roles are {', '.join(ROLES)}")
        if content is None:
            raise RowError(f"{path}.content", "missing content")
        if not isinstance(content, str):
            raise RowError(f"{path}.content", f"content must be a string, got {type_name(content)}")
        # a JSON null counts as an absent key (datasets fills absent struct fields with None)
        out.append({str(k): v for k, v in message.items() if v is not None})
        paths.append(path)
    return out, paths


def _sub(path: str, key: str) -> str:
    """``messages[3].content``; a string prompt or completion is the field itself."""
    return path if path in (PROMPT_KEY, COMPLETION_KEY) else f"{path}.{key}"


def _no_instruction_keys(row: Mapping[str, Any], what: str, others: Sequence[str] = ()) -> None:
    for key in (*_INSTRUCTION_KEYS, *others):
        if row.get(key) is not None:
            raise RowError(key, f"a {what} row cannot also have '{key}' (it would be ignored); keep one layout")


def parse_conversation(row: Mapping[str, Any], *, id_key: str,
                       require_output: bool) -> tuple[Conversation, str, dict[str, Any]]:
    """``(conversation, output, meta)`` of a conversation row; :class:`RowError` for a bad one.

    ``output`` is the final assistant turn's content, ``""`` for a prompt-only conversation (it does
    not end with an assistant turn), which only ``require_output=False`` accepts.
    """
    if row.get(MESSAGES_KEY) is not None:
        _no_instruction_keys(row, "'messages'", (PROMPT_KEY, COMPLETION_KEY))
        messages, paths = _messages(row[MESSAGES_KEY], MESSAGES_KEY)
        key, first_trained, end_key = MESSAGES_KEY, 0, MESSAGES_KEY
    else:
        _no_instruction_keys(row, "prompt/completion")
        prompt, completion = row.get(PROMPT_KEY), row.get(COMPLETION_KEY)
        if prompt is None:
            raise RowError(PROMPT_KEY, "missing prompt (the completion's conversation needs one)")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError(PROMPT_KEY, "prompt is empty")
            messages, paths = [{"role": "user", "content": prompt}], [PROMPT_KEY]
        else:
            messages, paths = _messages(prompt, PROMPT_KEY)
        key, first_trained, end_key = PROMPT_KEY, len(messages), COMPLETION_KEY
        if completion is None:
            if require_output:
                raise RowError(COMPLETION_KEY, "missing completion (the assistant answer)")
        elif isinstance(completion, str):
            messages.append({"role": "assistant", "content": completion})
            paths.append(COMPLETION_KEY)
        else:
            more, more_paths = _messages(completion, COMPLETION_KEY)
            if not any(m["role"] == "assistant" for m in more):
                raise RowError(COMPLETION_KEY, "no assistant turn in the completion")
            messages += more
            paths += more_paths

    output = ""
    last = messages[-1]
    if last["role"] == "assistant" and (require_output or len(messages) > first_trained):
        output = last["content"]
        if not output.strip():
            raise RowError(_sub(paths[-1], "content"), "the final assistant turn (the response) is empty or "
                                                   "whitespace only")
        extra = sorted(k for k in last if k not in ("role", "content"))
        if extra:
            raise RowError(paths[-1], f"the final assistant turn has {', '.join(repr(k) for k in extra)}: only "
                                      "its content is the response, so they would be lost")
        if len(messages) == 1:
            raise RowError(key, "no turn before the final assistant turn: the prompt would be empty")
        messages, paths = messages[:-1], paths[:-1]
    elif require_output:
        if not any(m["role"] == "assistant" for m in messages[first_trained:]):
            raise RowError(end_key, "no assistant turn: the final assistant turn is the response")
        raise RowError(_sub(paths[-1], "role"), f"the final turn is '{last['role']}', not 'assistant': the final "
                                            "assistant turn is the response")
    trained = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained)
    known = {MESSAGES_KEY, PROMPT_KEY, COMPLETION_KEY, id_key}
    meta = {k: v for k, v in row.items() if k not in known}
    conversation = Conversation(messages=tuple(messages), trained=trained, key=key, paths=tuple(paths))
    return conversation, output, meta


# ---------------------------------------------------------------------------------------------
# rendering


def render(record: Any, tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool) -> str:
    """``messages`` rendered with the tokenizer's chat template (text); DataError naming the row."""
    conv: Conversation = record.conversation
    where = {"path": record.source, "line": record.line, "field": conv.key}
    if tokenizer is None:
        raise DataError(f"sample '{record.id}' is a conversation, rendered with a tokenizer's chat template, "
                        "and no tokenizer was given", **where)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"sample '{record.id}' is a conversation, rendered with the tokenizer's chat template, but the "
            f"tokenizer {type(tokenizer).__name__} ('{getattr(tokenizer, 'name_or_path', '')}') has none: use "
            "a model whose tokenizer has one (tokenizer_config.json 'chat_template' or chat_template.jinja), "
            "or give such a tokenizer with --tokenizer", **where)
    try:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - Jinja errors, raise_exception(), bad message structure
        raise DataError(f"the tokenizer's chat template cannot render the conversation of sample "
                        f"'{record.id}': {type(e).__name__}: {e}", **where) from None
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def render_prompt(record: Any, tokenizer: Any) -> str:
    """The prompt of a conversation record: its turns before the response, with the generation
    prompt of the chat template."""
    return render(record, tokenizer, record.conversation.messages, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# labels of the earlier assistant turns


def _divergence(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return f"they differ at character {n}: {a[max(0, n - 30):n + 30]!r} vs {b[max(0, n - 30):n + 30]!r}"


def context_labels(record: Any, tokenizer: Any, prompt_text: str, prompt_ids: list[int],
                   encode: Callable[[str], list[int]]) -> list[int]:
    """Labels for the prompt tokens of a conversation record: the tokens of every trained earlier
    assistant turn's content, and the EOS token when the template puts it right after the content,
    are targets; everything else (system, user and tool turns, template scaffolding) is -100.

    Each assistant turn is located by rendering the conversation prefix by prefix: the turns up to
    and including it must render to a prefix of ``prompt_text``, the generation prompt before it to
    a prefix of that, and its content must appear verbatim (or stripped) after the generation
    prompt. ``encode`` (text -> ids, as ``prompt_ids`` was made) must give a prefix of
    ``prompt_ids`` at the start and at the end of the content. Otherwise :class:`DataError`.
    """
    conv: Conversation = record.conversation
    labels = [IGNORE_INDEX] * len(prompt_ids)
    eos = getattr(tokenizer, "eos_token_id", None)

    def fail(index: int, message: str, sub: str = "") -> DataError:
        return DataError(f"sample '{record.id}': {message}", path=record.source, line=record.line,
                         field=conv.path(index) + sub)

    def boundary(index: int, char: int, what: str) -> int:
        ids = encode(prompt_text[:char])
        if prompt_ids[:len(ids)] != ids:
            raise fail(index, f"the tokens do not split at the {what} of this assistant turn's content: "
                              "tokenising the rendered conversation up to there is not a prefix of tokenising "
                              "the whole prompt (the tokenizer merges the characters "
                              f"{prompt_text[max(0, char - 12):char]!r} | {prompt_text[char:char + 12]!r}), so "
                              "the trained tokens cannot be separated from the template's", ".content")
        return len(ids)

    messages = list(conv.messages)
    for a in conv.trained:
        content = messages[a]["content"]
        if not content.strip():
            continue  # nothing to train
        upto = render(record, tokenizer, messages[:a + 1], add_generation_prompt=False)
        if not prompt_text.startswith(upto):
            raise fail(a, "the chat template does not render the conversation prefix by prefix: the turns up to "
                          "this assistant turn do not render to a prefix of the whole prompt, so the turn's "
                          f"tokens cannot be located ({_divergence(upto, prompt_text)})")
        before = render(record, tokenizer, messages[:a], add_generation_prompt=True) if a else ""
        if not upto.startswith(before):
            raise fail(a, "the chat template does not render the conversation prefix by prefix: its generation "
                          "prompt after the turns before this assistant turn is not a prefix of the rendered "
                          f"turn ({_divergence(before, upto)})")
        turn = upto[len(before):]
        text = content
        pos = turn.find(text)
        if pos < 0:
            text = content.strip()
            pos = turn.find(text)
        if pos < 0:
            raise fail(a, "the chat template does not render this assistant turn's content verbatim, so its "
                          "tokens cannot be located", ".content")
        start = boundary(a, len(before) + pos, "start")
        end = boundary(a, len(before) + pos + len(text), "end")
        labels[start:end] = prompt_ids[start:end]
        if eos is not None and end < len(prompt_ids) and prompt_ids[end] == eos:
            labels[end] = eos  # the end of the turn, as the response's appended EOS
    return labels


__all__ = [
    "COMPLETION_KEY",
    "MESSAGES_KEY",
    "ROLES",
    "Conversation",
    "completion_as_output",
    "context_labels",
    "parse_conversation",
    "render",
    "render_prompt",
    "row_kind",
]
