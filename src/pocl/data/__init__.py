"""Instruction and conversation data: loading rows into records, prompt templates (and chat
templates for conversations), tokenisation with prompt masking, and the built-in synthetic task
suite. See ``docs/data.md``."""

from .builtin import (
    TEMPLATE_PHRASES,
    build_suite_tokenizer,
    build_tokenizer,
    generate_suite,
    suite_texts,
    write_suite,
)
from .chat import Conversation
from .records import LoadResult, Record, SkippedRow, id_sort_key, load_records
from .templates import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    TEMPLATES,
    AlpacaTemplate,
    ChatTemplate,
    FormatTemplate,
    PlainTemplate,
    PromptTemplate,
    get_template,
)
from .tokenization import (
    IGNORE_INDEX,
    TokenizationStats,
    TokenizedDataset,
    TokenizedSample,
    collate,
    count_target_tokens,
    group_by_length,
    tokenize_prompts,
    tokenize_records,
)

__all__ = [
    "ALPACA_NO_INPUT",
    "ALPACA_WITH_INPUT",
    "IGNORE_INDEX",
    "TEMPLATES",
    "TEMPLATE_PHRASES",
    "AlpacaTemplate",
    "ChatTemplate",
    "Conversation",
    "FormatTemplate",
    "LoadResult",
    "PlainTemplate",
    "PromptTemplate",
    "Record",
    "SkippedRow",
    "TokenizationStats",
    "TokenizedDataset",
    "TokenizedSample",
    "build_suite_tokenizer",
    "build_tokenizer",
    "collate",
    "count_target_tokens",
    "generate_suite",
    "get_template",
    "group_by_length",
    "id_sort_key",
    "load_records",
    "suite_texts",
    "tokenize_prompts",
    "tokenize_records",
    "write_suite",
]
