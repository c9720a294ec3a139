"""The curriculum sampler and collator alone: steps across epoch boundaries, plateau ends, the state."""

from __future__ import annotations

import pytest

from pocl.errors import ConfigError
from pocl.integrations import CurriculumSampler, PoclCollator


def test_a_step_may_span_two_epochs_of_a_stage_and_each_epoch_is_a_permutation():
    sampler = CurriculumSampler([[10, 11, 12, 13, 14, 15]], [3], step_size=4, seed=7)
    stream = list(sampler)
    assert len(stream) == len(sampler) == 12
    assert sorted(stream[:6]) == sorted(stream[6:]) == [10, 11, 12, 13, 14, 15]
    assert stream[:6] == sampler.epoch_order(0, 0) and stream[6:] == sampler.epoch_order(0, 1)
    assert sampler.step_samples(1) == stream[4:8]  # the end of epoch 0 and the start of epoch 1


def test_plateau_end_moves_later_stages_and_never_takes_back_fetched_steps():
    sampler = CurriculumSampler([[0, 1], [0, 1, 2, 3]], [5, 2], step_size=2, seed=0)
    it = iter(sampler)
    fetched = [next(it) for _ in range(5)]  # steps 0, 1 and half of step 2 handed out
    sampler.end_stage(0, at_step=1)
    assert sampler.steps == [3, 2] and sampler.starts() == [0, 3]
    rest = list(it)
    assert fetched + rest == [i for k in range(5) for i in sampler.step_samples(k)]
    assert set(sampler.step_samples(3)) <= {0, 1, 2, 3} and sampler.stage_at(5) is None
    state = sampler.state()
    fresh = CurriculumSampler([[0, 1], [0, 1, 2, 3]], [5, 2], step_size=2, seed=0)
    fresh.load_state(state)
    assert list(fresh) == fetched + rest
    with pytest.raises(ConfigError, match="does not fit"):
        CurriculumSampler([[0, 1], [0, 1, 2, 3]], [2, 2], step_size=2, seed=0).load_state(state)
    with pytest.raises(ConfigError, match="seed"):
        CurriculumSampler([[0, 1], [0, 1, 2, 3]], [5, 2], step_size=2, seed=1).load_state(state)
    with pytest.raises(ConfigError, match="stages"):
        CurriculumSampler([[1, 0], [0, 1, 2, 3]], [5, 2], step_size=2, seed=0).load_state(state)


def test_the_collator_keeps_a_sample_twice_in_one_batch(suite_tokenizer):
    row = {"id": "a", "instruction": "Say hi", "input": "", "output": "hi"}
    batch = PoclCollator(suite_tokenizer)([row, row, dict(row, id="b")])
    assert batch["pocl_ids"] == ["a", "a", "b"]
    assert batch["input_ids"].shape[0] == batch["prompts"].shape[0] == 3
    assert (batch["labels"][0] != -100).sum() > 0 and (batch["prompt_attention_mask"][:, -1] == 1).all()


@pytest.mark.parametrize("with_id", [True, False])
def test_dataset_ids_are_the_ids_pocls_loader_gives_the_saved_dataset(tmp_path, train_dataset, with_id):
    from pocl.data import load_records
    from pocl.integrations import dataset_ids

    ds = train_dataset if with_id else train_dataset.remove_columns("id")
    ds.save_to_disk(str(tmp_path / "ds"))
    assert dataset_ids(ds) == [r.id for r in load_records(tmp_path / "ds").records]


def test_pocl_rank_on_the_saved_dataset_writes_the_same_ranking_as_rank_dataset(tmp_path, train_dataset, tiny_pair,
                                                                                suite_tokenizer):
    from transformers import AutoModelForCausalLM

    from pocl.cli import main
    from pocl.config import CurriculumConfig
    from pocl.curriculum import read_ranking
    from pocl.integrations import rank_dataset

    _, student = tiny_pair
    ds = train_dataset.remove_columns("id")  # ids by row position: the rule both must share
    ds.save_to_disk(str(tmp_path / "ds"))
    rank_dataset(ds, tmp_path / "a" / "ranking.jsonl", student=AutoModelForCausalLM.from_pretrained(student),
                 tokenizer=suite_tokenizer, student_path=str(student), max_length=64, max_prompt_length=48,
                 config=CurriculumConfig(curriculum="pocl", rank_max_new_tokens=8))
    assert main(["rank", "--train-file", str(tmp_path / "ds"), "--student", str(student), "--ranking-file",
                 str(tmp_path / "b" / "ranking.jsonl"), "--max-length", "64", "--max-prompt-length", "48",
                 "--rank-max-new-tokens", "8", "--output-dir", str(tmp_path / "out"), "--cpu", "--no-progress"]) == 0
    a, meta_a = read_ranking(tmp_path / "a" / "ranking.jsonl")
    b, meta_b = read_ranking(tmp_path / "b" / "ranking.jsonl")
    assert [r.id for r in a] == [r.id for r in b] and meta_a["signals_hash"] == meta_b["signals_hash"]
