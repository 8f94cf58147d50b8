"""Instruction-tuning benchmark: diffusion SFT vs AR SFT of the same base, and tuned vs untuned DLM.

Run:  .venv/bin/python bench/instruct.py [--ar DIR] [--dlm DIR] [--steps N] ...

Everything is measured in one run, on the same held-out stdlib instructions (functions
from module files no stage trained on), with the same AR judge (the base AR model):
- the DLM (``--dlm``, converted from ``--ar``) tuned with LLaDA SFT, and the AR base
  (``--ar``) tuned with next-token SFT: same data, rows, steps, batch and learning rate;
- the untuned converted DLM and the untuned AR base, for reference;
- the tuned DLM's generations with smaller semi-AR blocks (``--block-sizes``).
Metrics: conditional ELBO (DLM) / exact NLL (AR) of the reference response in bits per
reference token, and on greedy generations: parse rate, judge NLL (nats/token),
first-line exact match, distinct-2. Prints one JSON line and a markdown table; writes
bench/results/instruct.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlm.instruct import InstructConfig, InstructEvalConfig, evaluate_instruct, instruct, summary  # noqa: E402
from dlm.paths import factory_home  # noqa: E402
from dlm.train import TrainConfig  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", default=".factory/models/stdlib-ar", help="AR base checkpoint (also the judge)")
    p.add_argument("--dlm", default=".factory/models/stdlib-dlm", help="the DLM converted from --ar")
    p.add_argument("--data", default="stdlib:train")
    p.add_argument("--heldout", default="stdlib:heldout")
    p.add_argument("--steps", type=int, default=200, help="SFT steps, both objectives")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=96)
    p.add_argument("--gen-examples", type=int, default=48)
    p.add_argument("--mc-samples", type=int, default=64)
    p.add_argument("--block-sizes", default="8,4",
                   help="extra sampler block sizes tried on the tuned DLM (generation metrics only; '' for none)")
    p.add_argument("--work", default=None, help="where the tuned models go (default: $FACTORY_HOME/cache/bench-instruct)")
    p.add_argument("--out", default="bench/results/instruct.json")
    return p.parse_args()


def main() -> int:
    args = parse()
    ar, dlm = str(Path(args.ar).resolve()), str(Path(args.dlm).resolve())
    work = Path(args.work) if args.work else factory_home() / "cache" / "bench-instruct"
    work.mkdir(parents=True, exist_ok=True)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                        log_every=25)
    base_cfg = InstructConfig(data=args.data, response_len=args.response_len, train=train)
    tuned, timing = {}, {}
    for objective, src in (("diffusion", dlm), ("ar", ar)):
        out = work / f"{objective}-sft-{args.steps}"
        cfg = base_cfg.model_copy(update={"objective": objective})
        start = time.perf_counter()
        if not (out / "instruct.json").is_file():  # a re-run reuses finished tuning (and resumes an interrupted one)
            result = instruct(src, out, cfg, checkpoint_dir=work / f".ckpt-{objective}-{args.steps}", progress=False)
            timing[objective] = {"seconds": round(result.train.seconds, 1), "tokens_per_s": round(result.tokens_per_s, 1),
                                 "final_loss": round(result.final_loss, 4), "padding": result.data["padding"],
                                 "padding_unbucketed": result.data["padding_unbucketed"], "rows": result.data["rows"]}
        else:
            report = json.loads((out / "instruct.json").read_text())
            timing[objective] = {"reused": True, "final_loss": round(report["final_loss"], 4),
                                 "tokens_per_s": round(report["tokens_per_s"], 1), "padding": report["data"]["padding"],
                                 "padding_unbucketed": report["data"]["padding_unbucketed"], "rows": report["data"]["rows"]}
        tuned[objective] = str(out)
        print(f"tuned {objective}: {timing[objective]} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)

    ecfg = InstructEvalConfig(data=args.heldout, response_len=args.response_len, max_examples=args.eval_examples,
                              gen_examples=args.gen_examples, mc_samples=args.mc_samples, judge=ar)
    systems = [("DLM untuned", dlm), ("DLM + diffusion SFT", tuned["diffusion"]),
               ("AR untuned", ar), ("AR + AR SFT", tuned["ar"])]
    results = {}
    for label, path in systems:
        start = time.perf_counter()
        results[label] = evaluate_instruct(path, ecfg)
        results[label]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"evaluated {label}: {summary(results[label])} ({results[label]['seconds']}s)", file=sys.stderr)

    rows = {label: summary(r) for label, r in results.items()}
    ablation = sampler_ablation(tuned["diffusion"], ecfg, [int(b) for b in args.block_sizes.split(",") if b.strip()])
    d_un, d_sft, a_sft = rows["DLM untuned"], rows["DLM + diffusion SFT"], rows["AR + AR SFT"]
    better = {  # does the tuned DLM beat the untuned one? (lower is better for bits and judge NLL)
        "cond_bits_per_token": d_sft["cond_bits_per_token"] < d_un["cond_bits_per_token"],
        "parse_rate": d_sft["parse_rate"] > d_un["parse_rate"],
        "judge_nll": (d_sft["judge_nll"] or float("inf")) < (d_un["judge_nll"] or float("inf")),
        "exact_first_line": d_sft["exact_first_line"] > d_un["exact_first_line"],
    }
    ratios = {
        "dlm_sft_over_untuned_bits": round(d_sft["cond_bits_per_token"] / d_un["cond_bits_per_token"], 3),
        "dlm_sft_over_ar_sft_bits": round(d_sft["cond_bits_per_token"] / a_sft["cond_bits_per_token"], 3),
        "dlm_sft_over_ar_sft_judge_nll": _ratio(d_sft["judge_nll"], a_sft["judge_nll"]),
    }
    line = {"bench": "instruct", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "response_len": args.response_len, "eval_examples": results["DLM untuned"]["examples"],
            "gen_examples": args.gen_examples, "mc_samples": args.mc_samples, "judge": ar,
            "results": rows, "sampler_ablation": ablation, "tuned_dlm_beats_untuned": better, "ratios": ratios, "training": timing,
            "samples": {label: r.get("generation", {}).get("samples", [])[:2] for label, r in results.items()}}
    print(json.dumps(line))
    print()
    print("| system | cond. bits/token (kind) | parse rate | judge NLL (nats/tok) | exact first line | distinct-2 | mean length (tok) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['cond_bits_per_token']:.3f} ± {r['stderr']:.3f} ({r['kind']}) | {r['parse_rate']:.3f} | "
              f"{_fmt(r['judge_nll'])} | {r['exact_first_line']:.3f} | {_fmt(r['distinct_2'])} | {_fmt(r['mean_tokens'])} |")
    if ablation:
        print()
        print("| tuned DLM, threshold sampler | parse rate | judge NLL | exact first line | distinct-2 | longest repeat | mean length |")
        print("|---|---|---|---|---|---|---|")
        for block, g in ablation.items():
            print(f"| block size {block} | {g['parse_rate']:.3f} | {_fmt(g['judge_nll'])} | {g['exact_first_line']:.3f} | "
                  f"{_fmt(g['distinct_2'])} | {_fmt(g['longest_repeat'])} | {_fmt(g['mean_tokens'])} |")
    print()
    print("| ratio | value |")
    print("|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v} |")
    print(f"| tuned DLM beats untuned on | {', '.join(k for k, v in better.items() if v) or 'nothing'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(line, indent=2) + "\n")
    return 0


def sampler_ablation(model: str, ecfg: InstructEvalConfig, block_sizes: list[int]) -> dict:
    """Generation metrics of ``model`` with other semi-AR block sizes (LLaDA: smaller blocks curb EOS over-production)."""
    from dlm.instruct import generation_metrics, generations, heldout_rows
    from dlm.modeling import load_model

    if not block_sizes:
        return {}
    loaded, judge = load_model(model), load_model(ecfg.judge)
    rows, _ = heldout_rows(loaded, ecfg)
    rows = rows[: ecfg.gen_examples]
    out = {}
    for block in block_sizes:
        cfg = ecfg.model_copy(update={"sampler": ecfg.sampler.model_copy(update={"block_size": block})})
        g = generation_metrics(loaded, rows, generations(loaded, rows, cfg), judge)
        out[block] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in g.items() if k != "samples"}
        out[block]["samples"] = g["samples"][:2]
        print(f"tuned DLM, block size {block}: {out[block]}", file=sys.stderr)
    return out


def _ratio(a, b):
    return None if a is None or b is None else round(a / b, 3)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    sys.exit(main())
