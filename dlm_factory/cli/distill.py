"""``factory distill``: train a DLM on its AR teacher's greedy continuations (docs/distill.md)."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device, add_training, stage_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil an AR teacher's greedy continuations into a DLM (faster parallel "
                                       "and speculative decoding)",
                       description="The AR teacher continues corpus prompts greedily; the DLM is trained with the "
                                   "masked-diffusion loss on prompt + continuation (prompt never masked; half the rows "
                                   "masked as a suffix), optionally with dParallel's certainty term.")
    p.add_argument("--model", required=True, help="the DLM student (dir, file:// or s3:// URL)")
    p.add_argument("--teacher", help="the AR teacher (default: the DLM's source AR model, its lineage)")
    p.add_argument("--data", help="where the prompts come from: stdlib[:split], a path or URL (default: stdlib:train)")
    p.add_argument("--output", required=True, help="output checkpoint dir (must not exist)")
    p.add_argument("--prompts", type=int, help="teacher trajectories (default: 512)")
    p.add_argument("--prompt-len", type=int, help="prompt window in tokens (default: 32)")
    p.add_argument("--length", type=int, help="teacher continuation length (default: 96)")
    p.add_argument("--suffix-fraction", type=float, help="share of rows masked as a suffix (default: 0.5)")
    p.add_argument("--certainty", type=float, help="weight of the certainty (entropy) term (default: 0)")
    p.add_argument("--block-causal", type=int, metavar="N",
                   help="experimental: adapt to block-causal attention with blocks of N (decode with --cache block)")
    p.add_argument("--teacher-temperature", type=float,
                   help="0: the teacher's greedy continuations (default); > 0: its samples at this temperature")
    add_training(p, steps=150, batch_size=16, lr=1e-3)
    add_device(p)
    p.set_defaults(func=_distill)


def _distill(args) -> int:
    from dlm_factory.dlm.checkpoint.record import lineage_root
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.paths import materialize
    from dlm_factory.dlm.stages.distill import DistillConfig, distill

    cfg = stage_config(DistillConfig(), args, data=args.data, prompts=args.prompts, prompt_len=args.prompt_len,
                       length=args.length, suffix_fraction=args.suffix_fraction, certainty=args.certainty,
                       block_causal=args.block_causal,
                       teacher_temperature=args.teacher_temperature)
    teacher = args.teacher or lineage_root(materialize(args.model), "")
    if not teacher:
        raise FactoryError(f"{args.model}: no lineage to an AR model recorded; pass --teacher AR_DIR")
    result = distill(args.model, teacher, args.output, cfg, checkpoint_dir=args.checkpoint_dir,
                     progress=sys.stderr.isatty())
    print(json.dumps({"output": args.output, "teacher": teacher, "trajectories": result.trajectories,
                      "teacher_eos_fraction": result.teacher_eos_fraction, "final_loss": result.train.final_loss,
                      "tokens_per_s": result.train.tokens_per_s}))
    return 0
