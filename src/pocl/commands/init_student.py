"""``pocl init-student``: a smaller student from a teacher by keeping a subset of its decoder layers."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "init-student", help="Make a smaller student by keeping a subset of the teacher's decoder layers.",
        description="Copy the teacher's embeddings, final norm, output layer and a chosen subset of its decoder "
                    "layers into a new model of the same architecture, and save it with the teacher's tokenizer "
                    "as a normal Hugging Face folder (from_pretrained loads it without pocl). Layouts: "
                    "model.model.layers (Llama/SmolLM2, Qwen2, Mistral, ...) and model.transformer.h (GPT-2). "
                    "Give exactly one of --keep-layers, --keep-every and --num-layers.")
    p.add_argument("--teacher", required=True, metavar="PATH",
                   help="Teacher: a Hugging Face model folder, a hub name (from the local cache when offline) or a "
                        ".gguf file (dequantised to float32).")
    p.add_argument("--output-dir", required=True, metavar="PATH",
                   help="Folder the student is written to: a new or empty folder, or (with --overwrite) the output "
                        "of an earlier `pocl init-student`. Any other non-empty folder, and the teacher's own "
                        "folder, are refused.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the model that an earlier `pocl init-student` (or another pocl command) wrote to "
                        "--output-dir, recognised by its manifest.json. Never replaces a folder pocl did not write.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-layers", metavar="LIST",
                       help="0-based teacher layers to keep, increasing, e.g. 0,3,6,9 (no repeats, in range).")
    which.add_argument("--keep-every", type=int, metavar="K",
                       help="Keep layers 0, K, 2K, ... and the last layer (see --no-keep-last). --keep-every 1 keeps "
                            "every layer: a .gguf teacher becomes a normal checkpoint.")
    which.add_argument("--num-layers", type=int, metavar="N",
                       help="Keep N layers spread evenly from the first to the last (first and last included).")
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=True,
                   help="With --keep-every: also keep the last layer when the stride does not land on it "
                        "(default: yes).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="Dtype of the saved weights (default: float32).")
    p.add_argument("--local-files-only", action="store_true", help="Never contact the hub.")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Allow model code from the model folder (only for models you trust).")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pocl.student_init import init_student, parse_layer_list

    keep_layers = parse_layer_list(args.keep_layers) if args.keep_layers is not None else None
    result = init_student(args.teacher, args.output_dir, keep_layers=keep_layers, keep_every=args.keep_every,
                          num_layers=args.num_layers, keep_last=args.keep_last, dtype=getattr(torch, args.dtype),
                          local_files_only=args.local_files_only, trust_remote_code=args.trust_remote_code,
                          overwrite=args.overwrite)
    kept = result.kept_layers
    print(f"student: {len(kept)} of {result.teacher_layers} layers {kept}")
    print(f"parameters: {result.student_parameters:,} (teacher {result.teacher_parameters:,}, "
          f"{100 * result.student_parameters / result.teacher_parameters:.1f}%)")
    if result.trimmed_config_fields:
        print(f"per-layer config fields cut to the kept layers: {', '.join(result.trimmed_config_fields)}")
    print(f"saved: {result.output_dir}")
    return 0
