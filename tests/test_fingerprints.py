"""Every fingerprint in :mod:`pocl.fingerprints` pinned on a small fixed input.

The values were computed with the helpers before they moved to pocl.fingerprints (pocl.models,
training.checkpoint, training.teacher_signal / teacher_cache / run_store, curriculum.ranking_stamps and
ranking_journal, baselines). Stored stamps (rankings, teacher caches, checkpoints, SeqKD caches) are reused
only while these values stay the same: a change here invalidates every stored result.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

import pocl.fingerprints as fp
class FakeConfig:
    def to_dict(self):
        return {"model_type": "llama", "hidden_size": 16, "vocab_size": 40, "torch_dtype": torch.float32}

class FakeModel:
    config = FakeConfig()

class VocabTokenizer:
    bos_token_id = None; eos_token_id = 2; pad_token_id = 0
    chat_template = None
    def get_vocab(self):
        return {"<pad>": 0, "a": 3, "b": 4, "</s>": 2, "é": 5}

class _Backend:
    def to_str(self):
        return '{"model": {"type": "WordLevel", "vocab": {"a": 0}}}'

class BackendTokenizer:
    bos_token_id = 1; eos_token_id = 2; pad_token_id = 2
    chat_template = "{{ messages }}"
    backend_tokenizer = _Backend()

class Template:
    def render(self, r):
        return f"Q: {r.instruction}\n{r.input}\nA:"

def _records():
    return [SimpleNamespace(id="r1", instruction="Say hi", input="", references=["hi"]),
            SimpleNamespace(id="r2", instruction="Répète", input="ça", references=["ça", "ca"])]

def _samples():
    return [SimpleNamespace(id="s1", input_ids=[5, 6, 7, 8], labels=[-100, -100, 7, 8], prompt_length=2),
            SimpleNamespace(id="s2", input_ids=[9, 10, 11], labels=[-100, 10, 11], prompt_length=1)]

def _weight_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / "model.safetensors").write_bytes(rng.integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes())
    (folder / "extra.bin").write_bytes(b"tiny weights")
    (folder / "config.json").write_text("{}")
    return folder

class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7)
            self.lin.bias.copy_(torch.tensor([0.5, -1.25]))
        self.register_buffer("scale16", torch.tensor([1.5, 2.0], dtype=torch.bfloat16))

def _stamp_inputs():
    return {"student": "abc", "data": {"samples": 2, "settings": {"max_length": 48, "t": 0.7}}, "z": None, "é": [1, 2.5]}

def _journal_entry():
    return {"signal": "rouge", "batch": 3, "values": [0.5, float("nan"), 1.0], "ids": ["a", "é"]}

def _real_records():
    from pocl.data import Record
    return [Record(id="r1", instruction="Say hi", output="hi"), Record(id="r2", instruction="Répète", input="ça", output=("ça", "ca"))]

def _real_samples():
    from pocl.data.tokenization import TokenizedSample
    return [TokenizedSample(s.id, list(s.input_ids), list(s.labels), s.prompt_length) for s in _samples()]


def _stages():
    from pocl.training.stages import Stage

    return [Stage("easy", sample_ids=("s1",), temperature=2.0, alpha=0.5), Stage("all", epochs=2.0)]


# ------------------------------------------------------------------------------ pinned values
def test_model_fingerprint_values(tmp_path):
    folder = _weight_file(tmp_path / "m")
    assert fp.model_fingerprint("org/some-model") == "f17644fac12a371d"
    assert fp.model_fingerprint(str(folder)) == "a9eee79fed21bf1e"
    assert fp.model_fingerprint(str(folder), FakeModel()) == "ef5b928a0d461f0d"
    assert fp.model_fingerprint(str(folder / "extra.bin")) == "170bd564f2a1a6d9"
    assert fp.model_fingerprint(None, FakeModel()) == "23a42ade6b689e66"


def test_teacher_fingerprint_values():
    assert fp.teacher_fingerprint(Teacher(), "given-fp") == "given-fp"
    assert fp.teacher_fingerprint(Teacher(), None) == "weights-641d30b4985c55c2"
    assert fp.weights_fingerprint(Teacher()) == "weights-641d30b4985c55c2"


def test_tokenizer_fingerprint_values():
    assert fp.tokenizer_fingerprint(VocabTokenizer()) == "907362a5b648af23"
    assert fp.tokenizer_fingerprint(BackendTokenizer()) == "8cee101bc986cf90"


def test_record_hashes_values():
    hashes = ["1119b1b47da563cb", "d773f62cb55e7cc4"]
    assert fp.sample_hashes(_records(), Template()) == hashes
    assert fp.sample_hashes(_real_records(), Template()) == hashes
    assert fp.records_hash(hashes) == "b0d0871549445a92"


def test_tokenized_data_values():
    assert fp.tokenized_fingerprint(_samples()) == "bdb6612404bfa1d1"
    assert fp.tokenized_fingerprint(_real_samples()) == "bdb6612404bfa1d1"
    assert fp.tokenized_fingerprint(None) is None
    assert fp.prompt_hash(_samples()) == "13a80fe780c12cf1"
    assert fp.prompt_hash(_real_samples()) == "13a80fe780c12cf1"


def test_stamp_values():
    from pocl.training.teacher_cache import cache_stamp

    assert fp.stamp_hash(_stamp_inputs()) == "f6b0fd2c1b6eb2dd"
    stamp = cache_stamp(kind="topk", teacher_fingerprint="t", teacher_dtype="bfloat16", data_fingerprint="d",
                        dtype="float16", vocab_size=40, topk=8, temperatures=[2.0, 1.0])
    assert fp.stamp_hash(stamp) == "a0f48e6f076038c8"
    assert fp.line_check(_journal_entry()) == "523f19da1d42ab26"


def test_file_checksum_values(tmp_path):
    folder = _weight_file(tmp_path / "m")
    blob = (folder / "model.safetensors").read_bytes()
    expected = "b3fe4b5ee65dc1cf6baa2a66deffac2f9d40ee7461fd536f5e500aec918f62c8"
    assert fp.sha256_file(folder / "model.safetensors") == expected
    assert fp.sha256_file(folder / "model.safetensors", chunk=1000) == expected
    assert fp.sha256_bytes(blob) == expected


def test_run_fingerprints_values():
    stages = _stages()
    assert fp.run_fingerprints({"teacher": "t1", "train_data": "given"}, train_data=_samples(), dev_data=None,
                               stages=stages) == {"teacher": "t1", "train_data": "given", "dev_data": None,
                                                  "stages": "7a6ff1fd7ef35be7"}
    assert fp.run_fingerprints(None, train_data=_real_samples(), dev_data=_real_samples()[:1], stages=stages[:1]) == {
        "train_data": "bdb6612404bfa1d1", "dev_data": "9f71c67b85ea7987", "stages": "2056cd08fdd83dd8"}
    assert fp.stages_fingerprint(stages) == "7a6ff1fd7ef35be7"


# ------------------------------------------------------------------------------ one home
def test_callers_use_the_one_implementation():
    """The modules that store fingerprints use these functions, not copies of their own."""
    from pocl.curriculum import ranking, ranking_stamps
    from pocl.artifacts import folders
    from pocl.training import run_store, teacher_signal

    assert folders.sha256_file is fp.sha256_file
    assert ranking_stamps.sample_hashes is fp.sample_hashes
    assert ranking.Stamp({"a": 1}).hash == fp.stamp_hash({"a": 1})  # the ranking's stamps are pocl.artifacts.Stamp
    assert teacher_signal.teacher_fingerprint is fp.teacher_fingerprint
    assert run_store.run_fingerprints is fp.run_fingerprints


def test_imports_no_torch():
    code = "import sys, pocl.fingerprints; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
