"""`pocl init-student`: a student made of a subset of the teacher's decoder layers."""

from __future__ import annotations

import json

import pytest
import torch

from pocl.cli import main
from pocl.errors import ConfigError, ModelError
from pocl.student_init import init_student, parse_layer_list, select_layers, shrink_model
from tests.conftest import make_llama, save_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, suite_tokenizer):
    root = tmp_path_factory.mktemp("init_student")
    return save_model(make_llama(suite_tokenizer, hidden=16, layers=6, seed=5), suite_tokenizer, root / "teacher")


def _layer_state(model, i):
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_kept_layers_embeddings_and_head_are_the_teachers(tmp_path, teacher_dir, suite_tokenizer):
    from transformers import AutoModelForCausalLM

    result = init_student(str(teacher_dir), tmp_path / "student", keep_layers=[0, 2, 5])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")  # no pocl involved
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in enumerate([0, 2, 5]):
        s, t = _layer_state(student, new), _layer_state(teacher, old)
        assert s.keys() == t.keys() and s
        for k in s:
            assert torch.equal(s[k], t[k]), (new, old, k)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # tied embeddings stay tied, in memory and after loading
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert result.model.lm_head.weight.data_ptr() == result.model.model.embed_tokens.weight.data_ptr()
    # the tokenizer is copied and a forward pass runs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tok.get_vocab() == suite_tokenizer.get_vocab()
    ids = torch.tensor([tok("Add 2 and 3.")["input_ids"]])
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (1, ids.shape[1], len(suite_tokenizer)) and torch.isfinite(logits).all()
    info = json.loads((tmp_path / "student" / "init_student.json").read_text())
    assert info["kept_layers"] == [0, 2, 5] and info["teacher_layers"] == 6
    assert info["student_parameters"] < info["teacher_parameters"]


def test_all_layers_kept_reproduces_the_teacher(teacher_dir):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student, _ = shrink_model(teacher, list(range(6)))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)


def test_untied_head_and_per_layer_config_lists(tmp_path, suite_tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(suite_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      use_sliding_window=True, sliding_window=8, max_window_layers=2)
    teacher = Qwen2ForCausalLM(cfg)
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    save_model(teacher, suite_tokenizer, tmp_path / "qwen")
    result = init_student(str(tmp_path / "qwen"), tmp_path / "qs", keep_layers=[1, 3])
    assert result.trimmed_config_fields == ["layer_types"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)


def test_gpt2_layout(suite_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=len(suite_tokenizer),
                                         n_positions=64, bos_token_id=0, eos_token_id=0))
    student, _ = shrink_model(teacher, select_layers(4, keep_every=2))  # 0, 2 and the last (3)
    assert student.config.n_layer == 3 and len(student.transformer.h) == 3
    assert torch.equal(student.transformer.h[2].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)
    assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


def test_unknown_layout_is_refused_with_the_architecture(suite_tokenizer):
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "odd", "num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])

    with pytest.raises(ModelError, match="decoder layers of Odd.*'odd'.*model.layers"):
        shrink_model(Odd(), [0])


def test_layer_selection_rules():
    assert select_layers(30, keep_every=3) == list(range(0, 30, 3)) + [29]
    assert select_layers(30, keep_every=3, keep_last=False) == list(range(0, 30, 3))
    assert select_layers(7, keep_every=3) == [0, 3, 6]  # the stride lands on the last layer
    assert select_layers(30, num_kept=10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(5, num_kept=1) == [0] and select_layers(5, num_kept=5) == [0, 1, 2, 3, 4]
    assert select_layers(6, keep_every=1) == list(range(6))
    assert parse_layer_list("0,3, 6") == [0, 3, 6]


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep_layers=[]), "keep_layers: the list is empty"),
    (dict(keep_layers=[0, 6]), "layer 6 is out of range; the teacher has 6 layers"),
    (dict(keep_layers=[-1]), "layer -1 is out of range"),
    (dict(keep_layers=[0, 2, 2]), "layer 2 is listed more than once"),
    (dict(keep_layers=[3, 1]), "not in increasing order"),
    (dict(keep_every=0), "keep_every: must be a whole number >= 1"),
    (dict(num_kept=7), "num_layers: must be a whole number from 1 to the teacher's 6 layers"),
    (dict(), "give exactly one of"),
    (dict(keep_every=2, num_kept=3), "got keep_every, num_layers"),
])
def test_bad_layer_lists(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        select_layers(6, **kwargs)


def test_cli(tmp_path, teacher_dir, capsys):
    out = tmp_path / "cli-student"
    assert main(["init-student", "--teacher", str(teacher_dir), "--keep-every", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student: 4 of 6 layers [0, 2, 4, 5]" in printed and f"saved: {out}" in printed
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    # a bad list is a clear error (exit status 2, no traceback), and nothing is written
    bad = tmp_path / "bad"
    assert main(["init-student", "--teacher", str(teacher_dir), "--keep-layers", "0,9", "--output-dir", str(bad)]) == 2
    assert "layer 9 is out of range; the teacher has 6 layers (0-5)" in capsys.readouterr().err
    assert not bad.exists()
    assert main(["init-student", "--teacher", str(teacher_dir), "--keep-layers", "0,x", "--output-dir", str(bad)]) == 2
    assert "'x' is not a layer index" in capsys.readouterr().err
