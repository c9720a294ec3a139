"""Prompt rendering.

``get_template(spec)`` gives a :class:`PromptTemplate` whose ``render(record)`` returns the prompt
text. Specs: ``"alpaca"`` (default; the MiniLLM/DistiLLM/POCL template, exactly), ``"chat"`` (the
tokenizer's chat template), ``"plain"``, a template string with ``{instruction}`` (and optionally
``{input}``) placeholders, or a path to a ``.txt`` / ``.yaml`` template file.

Ready-made prompts: a record's ``prompt`` field is used as is when ``use_prompt_field`` is true.
By default (``use_prompt_field=None``) that is so for the Alpaca template only -- the ``prompt``
of the instruction data *is* the Alpaca rendering -- while an explicitly chosen other template is
applied to every record (otherwise the data's Alpaca prompts would silently override it).

Special tokens: ``template.add_special_tokens(record)`` tells the tokenizer step whether to let
the tokenizer add its special tokens (BOS ...) to the rendered prompt. Chat templates already
contain them (``template_adds_special_tokens = True``), so they must not be added twice.

Conversation records (``record.conversation``, :mod:`pocl.data.chat`) are always rendered with the
tokenizer's chat template, whatever the template: their turns before the final assistant turn,
with the generation prompt. The template then needs the tokenizer (``get_template(...,
tokenizer=...)`` gives it to every template).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

from pocl.errors import ConfigError, DataError
from pocl.registry import Registry

from .chat import render_prompt
from .records import Record

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

PLACEHOLDERS = frozenset({"instruction", "input"})
_TEMPLATE_FILE_SUFFIXES = (".txt", ".yaml", ".yml")
_YAML_KEYS = ("with_input", "no_input", "template")


def _has_input(record: Record) -> bool:
    # as the reference pipeline (MiniLLM's process_data): an input counts when non-empty
    return record.input != ""


def _user_text(record: Record) -> str:
    """Instruction, then a blank line and the input when there is one."""
    if _has_input(record):
        return f"{record.instruction}\n\n{record.input}"
    return record.instruction


class PromptTemplate:
    """Base class: renders a record into prompt text.

    Subclasses implement :meth:`_render`. ``use_prompt_field``: use a record's ready-made
    ``prompt`` as is. ``template_adds_special_tokens``: the rendered text already contains the
    tokenizer's special tokens (chat templates).
    """

    name = "template"
    template_adds_special_tokens = False
    #: the tokenizer whose chat template renders conversation records (None: none given)
    tokenizer: Any = None

    def __init__(self, *, use_prompt_field: bool = False):
        self.use_prompt_field = use_prompt_field

    def uses_prompt_field(self, record: Record) -> bool:
        return self.use_prompt_field and record.prompt is not None

    def render(self, record: Record) -> str:
        if record.conversation is not None:
            return render_prompt(record, self.tokenizer)
        if self.uses_prompt_field(record):
            return record.prompt  # type: ignore[return-value]
        if not record.instruction.strip():
            raise DataError("the row has no instruction, only a ready-made 'prompt', which "
                            f"the '{self.name}' template does not use (use_prompt_field=False)",
                            path=record.source, line=record.line, field="instruction")
        return self._render(record)

    def add_special_tokens(self, record: Record) -> bool:
        """Whether the tokenizer should add its special tokens to this record's prompt."""
        if record.conversation is not None:
            return False  # rendered by the chat template, which has them
        if self.uses_prompt_field(record):
            return True  # a data prompt is plain text
        return not self.template_adds_special_tokens

    def _render(self, record: Record) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, use_prompt_field={self.use_prompt_field})"


class FormatTemplate(PromptTemplate):
    """A ``str.format`` template with ``{instruction}`` / ``{input}`` placeholders and a variant
    for records without an input.

    When a template has no ``{input}`` placeholder, a record's input is appended to the
    instruction after a blank line (as the chat and plain templates do), never dropped.
    """

    def __init__(self, with_input: str, no_input: str, *, name: str = "custom",
                 use_prompt_field: bool = False):
        super().__init__(use_prompt_field=use_prompt_field)
        self.name = name
        self.with_input = with_input
        self.no_input = no_input
        self._with_fields = _validate_format(with_input, name=f"{name} (with input)")
        self._no_fields = _validate_format(no_input, name=f"{name} (no input)")

    def _render(self, record: Record) -> str:
        if _has_input(record):
            if "input" in self._with_fields:
                return self.with_input.format_map({"instruction": record.instruction,
                                                   "input": record.input})
            return self.with_input.format_map({"instruction": _user_text(record), "input": ""})
        return self.no_input.format_map({"instruction": record.instruction, "input": ""})


class AlpacaTemplate(FormatTemplate):
    def __init__(self, *, use_prompt_field: bool = True):
        super().__init__(ALPACA_WITH_INPUT, ALPACA_NO_INPUT, name="alpaca",
                         use_prompt_field=use_prompt_field)


class PlainTemplate(PromptTemplate):
    """The instruction, a blank line and the input if any, then a newline."""

    name = "plain"

    def _render(self, record: Record) -> str:
        return _user_text(record) + "\n"


class ChatTemplate(PromptTemplate):
    """The tokenizer's chat template with one user turn and the generation prompt."""

    name = "chat"
    template_adds_special_tokens = True

    def __init__(self, tokenizer: Any, *, use_prompt_field: bool = False):
        super().__init__(use_prompt_field=use_prompt_field)
        if tokenizer is None:
            raise ConfigError("template 'chat' needs a tokenizer (its chat template is used)")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"template 'chat': the tokenizer {type(tokenizer).__name__} "
                f"('{getattr(tokenizer, 'name_or_path', '')}') has no chat template; "
                "use template 'alpaca' or a custom template")
        self.tokenizer = tokenizer

    def _render(self, record: Record) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": _user_text(record)}], tokenize=False,
                add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a broken Jinja template is a config problem
            raise ConfigError(f"template 'chat': the tokenizer's chat template failed: "
                              f"{type(e).__name__}: {e}") from None
        if not isinstance(text, str):  # some versions return a list for batched input
            text = text[0]
        return text


def _validate_format(template: str, *, name: str) -> set[str]:
    """Check a ``str.format`` template; return its placeholder names."""
    if not isinstance(template, str):
        raise ConfigError(f"template {name}: must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"template {name}: malformed braces ({e}); write a literal brace as "
                          "'{{' or '}}'") from None
    fields: set[str] = set()
    unknown: list[str] = []
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS or spec or conversion:
            shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (
                f":{spec}" if spec else "") + "}"
            unknown.append(shown)
        else:
            fields.add(field_name)
    if unknown:
        raise ConfigError(f"template {name}: unknown placeholder(s) {', '.join(unknown)}; "
                          "only {instruction} and {input} are allowed (write a literal brace "
                          "as '{{' or '}}')")
    if "instruction" not in fields:
        raise ConfigError(f"template {name}: must contain the placeholder {{instruction}}")
    return fields


def _load_template_file(path: Path, use_prompt_field: bool) -> FormatTemplate:
    if not path.is_file():
        raise ConfigError(f"template file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read template file '{path}': {e}") from None
    name = str(path)
    if path.suffix.lower() == ".txt":
        return FormatTemplate(text, text, name=name, use_prompt_field=use_prompt_field)
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"template file '{path}' is not valid YAML: {e}") from None
    if isinstance(data, str):
        return FormatTemplate(data, data, name=name, use_prompt_field=use_prompt_field)
    if not isinstance(data, dict):
        raise ConfigError(f"template file '{path}': expected a mapping with keys "
                          f"{', '.join(_YAML_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in _YAML_KEYS)
    if unknown:
        raise ConfigError(f"template file '{path}': unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(_YAML_KEYS)}")
    single = data.get("template")
    with_input = data.get("with_input", single)
    no_input = data.get("no_input", single)
    if with_input is None or no_input is None:
        raise ConfigError(f"template file '{path}': give both 'with_input' and 'no_input' "
                          "(or one 'template')")
    template = FormatTemplate(with_input, no_input, name=name, use_prompt_field=use_prompt_field)
    if "with_input" in data and "input" not in template._with_fields:
        raise ConfigError(f"template file '{path}': 'with_input' must contain {{input}}")
    return template


TEMPLATES: Registry = Registry("prompt template")
TEMPLATES.register("alpaca", AlpacaTemplate)
TEMPLATES.register("chat", ChatTemplate)
TEMPLATES.register("plain", PlainTemplate)


def get_template(spec: str | os.PathLike | PromptTemplate | None = "alpaca", tokenizer: Any = None,
                 use_prompt_field: bool | None = None) -> PromptTemplate:
    """Make a prompt template from a name, a template string or a template file.

    ``use_prompt_field=None`` means: True for ``"alpaca"``, False otherwise (see the module doc).
    ``tokenizer`` is also the one that renders conversation records, with any template (a given
    :class:`PromptTemplate` is returned as is).
    """
    if isinstance(spec, PromptTemplate):
        return spec
    template = _make_template(spec, tokenizer, use_prompt_field)
    template.tokenizer = tokenizer
    return template


def _make_template(spec: str | os.PathLike | None, tokenizer: Any,
                   use_prompt_field: bool | None) -> PromptTemplate:
    if spec is None:
        spec = "alpaca"
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"template must be a name, a template string or a path, got "
                          f"{type(spec).__name__}")
    key = spec.strip().lower()
    if key in TEMPLATES:
        canonical = TEMPLATES.canonical(key)
        upf = (canonical == "alpaca") if use_prompt_field is None else bool(use_prompt_field)
        if canonical == "alpaca":
            return AlpacaTemplate(use_prompt_field=upf)
        if canonical == "chat":
            return ChatTemplate(tokenizer, use_prompt_field=upf)
        return PlainTemplate(use_prompt_field=upf)
    upf = bool(use_prompt_field)
    if "{" in spec:
        return FormatTemplate(spec, spec, name="custom", use_prompt_field=upf)
    if key.endswith(_TEMPLATE_FILE_SUFFIXES):
        return _load_template_file(Path(spec).expanduser(), upf)
    TEMPLATES.canonical(key)  # raises UnknownNameError with suggestions
    raise AssertionError("unreachable")
