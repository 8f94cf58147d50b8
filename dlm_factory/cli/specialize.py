"""``factory specialize``: one user's QLoRA specialist (docs/specialize.md)."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device, add_training, stage_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("specialize", help="train one user's 4-bit QLoRA specialist DLM on the user's data",
                       description="Load the small DLM --model with 4-bit NF4 linear layers, train LoRA adapters on the "
                                   "masked-diffusion objective on <data>/users/<user>/data (train split), and write the "
                                   "merged 4-bit specialist with its adapter. Prints one JSON line.")
    p.add_argument("--user", required=True, help="user id (^[a-z0-9][a-z0-9._-]{0,63}$)")
    p.add_argument("--model", required=True, help="the small base DLM (dir, file:// or s3:// URL)")
    p.add_argument("--data", help="root holding users/<user>/data/ (dir or URL; default: $FACTORY_HOME)")
    p.add_argument("--output", required=True, help="output dir (must not exist)")
    p.add_argument("--general", help="the general DLM the specialist will join: its tokenizer must match")
    p.add_argument("--rank", type=int, help="LoRA rank (default: 16)")
    p.add_argument("--seq-len", type=int, help="window length (default: 128)")
    add_training(p, steps=500, batch_size=8, lr=5e-3)  # SpecializeConfig's (not imported here: torch stays lazy)
    add_device(p)
    p.set_defaults(func=_specialize)


def _specialize(args) -> int:
    from dlm_factory.dlm.stages.specialize import SpecializeConfig, specialize
    from dlm_factory.home import factory_home

    base = SpecializeConfig()
    qlora = base.qlora.model_copy(update={"rank": args.rank}) if args.rank else base.qlora
    cfg = stage_config(base, args, seq_len=args.seq_len, qlora=qlora.model_dump())
    result = specialize(args.model, args.data or str(factory_home()), args.user, args.output, cfg,
                        general=args.general, checkpoint_dir=args.checkpoint_dir, progress=sys.stderr.isatty())
    print(json.dumps({"user": result.user, "output": result.output, "data_digest": result.data_digest,
                      "final_loss": result.train.final_loss, **result.report}))
    return 0
