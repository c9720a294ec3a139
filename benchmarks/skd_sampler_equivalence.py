"""Speculative KD: does the batched inverse-transform sampler (c60d3cc) sample like the per-row multinomial
sampler it replaced? The acceptance rate on the real models, over several seeds, for both.

    OMP_NUM_THREADS=1 python benchmarks/skd_sampler_equivalence.py    # about 3 minutes -> results/skd_sampler_equivalence.json

The two samplers draw from the same distributions with different random streams, so their samples differ
one by one; what must agree is every statistic of them. The acceptance rate (the share of the student's
drafted tokens the teacher keeps) is the one SKD training depends on most. Setting: the SmolLM2 matrix's
teacher and healed 10-layer student (``runs/matrix/smollm2-dolly-powered/models``: run
``pocl matrix examples/experiments/smollm2_dolly_methods.yaml --only teacher --no-eval`` first), the first
``--prompts`` Dolly training instructions in one batch, ``--max-new-tokens`` new tokens, the official settings
(gamma 5, top-K 25, T = 1), bf16 autocast on CPU, seeds 0 .. ``--seeds`` - 1. The old sampler is
``src/pocl/training/speculative.py`` at commit 01377ed, read with ``git show`` (the same KV-cache code, the
draws by ``torch.multinomial``). Skips (exit 0, a message) when the models or the data are absent.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from skd_sampler import ROOT, load_models_and_prompts, model_arguments

OLD_COMMIT = "01377ed"


def load_old_sampler(folder: Path):
    """``pocl.training.speculative`` as it was at OLD_COMMIT (per-row multinomial draws), as a module."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/pocl/training/speculative.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = folder / "speculative_multinomial.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("speculative_multinomial", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = model_arguments(__doc__.split("\n\n")[0], prompts=16, max_new_tokens=48)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--output", default=str(C.RESULTS / "skd_sampler_equivalence.json"))
    args = p.parse_args(argv)
    import torch

    from pocl.training import speculative as new

    torch.set_num_threads(1)
    loaded = load_models_and_prompts(args, "skd_sampler_equivalence")
    if loaded is None:
        return 0
    tokenizer, teacher, student, prompts = loaded
    samplers = {}
    with tempfile.TemporaryDirectory() as tmp:
        modules = {f"multinomial ({OLD_COMMIT})": load_old_sampler(Path(tmp)), "sample_rows": new}
        for name, module in modules.items():
            per_seed = []
            for seed in range(args.seeds):
                settings = module.SpeculativeSettings(max_new_tokens=args.max_new_tokens)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _, stats = module.speculative_generate(student, teacher, tokenizer, prompts, settings, seed=seed,
                                                           batch_size=len(prompts))
                per_seed.append({"seed": seed, "drafted": stats.drafted, "accepted": stats.accepted,
                                 "replaced": stats.replaced, "acceptance_rate": round(stats.acceptance_rate, 4)})
            accepted = sum(s["accepted"] for s in per_seed)
            drafted = sum(s["drafted"] for s in per_seed)
            samplers[name] = {"per_seed": per_seed, "acceptance_rate": round(accepted / drafted, 4)}
            rates = [s["acceptance_rate"] for s in per_seed]
            print(f"{name}: acceptance {accepted}/{drafted} = {accepted / drafted:.3f} (per seed {rates})", flush=True)
    result = {"date": C.now(), "machine": C.machine(), "versions": C.versions(), "git": C.git_state(),
              "teacher": args.teacher, "student": args.student, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "seeds": args.seeds, "samplers": samplers, "doc": __doc__}
    C.write_json(Path(args.output), result)
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
