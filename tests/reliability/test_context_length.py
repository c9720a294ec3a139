"""Lengths against the model's context (pocl.context_length): a given length that cannot fit is one clear
error line (exit 2, nothing written); a default that does not fit is clipped, said in one warning, and
the clipped value is what runs and what is recorded. The models here have 64 positions and learned
position embeddings (GPT-2), where running past the context is an IndexError inside the model."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from pocl.config import DistillConfig
from pocl.context_length import (
    Context,
    Length,
    context_field,
    context_length,
    fit_distill_config,
    fit_eval_config,
    fit_generation,
    fit_ranking_curriculum,
    fit_training,
    on_policy_used,
    read_context,
)
from pocl.errors import ConfigError
from pocl.config.eval import EvalConfig
from tests.reliability.helpers import run_cli, snapshot

WARNING = "is shorter than the default lengths"
#: Flags of the tiny runs without the length flags (tests/reliability/helpers.TINY_FLAGS minus those).
FLAGS = ["--batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-4", "--alpha", "0.5",
         "--seed", "3", "--no-progress", "--no-tensorboard", "--log-every", "1", "--max-steps", "1"]


def _gpt2(tokenizer, *, layers: int, seed: int, positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=len(tokenizer),
                                      n_positions=positions, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def short_pair(tmp_path_factory, suite_tokenizer):
    """(teacher_dir, student_dir): GPT-2 models with a context of 64 positions."""
    root = tmp_path_factory.mktemp("short_pair")
    out = []
    for name, layers, seed in (("teacher", 2, 1), ("student", 1, 2)):
        model = _gpt2(suite_tokenizer, layers=layers, seed=seed)
        model.save_pretrained(root / name)
        suite_tokenizer.save_pretrained(root / name)
        out.append(root / name)
    return tuple(out)


@pytest.fixture
def work(tmp_path, tiny_data):
    """tmp_path with data/{train,dev,test}.jsonl (copies): the whole tree is snapshotted."""
    (tmp_path / "data").mkdir()
    for src, name in zip(tiny_data, ("train", "dev", "test")):
        shutil.copy(src, tmp_path / "data" / f"{name}.jsonl")
    return tmp_path


def _distill(short_pair, root, *extra):
    t, s = short_pair
    return ["distill", "--teacher", str(t), "--student", str(s), "--train-file", str(root / "data" / "train.jsonl"),
            "--dev-file", str(root / "data" / "dev.jsonl"), *FLAGS, "--output-dir", str(root / "run"), *extra]


def _eval(model, root, *extra):
    return ["eval", "--model", f"short={model}", "--data", str(root / "data" / "test.jsonl"), "--seeds", "1",
            "--max-samples", "4", "--no-progress", "--output-dir", str(root / "eval"), *extra]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("pocl: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "IndexError" not in err
    return lines[0]


def _refused(argv, root, capsys, *needles):
    before = snapshot(root)
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert snapshot(root) == before  # nothing written, nothing changed
    assert not (root / "run").exists() and not (root / "eval").exists()
    return line


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if WARNING in ln]


# ------------------------------------------------------------------------------------------ the commands
def test_distill_refuses_a_given_max_length_beyond_the_context(short_pair, work, capsys):
    line = _refused(_distill(short_pair, work, "--max-length", "128", "--max-prompt-length", "32"), work, capsys,
                    "--max-length 128", "64 positions", str(short_pair[1]), "give --max-length 64 or less")
    assert line.startswith("pocl: error: data.max_length:")


def test_distill_refuses_a_given_generation_length_that_cannot_fit(short_pair, work, capsys):
    _refused(_distill(short_pair, work, "--max-length", "64", "--max-prompt-length", "32",
                      "--dev-rouge-max-new-tokens", "40"), work, capsys,
             "--dev-rouge-max-new-tokens 40", "64 positions", "at most 32 new tokens fit")


def test_distill_clips_the_defaults_with_one_warning_and_records_them(short_pair, work, capsys):
    import yaml

    code, _, err = run_cli(_distill(short_pair, work), capsys)
    assert code == 0, err
    assert "IndexError" not in err
    (warning,) = _warnings(err)
    for needle in ("--max-length 512 -> 64", "--max-prompt-length 256 -> 32", "--dev-rouge-max-new-tokens 256 -> 32",
                   str(short_pair[1]), "64 positions"):
        assert needle in warning, needle
    assert "rank-max-new-tokens" not in warning and "on-policy" not in warning  # not used by this run
    config = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert config["data"]["max_length"] == 64 and config["data"]["max_prompt_length"] == 32
    assert config["train"]["dev_rouge_max_new_tokens"] == 32
    assert config["curriculum"]["rank_max_new_tokens"] == 256  # unused (no curriculum): left as it is
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["context"]["length"] == 64
    assert summary["context"]["clipped"] == {"data.max_length": [512, 64], "data.max_prompt_length": [256, 32],
                                             "train.dev_rouge_max_new_tokens": [256, 32]}


def test_eval_clips_the_defaults_and_records_them(short_pair, work, capsys):
    code, _, err = run_cli(_eval(short_pair[1], work), capsys)
    assert code == 0, err
    assert "IndexError" not in err
    (warning,) = _warnings(err)
    assert "--max-prompt-length 256 -> 32" in warning and "--max-new-tokens 256 -> 32" in warning
    assert "the model 'short'" in warning
    data = json.loads((work / "eval" / "results.json").read_text())
    assert data["decoding"]["max_new_tokens"] == 32
    assert data["settings"]["max_new_tokens"] == 32 and data["settings"]["max_prompt_length"] == 32
    assert data["generation_config"]["settings"]["max_new_tokens"] == 32
    assert data["models"]["short"]["generation_config"]["max_new_tokens"] == 32
    assert data["context"]["length"] == 64 and data["context"]["field"] == "n_positions"
    assert data["context"]["clipped"] == {"eval.max_prompt_length": [256, 32], "eval.max_new_tokens": [256, 32]}
    rows = [json.loads(x) for x in (work / "eval" / "generations.jsonl").read_text().splitlines()]
    assert rows and all(r["generated_tokens"] <= 32 for r in rows)


def test_eval_keeps_a_given_max_new_tokens_and_shortens_the_default_prompt(short_pair, work, capsys):
    code, _, err = run_cli(_eval(short_pair[1], work, "--max-new-tokens", "40"), capsys)
    assert code == 0, err
    (warning,) = _warnings(err)
    assert "--max-prompt-length 256 -> 24" in warning and "max-new-tokens" not in warning
    data = json.loads((work / "eval" / "results.json").read_text())
    assert data["decoding"]["max_new_tokens"] == 40 and data["settings"]["max_prompt_length"] == 24


def test_eval_refuses_a_given_max_new_tokens_beyond_the_context(short_pair, work, capsys):
    line = _refused(_eval(short_pair[1], work, "--max-new-tokens", "100"), work, capsys,
                    "--max-new-tokens 100", "64 positions", "the model 'short'", str(short_pair[1]))
    assert line.startswith("pocl: error: eval.max_new_tokens:")


def test_eval_refuses_given_lengths_whose_sum_exceeds_the_context(short_pair, work, capsys):
    _refused(_eval(short_pair[1], work, "--max-new-tokens", "40", "--max-prompt-length", "32"), work, capsys,
             "--max-new-tokens 40", "--max-prompt-length 32", "32 + 40 > 64")


def test_eval_of_several_models_uses_the_smallest_context(short_pair, tiny_pair, work, capsys):
    code, _, err = run_cli(_eval(short_pair[1], work, "--model", f"long={tiny_pair[1]}"), capsys)
    assert code == 0, err
    (warning,) = _warnings(err)
    assert "the model 'short'" in warning  # 64 positions, not the Llama's 128
    data = json.loads((work / "eval" / "results.json").read_text())
    assert data["decoding"]["max_new_tokens"] == 32 and set(data["models"]) == {"short", "long"}


def test_rank_clips_the_defaults_and_stamps_the_clipped_values(short_pair, work, capsys):
    argv = ["rank", "--student", str(short_pair[1]), "--train-file", str(work / "data" / "train.jsonl"),
            "--rank-batch-size", "16", "--no-progress", "--output-dir", str(work / "run")]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "IndexError" not in err
    warnings = _warnings(err)
    text = " ".join(warnings)
    for needle in ("--max-length 512 -> 64", "--max-prompt-length 256 -> 32", "--rank-max-new-tokens 256 -> 32"):
        assert needle in text
    assert len(warnings) <= 2 and all(text.count(k) == 1 for k in ("--max-length 512", "--rank-max-new-tokens"))
    meta = json.loads((work / "run" / "ranking.meta.json").read_text())
    inputs = meta["signals_inputs"]
    assert inputs["data"]["settings"]["max_length"] == 64 and inputs["data"]["settings"]["max_prompt_length"] == 32
    assert inputs["generation"]["rank_max_new_tokens"] == 32


def test_rank_refuses_a_given_rank_max_new_tokens_that_cannot_fit(short_pair, work, capsys):
    argv = ["rank", "--student", str(short_pair[1]), "--train-file", str(work / "data" / "train.jsonl"),
            "--rank-max-new-tokens", "40", "--no-progress", "--output-dir", str(work / "run")]
    _refused(argv, work, capsys, "curriculum.rank_max_new_tokens", "--rank-max-new-tokens 40", "64 positions",
             str(short_pair[1]), "at most 32 new tokens fit")


# ------------------------------------------------------------------------------------------ the lookup
def test_context_length_lookup():
    from transformers import GPT2Config, LlamaConfig

    assert context_field(LlamaConfig(max_position_embeddings=64)) == (64, "max_position_embeddings")
    assert context_field(GPT2Config(n_positions=80)) == (80, "n_positions")  # GPT-2's name in config.json
    assert context_length({"seq_length": 2048}) == 2048
    assert context_length({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert context_length({"hidden_size": 8}) is None
    assert context_length({"max_position_embeddings": None, "n_ctx": 0}) is None
    assert context_length(None) is None


def test_read_context_from_the_files_only(short_pair, tiny_pair, tmp_path):
    ctx = read_context(str(short_pair[1]), "the student 'x'")
    assert ctx == Context(64, "the student 'x'", "n_positions")
    assert read_context(str(tiny_pair[1]), "s").length == 128
    assert read_context(str(tmp_path / "missing"), "s") is None  # the model's own loading reports why
    assert read_context(None, "s") is None


def test_distill_context_is_the_smaller_of_teacher_and_student(short_pair, tiny_pair, tiny_data, tmp_path):
    from pocl.pipeline import run_context

    cfg = DistillConfig.from_dict({"model": {"teacher": str(short_pair[0]), "student": str(tiny_pair[1])},
                                   "data": {"train_file": str(tiny_data[0])}})
    ctx = run_context(cfg)
    assert ctx.length == 64 and ctx.model == f"the teacher '{short_pair[0]}'"
    assert run_context(cfg, need_teacher=False).length == 128  # sft: the student only
    with pytest.raises(ConfigError, match=r"--max-length 100 does not fit the context of the teacher"):
        from pocl.pipeline import fit_to_context

        fit_to_context(cfg.replace(data={"max_length": 100, "max_prompt_length": 32}))


def test_unknown_context_checks_nothing():
    cfg = DistillConfig.from_dict({"data": {"max_length": 4096, "max_prompt_length": 2048}})
    assert fit_distill_config(cfg, None) is None and cfg.data.max_length == 4096
    config = EvalConfig()
    assert fit_eval_config(config, None) == (config, None)


# ------------------------------------------------------------------------------------------ the rule
CTX = Context(64, "the student 's'")


def _len(key, value, given=False):
    return Length(key, "--" + key.split(".")[-1].replace("_", "-"), value, given)


def test_training_rule_defaults_are_clipped_given_values_refused():
    fit = fit_training(CTX, _len("data.max_length", 512), _len("data.max_prompt_length", 256),
                       [_len("train.dev_rouge_max_new_tokens", 256), _len("curriculum.rank_max_new_tokens", 8, True)])
    assert fit.values == {"data.max_length": 64, "data.max_prompt_length": 32, "train.dev_rouge_max_new_tokens": 32,
                          "curriculum.rank_max_new_tokens": 8}
    assert fit.clipped == {"data.max_length": (512, 64), "data.max_prompt_length": (256, 32),
                           "train.dev_rouge_max_new_tokens": (256, 32)}
    # a given prompt length that still fits is kept; the default answer length gets the rest
    fit = fit_training(CTX, _len("data.max_length", 512), _len("data.max_prompt_length", 50, True),
                       [_len("train.dev_rouge_max_new_tokens", 256)])
    assert fit.values == {"data.max_length": 64, "data.max_prompt_length": 50, "train.dev_rouge_max_new_tokens": 14}
    # lengths that fit are left alone, whoever set them
    fit = fit_training(CTX, _len("data.max_length", 48, True), _len("data.max_prompt_length", 32, True),
                       [_len("train.dev_rouge_max_new_tokens", 16)])
    assert not fit.clipped and fit.warning() is None
    with pytest.raises(ConfigError, match=r"^data\.max_length: --max-length 128 does not fit the context of the "
                                          r"student 's' \(64 positions"):
        fit_training(CTX, _len("data.max_length", 128, True), _len("data.max_prompt_length", 32, True))
    with pytest.raises(ConfigError, match=r"--max-prompt-length 100 does not fit .*give --max-prompt-length 63 or less"):
        fit_training(CTX, _len("data.max_length", 512), _len("data.max_prompt_length", 100, True))
    with pytest.raises(ConfigError, match=r"--dev-rouge-max-new-tokens 40 does not fit .*at most 32 new tokens fit"):
        fit_training(CTX, _len("data.max_length", 64, True), _len("data.max_prompt_length", 32, True),
                     [_len("train.dev_rouge_max_new_tokens", 40, True)])
    with pytest.raises(ConfigError, match="too short"):
        fit_training(Context(1, "m"), _len("data.max_length", 512), _len("data.max_prompt_length", 256))


@pytest.mark.parametrize("context", [2, 3, 64, 100, 256, 300, 511])
def test_training_rule_always_leaves_a_prompt_and_an_answer(context):
    ctx = Context(context, "m")
    fit = fit_training(ctx, _len("data.max_length", 512), _len("data.max_prompt_length", 256),
                       [_len("train.dev_rouge_max_new_tokens", 256)])
    length, prompt, new = fit.values.values()
    assert length == context and 1 <= prompt < length and new >= 1 and prompt + new <= context


def test_generation_rule():
    def fit(prompt, new, prompt_given=False, new_given=False, c=64):
        out = fit_generation(Context(c, "m"), _len("eval.max_prompt_length", prompt, prompt_given),
                             _len("eval.max_new_tokens", new, new_given))
        return out.values["eval.max_prompt_length"], out.values["eval.max_new_tokens"]

    assert fit(256, 256) == (32, 32)  # both defaults: half each
    assert fit(256, 256, c=256) == (128, 128)  # the built-in models' context
    assert fit(256, 256, c=4096) == (256, 256)  # fits: unchanged
    assert fit(256, 40, new_given=True) == (24, 40)  # a given answer length is kept
    assert fit(20, 256, prompt_given=True) == (20, 44)  # a given prompt length is kept
    assert fit(20, 30, True, True) == (20, 30)
    assert fit(256, 256, c=2) == (1, 1)
    with pytest.raises(ConfigError, match=r"--max-new-tokens 64 does not fit .*at most 63 fit"):
        fit(256, 64, new_given=True)
    with pytest.raises(ConfigError, match=r"--max-prompt-length 64 does not fit"):
        fit(64, 256, prompt_given=True)
    with pytest.raises(ConfigError, match=r"32 \+ 40 > 64"):
        fit(32, 40, True, True)


def _config(**sections):
    base = {"model": {"teacher": "t", "student": "s"}, "data": {"train_file": "x.jsonl"}}
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    return DistillConfig.from_dict(base)


def test_fit_distill_config_in_place_keeps_given_fields_and_is_idempotent(caplog):
    cfg = _config(data={"dev_file": "d.jsonl"}, curriculum={"curriculum": "pocl", "rank_max_new_tokens": 8})
    with caplog.at_level(logging.WARNING, logger="pocl"):
        fit = fit_distill_config(cfg, CTX)
        again = fit_distill_config(cfg, CTX)
    assert [r.getMessage() for r in caplog.records if WARNING in r.getMessage()] == [fit.warning()]  # once
    assert not again.clipped
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.train.dev_rouge_max_new_tokens,
            cfg.curriculum.rank_max_new_tokens) == (64, 32, 32, 8)
    assert not cfg.is_given("data.max_length") and cfg.is_given("curriculum.rank_max_new_tokens")
    assert cfg.unused_curriculum_settings() == []
    assert cfg.loss.on_policy_max_new_tokens == 256 and cfg.loss.seqkd_max_new_tokens == 256  # not used


def test_generation_settings_are_checked_only_when_used():
    assert not on_policy_used(_config())
    assert on_policy_used(_config(loss={"on_policy_fraction": 0.5}))
    assert on_policy_used(_config(curriculum={"curriculum": "pocl", "on_policy_fraction_start": 0.2}))
    assert not on_policy_used(_config(curriculum={"on_policy_fraction_start": 0.2}))  # plain KD ignores it
    from pocl.training.stages import Stage

    assert on_policy_used(_config(), [Stage(name="a", epochs=1, on_policy_fraction=0.3)])
    cfg = _config(loss={"on_policy_fraction": 0.5})
    fit_distill_config(cfg, CTX)
    assert cfg.loss.on_policy_max_new_tokens == 32 and cfg.train.dev_rouge_max_new_tokens == 256  # no dev set
    cfg = _config(loss={"method": "seqkd"})
    fit_distill_config(cfg, CTX)
    assert cfg.loss.seqkd_max_new_tokens == 32


def test_builtin_default_settings_fit_their_models_unchanged():
    """The built-in recipe's own lengths (96 / 80 / 24 new tokens) fit its 256-position models."""
    from pocl.recipes.builtin_default import BuiltinSettings

    s = BuiltinSettings()
    cfg = _config(data={"dev_file": "d.jsonl", "max_length": s.max_length, "max_prompt_length": s.max_prompt_length},
                  train={"dev_rouge_max_new_tokens": s.eval_max_new_tokens},
                  curriculum={"curriculum": "pocl", "rank_max_new_tokens": s.eval_max_new_tokens})
    before = cfg.to_dict()
    fit = fit_distill_config(cfg, Context(256, "the student 'base'"))
    assert not fit.clipped and cfg.to_dict() == before


def test_ranking_clips_a_default_rank_max_new_tokens_of_a_direct_caller(short_pair):
    from pocl.config import CurriculumConfig
    from pocl.models import load_model

    student = load_model(str(short_pair[1]))
    settings = {"max_length": 64, "max_prompt_length": 40}
    cur = fit_ranking_curriculum(CurriculumConfig(), student, settings)
    assert cur.rank_max_new_tokens == 24
    with pytest.raises(ConfigError, match="--rank-max-new-tokens 30 does not fit"):
        fit_ranking_curriculum(CurriculumConfig.from_dict({"rank_max_new_tokens": 30}), student, settings)
    lazy = CurriculumConfig()
    assert fit_ranking_curriculum(lazy, lambda: student, settings) is lazy  # not loaded to be checked
