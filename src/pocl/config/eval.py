"""The configuration of ``pocl eval`` (YAML section ``eval:``).

Defaults follow the evaluation protocol of the POCL spec (section 5): sampling at T = 1, top-p 1,
no top-k, ``no_repeat_ngram_size=6``, at most 256 new tokens, seeds 10 20 30 40 50, Alpaca
prompts, exact match after SQuAD answer normalisation. Every field is also a flag of ``pocl eval``
(``--max-new-tokens`` ...); ``models`` and ``data`` are the repeatable ``--model`` and ``--data``
flags and ``seeds`` is ``--seeds 10 20 30``.

YAML example::

    eval:
      models: [teacher=runs/teacher/final, pocl=runs/fkl-pocl/final]
      data: [../shared/data/eval/dolly.jsonl, sinst=../shared/data/eval/self_inst.jsonl]
      seeds: [10, 20, 30]
      output_dir: runs/eval
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pocl.config.schema import ConfigSection, load_yaml, option
from pocl.errors import ConfigError

DEFAULT_SEEDS = (10, 20, 30, 40, 50)


@dataclasses.dataclass
class EvalConfig(ConfigSection):
    """Models, evaluation sets, decoding and outputs of `pocl eval`."""

    section_name = "eval"

    models: list[str] = option(default_factory=list, help="Models to evaluate, each [NAME=]PATH: a Hugging Face "
                               "model folder (e.g. RUN/final written by pocl distill), a hub name or a .gguf file. "
                               "Default NAME: the folder name (RUN/final for a run's final or best folder).",
                               cli=False)
    data: list[str] = option(default_factory=list, help="Evaluation sets, each [NAME=]PATH (.jsonl/.json; formats: "
                             "docs/evaluation.md). Default NAME: the file name without its suffix.", cli=False)
    output_dir: str = option("runs/eval", "Folder for generations.jsonl, results.json and results.md.",
                             metavar="PATH")
    seeds: list[int] = option(default_factory=lambda: list(DEFAULT_SEEDS), help="Sampling seeds; every set is "
                              "generated once per seed and the score is the mean over seeds.", cli=False)
    greedy: bool = option(False, "Greedy decoding in one pass (the first seed only) instead of sampling.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling threshold (1: off).")
    top_k: int = option(0, "Top-k sampling (0: off).")
    no_repeat_ngram_size: int = option(6, "Never repeat an n-gram of this size (prompt included, as in "
                                       "transformers' generate); 0: off.")
    max_new_tokens: int = option(256, "Maximum new tokens of a generation. Prompt + new tokens must fit the "
                                     "models' context; a default that does not is clipped, with a warning.")
    batch_size: int = option(32, "Prompts per generation batch (prompts are grouped by length, left-padded).")
    max_prompt_length: int = option(256, "Maximum prompt tokens; longer prompts keep their end (the response cue).")
    template: str = option("alpaca", "Prompt template: alpaca, chat, plain, a string with {instruction} and "
                           "{input}, or a .txt/.yaml file.")
    use_prompt_field: bool | None = option(None, "Use a row's ready-made 'prompt' field when it has one (default: "
                                           "yes with the alpaca template, no with the others; as in training).")
    max_samples: int | None = option(None, "Evaluate only the first N samples of each set.")
    ranking: list[str] = option(default_factory=list, help="Difficulty rankings of the evaluated sets, each "
                                "[SET=]FILE: a ranking.jsonl written by `pocl rank` on that evaluation set (SET may "
                                "be left out when there is one set). Adds scores per difficulty bucket. Every "
                                "evaluated sample must be in the ranking with the same sample hash (checked before "
                                "generating).", cli=False)
    num_buckets: int = option(4, "Number of difficulty buckets of the breakdown (4: quartiles of rank).")
    std: Literal["sample", "population"] = option(
        "sample", "Standard deviation over seeds: sample (divides by n - 1) or population (divides by n).")
    em_normalization: Literal["squad", "whitespace"] = option(
        "squad", "Text normalisation before exact match. squad (the papers' protocol): SQuAD v1.1 normalize_answer "
        "(lowercase, drop punctuation and the articles a/an/the, collapse whitespace); whitespace: only collapse "
        "whitespace (case, punctuation and articles count).")
    tokenizer: str | None = option(None, "Tokenizer for every model (default: each model's own).", metavar="PATH")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Model weight dtype. auto: float32 on CPU, bfloat16 on a GPU that supports it, else float16.")
    cpu: bool = option(False, "Run on the CPU even when a GPU is present.")
    local_files_only: bool = option(False, "Never contact the hub (also on when HF_HUB_OFFLINE=1).")
    trust_remote_code: bool = option(False, "Allow model code from the model folder (only for models you trust).")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self._check_literal("dtype")
        self._check_literal("std")
        self._check_literal("em_normalization")
        self.models = list(self.models)
        self.data = list(self.data)
        self.ranking = list(self.ranking)
        self.seeds = [int(s) for s in self.seeds]
        self._check(len(self.seeds) > 0, "seeds", "give at least one seed")
        self._check(len(set(self.seeds)) == len(self.seeds), "seeds", "seeds must be distinct")
        self._check(all(s >= 0 for s in self.seeds), "seeds", "seeds must be >= 0")
        self._check(self.temperature > 0, "temperature", "must be > 0 (use --greedy for greedy decoding)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.top_k >= 0, "top_k", "must be >= 0")
        self._check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0")
        self._check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        self._check(self.batch_size > 0, "batch_size", "must be > 0")
        self._check(self.max_prompt_length > 0, "max_prompt_length", "must be > 0")
        self._check(self.max_samples is None or self.max_samples > 0, "max_samples", "must be > 0")
        self._check(self.num_buckets >= 1, "num_buckets", "must be >= 1")
        for name in ("models", "data", "ranking"):
            for spec in getattr(self, name):
                self._check(isinstance(spec, str) and spec.strip() != "", name, "entries must be non-empty strings")

    # -- derived settings -----------------------------------------------------------------------
    @property
    def eval_seeds(self) -> list[int]:
        """The seeds actually run: all of them, or the first one with --greedy."""
        return self.seeds[:1] if self.greedy else list(self.seeds)

    def decoding(self):
        """The :class:`pocl.generation.DecodingConfig` of these settings."""
        from pocl.generation import DecodingConfig

        if self.greedy:
            return DecodingConfig.greedy(no_repeat_ngram_size=self.no_repeat_ngram_size,
                                         max_new_tokens=self.max_new_tokens)
        return DecodingConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              no_repeat_ngram_size=self.no_repeat_ngram_size, max_new_tokens=self.max_new_tokens)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "EvalConfig":
        """The ``eval:`` section of a YAML file, with ``overrides`` (flags) on top.

        Other top-level sections (a distillation config's ``model:``, ``data:`` ...) are ignored, so
        one file can hold both; a file without an ``eval:`` section is an error.
        """
        values = load_yaml(path)
        if "eval" not in values:
            raise ConfigError(f"{path}: no 'eval:' section (top-level keys: {', '.join(map(str, values)) or 'none'})")
        section = values["eval"] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: the 'eval:' section must be a mapping, got {type(section).__name__}")
        merged = dict(section)
        merged.update(overrides or {})
        return cls.from_dict(merged)  # type: ignore[return-value]


def split_named_spec(spec: str, *, kind: str) -> tuple[str | None, str]:
    """``"NAME=PATH"`` -> (NAME, PATH); ``"PATH"`` -> (None, PATH).

    A spec that exists as a path is never split (a path may contain ``=``); a name may not contain
    ``/`` or ``\\``.
    """
    spec = spec.strip()
    if "=" in spec and not Path(spec).expanduser().exists():
        name, path = spec.split("=", 1)
        if name and "/" not in name and "\\" not in name:
            if not path.strip():
                raise ConfigError(f"{kind} '{spec}': empty path after '{name}='")
            return name.strip(), path.strip()
    return None, spec


def default_model_name(path: str) -> str:
    """A readable name for a model path: the file stem of a .gguf, ``RUN/final`` for a run's
    ``final``/``best``/``step-N`` folder, else the last path component (or the hub name)."""
    p = Path(path.rstrip("/\\")).expanduser()
    if p.suffix == ".gguf":
        return p.stem
    last = p.name or str(p)
    if (last in ("final", "best") or last.startswith(("step-", "checkpoint"))) and p.parent.name:
        parent = p.parent
        if parent.name == "checkpoints" and parent.parent.name:
            return f"{parent.parent.name}/{last}"
        return f"{parent.name}/{last}"
    return last


def default_set_name(path: str) -> str:
    p = Path(path.rstrip("/\\"))
    name = p.name
    for suffix in (".jsonl", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def named_specs(specs: list[str], *, kind: str, default_name) -> list[tuple[str, str]]:
    """Parse ``[NAME=]PATH`` specs; names must be unique (a clash asks for explicit names)."""
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for spec in specs:
        name, path = split_named_spec(spec, kind=kind)
        name = name or default_name(path)
        if name in seen:
            raise ConfigError(f"two {kind}s are both named '{name}' ({seen[name]} and {path}); name them "
                              f"explicitly: --{kind} NAME={path}")
        seen[name] = path
        out.append((name, path))
    return out
