"""Lengths checked against the model's context: one clear error, or defaults clipped with one warning.

A model has a fixed number of positions (``max_position_embeddings`` in its config.json, ``n_positions``
for GPT-2, ...). A training sequence longer than that, or a prompt plus its generated tokens longer
than that, fails deep inside the model (an ``IndexError`` in a learned position table) or runs past
what the model was trained on without a word (rotary positions). pocl checks every length against
the context before any work:

* **Training sequences** (``pocl distill``, the loss pass of ``pocl rank``, the dev set):
  ``data.max_length`` must be at most the context. For distillation the context is the smaller of
  the teacher's and the student's (the teacher scores the same sequences).
* **Generation** (``pocl eval``, the ranking's answers, dev ROUGE-L, on-policy samples, SeqKD answers):
  the longest prompt (``max_prompt_length``) plus ``max_new_tokens`` must fit the context.

The rule (:func:`fit_training`, :func:`fit_generation`):

* a value the user **gave** (a flag or a YAML key) that cannot fit is refused: one-line
  :class:`~pocl.errors.ConfigError` (exit status 2) naming the flag, the value, the model and its
  context, and what would fit; nothing is loaded or written;
* a value left at its **default** that does not fit is clipped, and one warning per command lists
  every clipped setting (old -> new) and the flags that set them. The clipped values are the ones
  used and recorded (the run's config.yaml and summary.json, results.json, the ranking's metadata).

Clipping, with a context of C positions:

* ``max_length`` (default) -> C; a default ``max_prompt_length`` then keeps the defaults' split
  (half of the sequence): min(256, C // 2).
* Training generation (ranking, dev ROUGE-L, on-policy, SeqKD): the prompt length is a training
  setting and is never lowered to make room for generated tokens; a default ``max_new_tokens``
  becomes ``C - max_prompt_length`` (>= 1, since max_prompt_length < max_length <= C), a given one
  that does not fit is refused.
* ``pocl eval`` (the prompt length only serves generation): a given ``--max-new-tokens`` N < C keeps
  N and a default ``--max-prompt-length`` becomes min(256, C - N); a given ``--max-prompt-length`` P < C
  keeps P and a default ``--max-new-tokens`` becomes C - P; both defaults: the prompt gets
  min(256, C // 2) and the answer min(256, C - prompt). A given value >= C, or two given values
  whose sum exceeds C, are refused. Every rule leaves a prompt of >= 1 token and >= 1 new token.

A model whose config names no context length (:func:`context_length` is None) is not checked.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from pocl.errors import ConfigError

log = logging.getLogger("pocl")

#: Config fields that hold the number of positions, in order of preference (the first one set wins).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len",
                  "max_seq_length", "seq_length", "n_ctx")


# ------------------------------------------------------------------------------------------ lookup
def context_field(config: Any) -> tuple[int, str] | None:
    """``(positions, field)`` of a model config (a ``PretrainedConfig``, a model or a mapping), or None
    when no field of :data:`CONTEXT_FIELDS` holds a positive whole number. A multimodal config's
    ``text_config`` is looked at when the config itself names no length."""
    if config is None:
        return None
    if not isinstance(config, dict) and hasattr(config, "config") and not hasattr(config, "to_dict"):
        config = config.config  # a model: its config
    if isinstance(config, dict):
        get = config.get
    else:
        def get(name, default=None):
            try:
                return getattr(config, name, default)
            except Exception:  # noqa: BLE001 - a config property that cannot be computed: not set
                return default
    aliases = {} if isinstance(config, dict) else (getattr(config, "attribute_map", None) or {})
    for name in CONTEXT_FIELDS:
        value = get(name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, aliases.get(name, name)  # GPT-2: max_position_embeddings is n_positions
    text = get("text_config", None)
    if text is not None and text is not config:
        return context_field(text)
    return None


def context_length(config: Any) -> int | None:
    """The number of positions of a model (or its config), or None when its config names none (then
    no length is checked)."""
    found = context_field(config)
    return None if found is None else found[0]


@dataclasses.dataclass(frozen=True)
class Context:
    """A model's context: ``length`` positions, read from ``field`` of the config of ``model`` (a
    phrase naming it in messages: "the student '/path'")."""

    length: int
    model: str
    field: str = "max_position_embeddings"

    def describe(self) -> str:
        return f"{self.model} ({self.length} positions: {self.field} in its config)"

    def to_dict(self) -> dict[str, Any]:
        return {"length": self.length, "model": self.model, "field": self.field}


def context_of(config: Any, model: str) -> Context | None:
    """The :class:`Context` of a loaded model (or a config), or None when unknown."""
    found = context_field(config)
    return None if found is None else Context(found[0], model, found[1])


def read_context(spec: str | None, model: str, *, local_files_only: bool = False,
                 trust_remote_code: bool = False) -> Context | None:
    """The context of the model ``spec`` (a folder, hub name or .gguf file), read from its config
    without loading its weights; None when the config cannot be read (the model's own loading then
    reports why) or names no length."""
    if spec is None:
        return None
    try:
        from transformers import AutoConfig

        from pocl.model_checks import split_model_spec
        from pocl.models import offline_mode

        path, gguf_file = split_model_spec(spec, what="model")
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                                  "local_files_only": local_files_only or offline_mode()}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - checked again once the model is loaded
        log.debug("context length of %s not read from its config: %s", spec, exc)
        return None
    return context_of(config, model)


def smallest(contexts: Sequence[Context | None]) -> Context | None:
    """The smallest known context (the first of equals), or None when none is known."""
    known = [c for c in contexts if c is not None]
    return min(known, key=lambda c: c.length) if known else None


# ------------------------------------------------------------------------------------------ the rule
@dataclasses.dataclass(frozen=True)
class Length:
    """One length setting: ``key`` (``data.max_length``), ``flag`` (``--max-length``), its value and
    whether the user gave it (flag or YAML) rather than leaving the default."""

    key: str
    flag: str
    value: int
    given: bool

    @property
    def said(self) -> str:
        return f"{self.flag} {self.value}"


@dataclasses.dataclass
class Fit:
    """The outcome of a check: the effective value of every setting, and which defaults were clipped."""

    context: Context
    values: dict[str, int]
    clipped: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    flags: dict[str, str] = dataclasses.field(default_factory=dict)

    def set(self, length: Length, value: int) -> None:
        self.values[length.key] = value
        if value != length.value:
            self.clipped[length.key] = (length.value, value)
        else:
            self.clipped.pop(length.key, None)

    def warning(self) -> str | None:
        """The one warning line of the clipped defaults, or None when nothing was clipped."""
        if not self.clipped:
            return None
        changes = ", ".join(f"{self.flags[k]} {old} -> {new}" for k, (old, new) in self.clipped.items())
        keys = ", ".join(self.clipped)
        return (f"the context of {self.context.describe()} is shorter than the default lengths; clipped "
                f"to fit: {changes} "
                f"(set them with these flags or the YAML keys {keys}; a given value that does not fit is refused)")

    def record(self) -> dict[str, Any]:
        """For summary.json / results.json: the context and the clipped settings ``{key: [default, used]}``."""
        return {**self.context.to_dict(), "clipped": {k: list(v) for k, v in self.clipped.items()}}

    def log_warning(self) -> None:
        text = self.warning()
        if text is not None:
            log.warning("%s", text)


def _too_long(length: Length, context: Context, detail: str, fix: str) -> ConfigError:
    return ConfigError(f"{length.key}: {length.said} does not fit the context of {context.describe()}{detail}; {fix}")


def _check_context(context: Context) -> None:
    if context.length < 2:
        raise ConfigError(f"the context of {context.describe()} is too short for a prompt and one more token")


def fit_training(context: Context, max_length: Length, max_prompt_length: Length,
                 generations: Sequence[Length] = ()) -> Fit:
    """Training sequences (``max_length``, ``max_prompt_length``) and the generations made from
    training prompts (each ``max_new_tokens`` setting in ``generations``) against ``context``; see the
    module docstring for the rule. Raises ConfigError for a given value that does not fit."""
    _check_context(context)
    c = context.length
    fit = Fit(context, {}, flags={x.key: x.flag for x in (max_length, max_prompt_length, *generations)})
    length = max_length.value
    if length > c:
        if max_length.given:
            raise _too_long(max_length, context, "", f"give {max_length.flag} {c} or less")
        length = c
    fit.set(max_length, length)
    prompt = max_prompt_length.value
    if length != max_length.value and not max_prompt_length.given:
        prompt = min(prompt, max(1, length // 2))  # the defaults' split: half prompt, half response
    if prompt >= length:  # given (a default was just clipped below the sequence)
        raise _too_long(max_prompt_length, context, f": prompts must be shorter than sequences ({max_length.flag} "
                        f"{length}{'' if max_length.given else ', clipped to the context'})",
                        f"give {max_prompt_length.flag} {length - 1} or less")
    fit.set(max_prompt_length, prompt)
    for gen in generations:
        room = c - prompt
        new = gen.value
        if new > room:
            if gen.given:
                raise _too_long(gen, context, f" after prompts of up to {prompt} tokens ({max_prompt_length.flag} "
                                f"{prompt}): at most {room} new tokens fit",
                                f"give {gen.flag} {room} or less, or a smaller {max_prompt_length.flag}")
            new = room
        fit.set(gen, new)
    return fit


def fit_generation(context: Context, max_prompt_length: Length, max_new_tokens: Length) -> Fit:
    """A prompt of up to ``max_prompt_length`` tokens plus ``max_new_tokens`` generated tokens against
    ``context`` (``pocl eval``); see the module docstring for the rule. Raises ConfigError for given
    values that cannot fit."""
    _check_context(context)
    c = context.length
    fit = Fit(context, {}, flags={x.key: x.flag for x in (max_prompt_length, max_new_tokens)})
    prompt, new = max_prompt_length.value, max_new_tokens.value
    for length in (max_new_tokens, max_prompt_length):
        if length.given and length.value >= c:
            other = max_prompt_length if length is max_new_tokens else max_new_tokens
            raise _too_long(length, context, f": at most {c - 1} fit, leaving one token for the "
                            f"{'prompt' if length is max_new_tokens else 'answer'}",
                            f"give {length.flag} {c - 1} or less (and {other.flag} to share the {c} positions)")
    if prompt + new > c:
        if max_prompt_length.given and max_new_tokens.given:
            raise _too_long(max_new_tokens, context, f" after prompts of up to {prompt} tokens "
                            f"({max_prompt_length.said}): {prompt} + {new} > {c}",
                            f"give {max_new_tokens.flag} {c - prompt} or less, or a smaller {max_prompt_length.flag}")
        if max_new_tokens.given:
            prompt = c - new
        elif max_prompt_length.given:
            new = c - prompt
        else:
            prompt = min(prompt, max(1, c // 2))
            new = min(new, c - prompt)
    fit.set(max_prompt_length, prompt)
    fit.set(max_new_tokens, new)
    return fit


# ------------------------------------------------------------------------------------------ configs
def flag_of(section: Any, name: str) -> str:
    """The command-line flag of a config field (``--max-length``)."""
    for f in dataclasses.fields(section):
        if f.name == name:
            return f.metadata.get("flag") or "--" + name.replace("_", "-")
    raise KeyError(name)


def length_of(section: Any, name: str) -> Length:
    """The :class:`Length` of field ``name`` of a config section (key, flag, value, given)."""
    return Length(f"{section.section_name}.{name}", flag_of(section, name), int(getattr(section, name)),
                  name in section.given_fields())


def replace_keeping_given(section: Any, **changes: Any) -> Any:
    """A copy of a config section with ``changes``, validated, whose given fields stay those of
    ``section`` (a clipped default stays a default: it is clipped again, or not, by the next model)."""
    given = section.given_fields()
    new = dataclasses.replace(section, **changes)
    new._set_given(given)
    return new


# ------------------------------------------------------------------------------------------ distill, rank
def on_policy_used(config: Any, stages: Sequence[Any] | None = None) -> bool:
    """Whether a run may take on-policy steps (the student generates): method kd with a positive
    on-policy fraction anywhere (the loss config, the curriculum's start/end or per-stage values, or
    ``stages`` given to :func:`pocl.pipeline.distill`)."""
    lc, cc = config.loss, config.curriculum
    if not lc.distills:
        return False
    fractions: list[Any] = [lc.on_policy_fraction]
    if cc.curriculum == "pocl":
        fractions += [cc.on_policy_fraction_start, cc.on_policy_fraction_end]
        fractions += [st.get("on_policy_fraction") for st in cc.stages if isinstance(st, dict)]
    fractions += [getattr(st, "on_policy_fraction", None) for st in stages or ()]
    return any(isinstance(x, (int, float)) and x > 0 for x in fractions)


def run_generations(config: Any, *, stages: Sequence[Any] | None = None, ranking: bool = False) -> list[Length]:
    """The ``max_new_tokens`` settings of a distillation run that generate from training prompts: the
    ranking's answers (``--curriculum pocl``, or ``ranking``: `pocl rank`), dev ROUGE-L (a dev set and a
    selection metric or --dev-rouge-samples that needs it), on-policy samples, SeqKD answers. Settings a
    run does not use are not checked (nor clipped)."""
    dc, lc, tc, cc = config.data, config.loss, config.train, config.curriculum
    out = []
    if ranking or cc.curriculum == "pocl":
        out.append(length_of(cc, "rank_max_new_tokens"))
    if dc.dev_file is not None and (tc.dev_rouge_samples > 0 or tc.selection_metric == "dev_rouge_l"):
        out.append(length_of(tc, "dev_rouge_max_new_tokens"))
    if on_policy_used(config, stages):
        out.append(length_of(lc, "on_policy_max_new_tokens"))
    if lc.method == "seqkd":
        out.append(length_of(lc, "seqkd_max_new_tokens"))
    return out


def fit_distill_config(config: Any, context: Context | None, *, stages: Sequence[Any] | None = None,
                       ranking: bool = False, warn: bool = True) -> Fit | None:
    """Check the lengths of a :class:`pocl.config.DistillConfig` against ``context`` and put the
    effective values into ``config`` **in place** (its sections are replaced by validated copies whose
    given fields stay the same); the clipped defaults are logged in one warning (``warn``). Returns the
    :class:`Fit` (None when the context is unknown). Idempotent: a fitted config is left as it is."""
    if context is None:
        return None
    dc = config.data
    gens = run_generations(config, stages=stages, ranking=ranking)
    fit = fit_training(context, length_of(dc, "max_length"), length_of(dc, "max_prompt_length"), gens)
    if fit.clipped:
        for section_name in ("data", "loss", "train", "curriculum"):
            section = getattr(config, section_name)
            changes = {key.split(".", 1)[1]: new for key, (_, new) in fit.clipped.items()
                       if key.split(".", 1)[0] == section_name}
            if changes:
                setattr(config, section_name, replace_keeping_given(section, **changes))
        if warn:
            fit.log_warning()
    return fit


def fit_ranking_curriculum(curriculum: Any, model: Any, data_settings: dict[str, Any]) -> Any:
    """The curriculum config whose ``rank_max_new_tokens`` fits the student's context next to prompts of
    ``data_settings["max_prompt_length"]`` tokens (a copy when a default was clipped, with one warning;
    ConfigError for a given value that does not fit). ``model`` is the student, or a function that
    loads it (then nothing is checked here)."""
    if callable(model) and not hasattr(model, "config"):
        return curriculum
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    context = context_of(model, f"the student '{name}'" if name else "the student")
    if context is None or not hasattr(curriculum, "rank_max_new_tokens"):
        return curriculum
    try:
        max_length = int(data_settings["max_length"])
        prompt = int(data_settings["max_prompt_length"])
    except (KeyError, TypeError, ValueError):
        return curriculum  # incomplete settings: refused by the ranking itself, with their names
    if max_length > context.length or prompt >= max_length:
        return curriculum  # the loss pass's lengths are the data settings' business (checked by load_models)
    gen = length_of(curriculum, "rank_max_new_tokens")
    fit = fit_training(context, Length("data.max_length", "--max-length", max_length, True),
                       Length("data.max_prompt_length", "--max-prompt-length", prompt, True), [gen])
    if not fit.clipped:
        return curriculum
    fit.log_warning()
    return replace_keeping_given(curriculum, rank_max_new_tokens=fit.values[gen.key])


# ------------------------------------------------------------------------------------------ eval
def fit_eval_config(config: Any, context: Context | None) -> tuple[Any, Fit | None]:
    """``(config, fit)``: the :class:`pocl.config.EvalConfig` whose ``max_prompt_length`` and
    ``max_new_tokens`` fit ``context`` (a copy when defaults were clipped, with one warning; ConfigError
    for given values that cannot fit), and the :class:`Fit` (None when the context is unknown)."""
    if context is None:
        return config, None
    fit = fit_generation(context, length_of(config, "max_prompt_length"), length_of(config, "max_new_tokens"))
    if fit.clipped:
        fit.log_warning()
        config = replace_keeping_given(config, max_prompt_length=fit.values["eval.max_prompt_length"],
                                       max_new_tokens=fit.values["eval.max_new_tokens"])
    return config, fit
