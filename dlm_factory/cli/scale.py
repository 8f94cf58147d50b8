"""``factory scale``: a size ladder trained with the diffusion and AR objectives, and their scaling laws."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device, validated, with_values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="train a ladder of sizes (DeepSpeed ZeRO, torchrun) and fit L(C) = a*C^-b + c",
                       description="Grow --model to each LAYERSxHIDDEN rung (function-preserving) or take a family of "
                                   "AR checkpoints, train every rung with the diffusion and the AR objective under the "
                                   "same compute budget (C = 6 N D), evaluate each on held-out data, fit the scaling "
                                   "laws, and report the compute multiplier and the compute-optimal size. Writes "
                                   "<output>/{rungs/, scaling.json, scaling.png, REPORT.md, stage.json}; prints one "
                                   "JSON line.")
    p.add_argument("--model", required=True, help="the model to grow, or the family's reference (dir or URL)")
    p.add_argument("--ladder", required=True, help="rungs, comma-separated and increasing: LAYERSxHIDDEN (e.g. "
                                                   "2x64,4x64,4x128) or AR checkpoint dirs of one family")
    p.add_argument("--data", help="training corpus (default: stdlib:train)")
    p.add_argument("--output", required=True, help="output dir or URL (a dir holding another ladder is refused)")
    p.add_argument("--zero", type=int, metavar="0|1|2|3", help="DeepSpeed ZeRO stage (default: 2)")
    p.add_argument("--offload", action="store_true", help="ZeRO CPU offload of the optimizer (and params at stage 3)")
    p.add_argument("--nproc", type=int, help="processes per rung (default: 1; at most the cores/GPUs here)")
    p.add_argument("--budget", type=float, help="FLOPs per rung and objective, C = 6 N D (default: 2e12)")
    p.add_argument("--init", choices=["grow", "scratch"], help="grow the model (default) or random-init each rung")
    p.add_argument("--objectives", help="comma-separated: diffusion,ar (default: both)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: 128)")
    p.add_argument("--batch-size", type=int, help="sequences per step, all processes together (default: 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 2e-3)")
    p.add_argument("--max-chars", type=int, help="corpus cap in characters (default: 3000000)")
    p.add_argument("--memory-limit", type=float, metavar="GIB",
                   help="memory a rung may use, per GPU or the host on CPU (default: what is free now)")
    p.add_argument("--target-compute", type=float, help="budget for the compute-optimal size (default: 10x --budget)")
    add_device(p)
    p.set_defaults(func=_scale)


def _scale(args) -> int:
    from dlm_factory.dlm.stages.scale import ScaleConfig, scale

    def make():
        base = ScaleConfig()
        train = with_values(base.train, batch_size=args.batch_size, lr=args.lr)
        objectives = [s.strip() for s in args.objectives.split(",")] if args.objectives else None
        return with_values(base, ladder=args.ladder, data=args.data, zero=args.zero, nproc=args.nproc,
                           budget=args.budget, init=args.init, objectives=objectives, seq_len=args.seq_len,
                           max_chars=args.max_chars, memory_limit_gb=args.memory_limit,
                           target_compute=args.target_compute, offload=True if args.offload else None,
                           train=train.model_dump())

    cfg = validated(make)
    report = scale(args.model, args.output, cfg, progress=sys.stderr.isatty())
    print(json.dumps({"output": args.output, "plot": report["plot"], "multiplier": report["multiplier"],
                      "laws": {k: v["law"] for k, v in report["fits"].items()},
                      "compute_optimal": {k: v["compute_optimal"] for k, v in report["fits"].items()}},
                     default=str))
    return 0
