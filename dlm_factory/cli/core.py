"""``factory bootstrap | convert | eval``: the foundation commands."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device, add_training, stage_config, validated, with_values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bootstrap", help="train the tiny stdlib tokenizer + AR base model",
                       description="Train a byte-level BPE tokenizer and a tiny Llama AR model on the "
                                   "interpreter's stdlib source; save an HF checkpoint dir.")
    p.add_argument("--output", required=True, help="output checkpoint dir (must not exist)")
    add_training(p, steps=400, batch_size=16, lr=2e-3)
    add_device(p)
    p.set_defaults(func=_bootstrap)

    p = sub.add_parser("convert", help="convert an AR checkpoint into a masked-diffusion LM",
                       description="DiffuLLaMA-style conversion: mask token, attention annealing, shift, "
                                   "masked-diffusion loss. Writes an HF dir with diffusion.json.")
    p.add_argument("--base-model", required=True, help="AR checkpoint: dir, file:// or s3:// URL, or hub id")
    p.add_argument("--output", required=True, help="output dir (must not exist)")
    p.add_argument("--data", help="adaptation corpus: stdlib[:split], a path or URL (default: stdlib:train:exclude=<the demo users' packages>)")
    p.add_argument("--anneal-steps", type=int, help="causal -> bidirectional annealing steps (default: 100)")
    p.add_argument("--no-shift", action="store_true", help="predict token i at position i (ablation)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: 128)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config path")
    add_training(p, steps=200, batch_size=16, lr=1e-3)
    add_device(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", help="ELBO (diffusion) or exact NLL (AR) in bits/token; prints one JSON line")
    p.add_argument("--model", required=True, help="checkpoint dir or URL")
    p.add_argument("--data", help="corpus (default: stdlib:heldout:exclude=<the demo users' packages>)")
    p.add_argument("--mc-samples", type=int, help="Monte Carlo samples of t (default: 128)")
    p.add_argument("--max-windows", "--max-blocks", dest="max_windows", type=int,
                   help="windows evaluated, documents in order (default: 32)")
    p.add_argument("--seq-len", type=int, help="window length, start token included (default: 128)")
    p.add_argument("--stride", type=int, help="tokens scored per window after a document's first (default: half a window)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    add_device(p)
    p.set_defaults(func=_eval)


def _bootstrap(args) -> int:
    from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap

    cfg = stage_config(BootstrapConfig(), args)
    result = bootstrap(cfg, args.output, checkpoint_dir=args.checkpoint_dir, progress=sys.stderr.isatty())
    print(json.dumps({"output": args.output, "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s}))
    return 0


def _convert(args) -> int:
    from dlm_factory.dlm.stages.convert import ConvertConfig, convert

    cfg = stage_config(ConvertConfig(), args, data=args.data, anneal_steps=args.anneal_steps, seq_len=args.seq_len,
                       shift=False if args.no_shift else None, train={"deepspeed": args.deepspeed})
    result = convert(args.base_model, args.output, cfg, checkpoint_dir=args.checkpoint_dir,
                     progress=sys.stderr.isatty())
    print(json.dumps({"output": args.output, "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s}))
    return 0


def _eval(args) -> int:
    from dlm_factory.dlm.evaluation.corpus import EvalConfig, evaluate

    cfg = validated(lambda: with_values(EvalConfig(), data=args.data, mc_samples=args.mc_samples,
                                  max_windows=args.max_windows, seq_len=args.seq_len, stride=args.stride,
                                        seed=args.seed))
    print(json.dumps(evaluate(args.model, cfg)))
    return 0
