"""The experiment matrix (``pocl matrix``): {divergence} x {plain KD, KD + POCL} x seeds, plus the
ablations of the spec's section 7, every run evaluated and one results table in the layout of the
spec's section 6. The methods may also include TAID and Speculative KD, each without and with POCL,
and POCL whose first stages learn from an assistant teacher (``taid``, ``taid-pocl``, ``skd``,
``skd-pocl``, ``pocl-assistant``; issue 20).

    pocl matrix examples/experiments/smollm2_dolly.yaml --dry-run
    pocl matrix examples/experiments/smollm2_dolly.yaml

(``python examples/experiments/run_matrix.py SPEC ...`` is the same command.) One YAML spec describes
the whole experiment (see ``examples/experiments/smollm2_dolly.yaml`` and ``docs/experiments.md``).
The steps, each skipped when its result is already there:

1. models: a ``.gguf`` teacher is saved once as a normal checkpoint (``OUTPUT/models/teacher``); a
   student given as ``pocl init-student`` options is made from the teacher (``OUTPUT/models/student``),
   and so is the assistant teacher of pocl-assistant (``OUTPUT/models/assistant``); both are healed
   with ``models.heal`` when the spec has it;
2. ranking: ``pocl rank`` scores the training set once with the initial student
   (``OUTPUT/ranking``); every POCL run starts from a copy of it, which pocl reuses only while its
   stamp (student, data, measurer settings) matches, and re-orders from the stored signals for the
   ``random``/``reverse``/``rouge``/``loss`` measurers;
3. training: every run is one ``pocl distill --config OUTPUT/configs/RUN.yaml`` with output folder
   ``OUTPUT/runs/RUN``, started as a subprocess (log: ``OUTPUT/logs/RUN.log``). A finished run
   (``summary.json`` status completed, same training config) is skipped; an unfinished one resumes
   from its last checkpoint (pocl's own resume); a finished run whose config has changed stops the
   runner with the list of changes (``--rerun-changed`` retrains it);
4. evaluation: every run's final model (``checkpoint: best`` for best/) plus the teacher and the
   initial student go through ``pocl eval``'s ``run_eval`` (``OUTPUT/eval/RUN``), cached by a stamp
   of the evaluation settings and the model's fingerprint;
5. tables: ``results.md`` (ROUGE-L and exact-match tables, rows = methods, columns = sets + Avg,
   ``mean ± std`` over the training seeds of each run's score, itself the mean over the evaluation
   seeds; a cost table with the sample budget and the ranking vs training time of every row),
   ``results.json`` (every run with its config, summary figures and scores), and bar charts.

Same sample budget: plain KD trains ``base.train.epochs`` epochs over all N samples; POCL's
stage s trains on a fraction f_s of them, so its stage epochs are ``epochs / sum(f_s)``
(``epochs * 2 / (n + 1)`` for n equal cumulative slices, as ``pocl distill``'s built-in default
does; :func:`pocl.curriculum.schedule.same_budget_stage_epochs`). The samples each run actually
trained on are counted from its ``summary.json`` and compared with its KD counterpart's in
``results.md``.

Why subprocesses for training: each run is exactly the command a user would type (its config file
and log are in the output folder), memory is returned to the system after every run, a run that
crashes or is killed does not take down the matrix, and pocl's own Ctrl-C/SIGTERM handling (save a
checkpoint, exit 130) applies per run. ``--in-process`` runs the same command lines through
``pocl.cli.main`` in this process instead (faster to start; used by the tests). Evaluations run in
this process through ``pocl.evaluation.runner.run_eval``.

Modules: ``spec`` (the YAML spec), ``plan`` (the runs and their state on disk), ``execute`` (models,
ranking, training, cached evaluation), ``results`` (records, tables, results.md/json, plots),
``estimate`` (the dry run), ``runner`` (``run_matrix`` and the command line). Importing this package
does not import torch (the modules that need it are imported where they are used).
"""

from pocl.experiments.estimate import estimate_seconds, print_plan
from pocl.experiments.execute import (
    Interrupted,
    eval_config_dict,
    evaluate,
    model_path_of,
    prepare_models,
    rank_config,
    run_pocl,
    seed_ranking,
    train_all,
)
from pocl.experiments.plan import (
    HEAL_OWN_DATA_KEYS,
    Run,
    assistant_dir,
    build_plan,
    heal_run,
    main_run,
    model_dirs,
    read_json,
    row_order,
    run_dir,
    same_budget_stage_epochs,
    stage_fractions,
    training_status,
)
from pocl.experiments.results import (
    PAIRED_METHODS,
    build_table,
    export_results,
    markdown,
    paired_differences,
    paired_intervals,
    run_record,
    samples_trained,
    write_results,
)
from pocl.experiments.runner import (
    DESCRIPTION,
    add_arguments,
    main,
    run_command,
    run_matrix,
)
from pocl.experiments.spec import (
    ABLATIONS,
    BASELINES,
    DEFAULT_METHODS,
    ESTIMATE_KEYS,
    METHOD_LOSS,
    METHODS,
    POCL_METHODS,
    REFERENCES,
    SCHEMA,
    SPEC_KEYS,
    Spec,
    load_spec,
)

__all__ = ["ABLATIONS", "BASELINES", "DEFAULT_METHODS", "DESCRIPTION", "ESTIMATE_KEYS", "HEAL_OWN_DATA_KEYS",
           "METHODS", "METHOD_LOSS", "PAIRED_METHODS", "POCL_METHODS", "REFERENCES",
           "SCHEMA", "SPEC_KEYS", "Interrupted", "Run", "Spec", "add_arguments", "assistant_dir", "build_plan",
           "build_table", "estimate_seconds", "eval_config_dict", "evaluate", "export_results", "heal_run",
           "load_spec", "main", "main_run", "markdown", "model_dirs", "model_path_of", "paired_differences", "paired_intervals", "prepare_models", "print_plan",
           "rank_config", "read_json", "row_order", "run_command", "run_dir", "run_matrix", "run_pocl",
           "run_record", "same_budget_stage_epochs", "samples_trained", "seed_ranking", "stage_fractions",
           "train_all", "training_status", "write_results"]
