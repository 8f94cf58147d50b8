"""``factory instruct | instruct-eval``: instruction tuning and its held-out evaluation (docs/instruct.md)."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device, add_training, stage_config, validated, with_values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("instruct", help="instruction-tune a diffusion LM (LLaDA SFT) or, with --objective ar, an AR model",
                       description="Supervised fine-tuning on instructions: prompt tokens never masked, response + EOS + "
                                   "padding (rainbow pad tokens by default) masked at rate t, loss divided by the response "
                                   "length. Data: stdlib[:split] "
                                   "(the embedded set) or JSONL lines {\"prompt\",\"response\"} / {\"messages\":[...]}.")
    p.add_argument("--model", required=True, help="base checkpoint: a DLM (dir, file:// or s3:// URL); an AR one needs --objective ar")
    p.add_argument("--data", help="instructions: stdlib[:train|heldout|all] or a JSONL file/dir/URL (default: stdlib:train)")
    p.add_argument("--output", required=True, help="output checkpoint dir (must not exist)")
    p.add_argument("--objective", choices=["diffusion", "ar"], help="diffusion (default) or ar: the AR SFT baseline")
    p.add_argument("--response-len", type=int, help="response length L incl. EOS padding (default: 64)")
    p.add_argument("--response-bucket", type=int, help="pad responses to a multiple of this instead of L")
    p.add_argument("--padding", choices=["rainbow", "eos"],
                   help="what fills the response after its EOS: rainbow (default; a cycle of distinct pad tokens) or eos (LLaDA)")
    p.add_argument("--pad-tokens", type=int, help="rainbow padding: distinct pad tokens in the cycle (default: 7)")
    p.add_argument("--max-prompt-len", type=int, help="longest prompt in tokens (default: model positions - L)")
    p.add_argument("--max-bad-fraction", type=float, help="refuse JSONL with more malformed lines than this (default: 0.05)")
    p.add_argument("--seed", type=int, help="seed of batches and masking (default: 0)")
    add_training(p, steps=100, batch_size=16, lr=1e-3)
    add_device(p)
    p.set_defaults(func=_instruct)

    p = sub.add_parser("instruct-eval", help="held-out instruction metrics; prints one JSON line",
                       description="Conditional ELBO (diffusion) or exact NLL (AR) of the reference responses in bits "
                                   "per token, and on generated responses: parse rate, judge NLL, first-line exact match.")
    p.add_argument("--model", required=True, help="checkpoint dir or URL (diffusion or AR)")
    p.add_argument("--data", help="held-out instructions (default: stdlib:heldout)")
    p.add_argument("--judge", help="AR checkpoint scoring the generations (default: the model's AR base)")
    p.add_argument("--examples", type=int, help="examples for the likelihood (default: 32)")
    p.add_argument("--gen-examples", type=int, help="examples generated (default: 16)")
    p.add_argument("--mc-samples", type=int, help="Monte Carlo samples of t (default: 16)")
    p.add_argument("--response-len", type=int, help="response length L (default: 64)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.add_argument("--block-size", type=int, help="diffusion sampler: semi-autoregressive block size (default: 32)")
    add_device(p)
    p.set_defaults(func=_instruct_eval)


def _instruct(args) -> int:
    from dlm_factory.dlm.stages.instruct import InstructConfig, instruct

    cfg = stage_config(InstructConfig(), args, data=args.data, objective=args.objective,
                       response_len=args.response_len, response_bucket=args.response_bucket, padding=args.padding,
                       pad_tokens=args.pad_tokens, max_prompt_len=args.max_prompt_len,
                       max_bad_fraction=args.max_bad_fraction, train={"seed": args.seed})
    result = instruct(args.model, args.output, cfg, checkpoint_dir=args.checkpoint_dir, progress=sys.stderr.isatty())
    print(json.dumps({"output": args.output, "objective": cfg.objective, "template": result.template,
                      "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s,
                      "rows": result.data["rows"], "bad_lines": result.data["bad_lines"],
                      "empty_responses": result.data["empty_responses"],
                      "pad_fraction": result.data["padding"]["pad_fraction"]}))
    return 0


def _instruct_eval(args) -> int:
    from dlm_factory.dlm.evaluation.instruct import InstructEvalConfig, evaluate_instruct
    from dlm_factory.dlm.sampling.sampler import SamplerConfig

    cfg = validated(lambda: with_values(InstructEvalConfig(), data=args.data, judge=args.judge, max_examples=args.examples,
                                  gen_examples=args.gen_examples, mc_samples=args.mc_samples,
                                  response_len=args.response_len, seed=args.seed,
                                  sampler=with_values(SamplerConfig(), block_size=args.block_size).model_dump()))
    print(json.dumps(evaluate_instruct(args.model, cfg)))
    return 0
