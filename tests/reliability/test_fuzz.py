"""Fuzzing the inputs a user controls: data files, config dicts and YAML files, command-line flags.

Contract: bad data raises :class:`pocl.errors.DataError`, a bad config :class:`ConfigError` or
:class:`UnknownNameError` (both :class:`PoclError`, printed by the CLI without a traceback, exit 2), a
bad flag makes argparse exit with code 2. Any other exception is a bug.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocl.config import SECTIONS, DistillConfig
from pocl.data import load_records
from pocl.errors import ConfigError, DataError, UnknownNameError

FUZZ = settings(max_examples=int(os.environ.get("POCL_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False,
                                                                                 allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = ["instruction", "input", "context", "output", "response", "prompt", "id", "category"]
rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=6)


def _load(blob: bytes, suffix: str, **kw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(blob)
        try:
            return load_records(path, **kw)
        except DataError:
            return None


@FUZZ
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json"]), skip=st.booleans())
def test_random_bytes_only_raise_data_error(blob, suffix, skip):
    _load(blob, suffix, skip_invalid=skip)


@FUZZ
@given(lines=st.lists(rows | json_values, min_size=0, max_size=6), skip=st.booleans(),
       need_output=st.booleans())
def test_random_jsonl_rows_only_raise_data_error(lines, skip, need_output):
    blob = "\n".join(json.dumps(x) for x in lines).encode()
    result = _load(blob, ".jsonl", skip_invalid=skip, require_output=need_output)
    if result is not None:  # every record that came back is valid
        assert len({r.id for r in result.records}) == len(result.records)
        for r in result.records:
            assert isinstance(r.instruction, str) and isinstance(r.input, str)
            assert r.prompt is not None or r.instruction.strip()
            assert not need_output or r.has_output


@FUZZ
@given(value=json_values | st.lists(rows, max_size=5))
def test_random_json_documents_only_raise_data_error(value):
    _load(json.dumps(value).encode(), ".json")


# ----------------------------------------------------------------------------------------- config
def _field_names():
    names = {}
    for section, cls in SECTIONS.items():
        names[section] = [f.name for f in dataclasses.fields(cls)]
    return names


FIELD_NAMES = _field_names()
config_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12)
                  | st.sampled_from(["fkl", "kl", "jsd", "pocl", "rrf", "auto", "1e-4", "inf", "nan", "-1", "0",
                                     "none", "true"]))
config_values = st.recursive(config_scalars, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                                 ["fraction", "epochs", "max_steps", "temperature", "alpha", "name", "lr"]),
                                 inner, max_size=3), max_leaves=8)
stage_entry = st.dictionaries(st.sampled_from(["fraction", "epochs", "max_steps", "temperature", "alpha", "skew",
                                               "lr", "plateau_patience", "name"]), config_scalars, max_size=3)


@st.composite
def config_dicts(draw):
    out = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS)) | st.text(max_size=6), max_size=4)):
        keys = FIELD_NAMES.get(section, [])
        items = draw(st.dictionaries(st.sampled_from(keys) if keys else st.text(max_size=6), config_values,
                                     max_size=4)) if draw(st.booleans()) else draw(config_values)
        out[section] = items
    if draw(st.booleans()):
        out["curriculum"] = {"curriculum": "pocl", "num_stages": draw(st.integers(1, 4)),
                             "stages": draw(st.lists(stage_entry, max_size=4))}
    return out


@FUZZ
@given(values=config_dicts())
def test_random_config_dicts_only_raise_config_errors(values):
    try:
        config = DistillConfig.from_dict(values)
    except (ConfigError, UnknownNameError):
        return
    # what was accepted round-trips to the same config
    assert DistillConfig.from_dict(config.to_dict()).training_hash() == config.training_hash()


@FUZZ
@given(stages=st.lists(st.dictionaries(st.sampled_from(["fraction", "temperature", "alpha", "skew", "lr"]),
                                       config_scalars, max_size=3), max_size=3), n=st.integers(1, 3))
def test_numeric_stage_overrides_build_stages_or_raise_config_errors(stages, n):
    """Numeric stage overrides: an accepted schedule builds; anything else is a ConfigError."""
    from pocl.curriculum import baby_step_stages

    try:
        config = DistillConfig.from_dict({"curriculum": {"curriculum": "pocl", "num_stages": n, "stages": stages}})
        baby_step_stages([f"s{i}" for i in range(12)], config.curriculum, base_skew=config.loss.skew)
    except (ConfigError, UnknownNameError):
        pass


@pytest.mark.parametrize("entry", [{"max_steps": "a"}, {"max_steps": 2.5}, {"plateau_patience": "x"},
                                   {"epochs": float("inf")}, {"temperature": float("inf")}, {"name": 5}],
                         ids=["max_steps-text", "max_steps-float", "patience-text", "epochs-inf", "temperature-inf",
                              "name-int"])
def test_stage_overrides_of_the_wrong_type_are_config_errors(entry):
    from pocl.curriculum import baby_step_stages

    (key,) = entry
    with pytest.raises(ConfigError, match=rf"stages\[0\]\.{key} must be"):
        config = DistillConfig.from_dict({"curriculum": {"curriculum": "pocl", "num_stages": 2, "stages": [entry]}})
        baby_step_stages([f"s{i}" for i in range(12)], config.curriculum, base_skew=config.loss.skew)


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(["model: [x", "a: b: c", "- 1\n- 2", "train:\n  epochs: inf",
                                                     "1: 2", "? [a]\n: 1", "train: {batch_size: 1e400}"]))
def test_random_yaml_files_only_raise_config_errors(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            DistillConfig.from_yaml(path)
        except (ConfigError, UnknownNameError):
            pass


# ----------------------------------------------------------------------------------------- flags
def _flags():
    from pocl.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    distill = sub.choices["distill"]
    return [opt for a in distill._actions for opt in a.option_strings if opt.startswith("--")
            and opt not in ("--help", "--config")]


FLAGS = _flags()
flag_values = st.sampled_from(["0", "-1", "1", "2.5", "1e-4", "inf", "-inf", "nan", "none", "", "fkl", "kll", "pocl",
                               "true", "x" * 3, "1e400", "9" * 30]) | st.text(max_size=8)


@FUZZ
@given(argv=st.lists(st.tuples(st.sampled_from(FLAGS) | st.text(max_size=8), flag_values), max_size=5))
def test_random_flags_only_exit_2_or_raise_config_errors(argv, capsys):
    from pocl.cli import build_config, make_parser

    args_list = ["distill"] + [x for pair in argv for x in pair]
    try:
        args = make_parser().parse_args(args_list)
    except SystemExit as exc:
        assert exc.code == 2
        return
    finally:
        capsys.readouterr()
    try:
        config = build_config(args)
    except (ConfigError, UnknownNameError):
        return
    for section in SECTIONS:
        for key, value in getattr(config, section).to_dict().items():
            assert not (isinstance(value, float) and not math.isfinite(value)), f"{section}.{key} = {value}"
