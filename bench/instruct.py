"""Instruction-tuning benchmark: diffusion SFT vs AR SFT of the same base, and tuned vs untuned DLM.

Run:  .venv/bin/python bench/instruct.py [--ar DIR] [--dlm DIR] [--steps N] ...

Everything is measured in one run, on the same held-out stdlib instructions (functions
from module files no stage trained on):
- the DLM (``--dlm``, converted from ``--ar``) tuned with LLaDA SFT, with rainbow
  padding (the default) and with EOS padding (LLaDA's original), and the AR base
  (``--ar``) tuned with next-token SFT: same data, rows, steps, batch and learning rate;
- the untuned converted DLM and the untuned AR base, for reference;
- the judge: an AR SFT (seed ``--judge-seed``) of ``--judge-base``, an AR model of
  another size and seed than the contenders' base (default: bench/sampling.py's judge,
  which that bench trains once under $FACTORY_HOME/models), so the judge is neither a
  contender nor the AR baseline's sibling; ``--judge-base`` = ``--ar`` gives the old,
  sibling judge. Every generation is also scored by the untuned AR base, to show why an
  untuned judge misleads;
- the tuned DLM's generations with other semi-AR block sizes (``--block-sizes``).
Every system is evaluated on the same held-out rows (checked). Metrics: conditional
likelihood of the reference response in bits per reference token: exact NLL (AR), and
for a DLM two ELBOs: the response-only bound (prompt + response + EOS, the AR figure's
tokens) and the padded bound (the row padded to L as SFT trains it, per padded token);
the DLMs' response-only bounds are also compared by paired differences on shared draws
(rainbow vs EOS padding, tuned vs untuned). On greedy generations: parse rate, judge NLL
(nats/token), first-line exact match, distinct-2. Prints one JSON line and markdown
tables; writes bench/results/instruct.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import is_done, read_record
from dlm_factory.dlm.data.batching import collate, pad_id
from dlm_factory.dlm.data.sft import ar_row
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.instruct import (
    InstructEvalConfig,
    evaluate_instruct,
    heldout_rows,
    summary,
)
from dlm_factory.dlm.evaluation.likelihood import Estimate, paired_elbo
from dlm_factory.dlm.stages.instruct import InstructConfig, instruct, instruct_key
from dlm_factory.dlm.train.config import TrainConfig
from dlm_factory.home import factory_home


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", default=".factory/models/stdlib-ar", help="AR base checkpoint (the judge is tuned from it)")
    p.add_argument("--dlm", default=".factory/models/stdlib-dlm", help="the DLM converted from --ar")
    p.add_argument("--data", default="stdlib:train")
    p.add_argument("--heldout", default="stdlib:heldout")
    p.add_argument("--steps", type=int, default=800, help="SFT steps, every objective (800: ~4 epochs of the stdlib set)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--judge-base", default=None,
                   help="AR model the judge is tuned from (default: bench/sampling.py's judge, "
                        "$FACTORY_HOME/models/bench-judge-ar-d320-l4-s400-seed1; --ar gives a sibling judge)")
    p.add_argument("--judge-seed", type=int, default=1, help="seed of the judge's AR SFT (the AR baseline uses 0)")
    p.add_argument("--eval-examples", type=int, default=128, help="held-out examples (the stdlib held-out split has ~100)")
    p.add_argument("--gen-examples", type=int, default=128, help="of those, how many are generated")
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--block-sizes", default="8",
                   help="extra sampler block sizes tried on the tuned DLM (generation metrics only; '' for none)")
    p.add_argument("--work", default=None, help="where the tuned models go (default: $FACTORY_HOME/cache/bench-instruct)")
    p.add_argument("--out", default="bench/results/instruct.json")
    return p.parse_args()


def tune(name: str, src: str, cfg: InstructConfig, work: Path) -> tuple[str, dict]:
    """Tune ``src`` into ``work/name``; a re-run reuses a finished model and resumes an interrupted one."""
    out = work / name
    start = time.perf_counter()
    key = instruct_key(src, cfg)
    if not is_done(out, key):
        instruct(src, out, cfg, checkpoint_dir=work / f".ckpt-{name}", progress=False, overwrite=out.exists())
        info = {}
    else:
        info = {"reused": True}
    result = read_record(out).result
    info.update({"seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"],
                 "final_loss": round(result["final_loss"], 4), "padding": result["data"]["padding"],
                 "padding_unbucketed": result["data"]["padding_unbucketed"], "rows": result["data"]["rows"]})
    print(f"tuned {name}: {info} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    return str(out), info


def main() -> int:
    args = parse()
    ar, dlm = str(Path(args.ar).resolve()), str(Path(args.dlm).resolve())
    work = Path(args.work) if args.work else factory_home() / "cache" / "bench-instruct"
    work.mkdir(parents=True, exist_ok=True)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                        log_every=25)
    base_cfg = InstructConfig(data=args.data, response_len=args.response_len, train=train)
    judge_train = train.model_copy(update={"seed": args.judge_seed})
    judge_base = str(Path(args.judge_base or factory_home() / "models" / "bench-judge-ar-d320-l4-s400-seed1").resolve())
    if not Path(judge_base).is_dir():
        raise SystemExit(f"judge base {judge_base} missing: run bench/sampling.py once (it trains it), "
                         "or pass --judge-base")
    jname = f"judge-ar-sft-{args.steps}-seed{args.judge_seed}-{Path(judge_base).name}"
    plan = {  # name -> (source, config)
        f"diffusion-rainbow-sft-{args.steps}": (dlm, base_cfg),
        f"diffusion-eos-sft-{args.steps}": (dlm, base_cfg.model_copy(update={"padding": "eos"})),
        f"ar-sft-{args.steps}": (ar, base_cfg.model_copy(update={"objective": "ar"})),
        jname: (judge_base, base_cfg.model_copy(update={"objective": "ar", "train": judge_train})),
    }
    tuned, timing = {}, {}
    for name, (src, cfg) in plan.items():
        tuned[name], timing[name] = tune(name, src, cfg, work)
    judge = tuned[jname]

    ecfg = InstructEvalConfig(data=args.heldout, response_len=args.response_len, max_examples=args.eval_examples,
                              gen_examples=args.gen_examples, mc_samples=args.mc_samples, judge=judge)
    systems = [("DLM untuned", dlm), ("DLM + diffusion SFT (rainbow)", tuned[f"diffusion-rainbow-sft-{args.steps}"]),
               ("DLM + diffusion SFT (EOS padding)", tuned[f"diffusion-eos-sft-{args.steps}"]),
               ("AR untuned", ar), ("AR + AR SFT", tuned[f"ar-sft-{args.steps}"])]
    base_judge = {"base": load_model(ar)}
    results = {}
    for label, path in systems:
        start = time.perf_counter()
        results[label] = evaluate_instruct(path, ecfg, extra_judges=base_judge)
        rows_used, _ = heldout_rows(load_model(path), ecfg)
        results[label]["row_sources"] = [r.source for r in rows_used]
        results[label]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"evaluated {label}: {summary(results[label])} ({results[label]['seconds']}s)", file=sys.stderr)

    sources = {label: r.get("row_sources") for label, r in results.items()}
    if len({json.dumps(v) for v in sources.values()}) != 1:
        raise SystemExit(f"systems were evaluated on different rows: {sources}")
    rows = {label: {**summary(r), "judge_nll_base": _round(r.get("generation", {}).get("judge_nll_base")),
                    "padded_bits_per_token": _round(r["likelihood"].get("padded_bits_per_token"), 4),
                    "padded_stderr": _round(r["likelihood"].get("padded_stderr"), 4)}
            for label, r in results.items()}
    start = time.perf_counter()
    paired = paired_conditional({"rainbow": tuned[f"diffusion-rainbow-sft-{args.steps}"],
                                 "eos": tuned[f"diffusion-eos-sft-{args.steps}"], "untuned": dlm}, ecfg)
    paired_summary = {k: {"bits_per_token": round(v.bits_per_token, 4), "stderr": round(v.stderr, 4)}
                      for k, v in paired.items()}
    print(f"paired response-only bounds: {paired_summary} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    ablation = sampler_ablation(tuned[f"diffusion-rainbow-sft-{args.steps}"], ecfg,
                                [int(b) for b in args.block_sizes.split(",") if b.strip()], base_judge)
    d_un, d_sft, a_sft = rows["DLM untuned"], rows["DLM + diffusion SFT (rainbow)"], rows["AR + AR SFT"]
    better = {  # does the tuned DLM beat the untuned one? (lower is better for bits and judge NLL)
        "cond_bits_per_token": d_sft["cond_bits_per_token"] < d_un["cond_bits_per_token"],
        "parse_rate": d_sft["parse_rate"] > d_un["parse_rate"],
        "judge_nll": (d_sft["judge_nll"] or float("inf")) < (d_un["judge_nll"] or float("inf")),
        "exact_first_line": d_sft["exact_first_line"] > d_un["exact_first_line"],
        "first_line_similarity": d_sft["first_line_similarity"] > d_un["first_line_similarity"],
    }
    ratios = {
        "dlm_sft_over_untuned_bits": round(d_sft["cond_bits_per_token"] / d_un["cond_bits_per_token"], 3),
        "dlm_sft_over_ar_sft_bits": round(d_sft["cond_bits_per_token"] / a_sft["cond_bits_per_token"], 3),
        "dlm_sft_over_ar_sft_judge_nll": _ratio(d_sft["judge_nll"], a_sft["judge_nll"]),
    }
    examples = results["DLM untuned"]["examples"]
    line = {"bench": "instruct", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "response_len": args.response_len, "eval_examples": examples,
            "gen_examples": min(args.gen_examples, examples), "mc_samples": args.mc_samples, "judge": judge,
            "judge_base": judge_base, "base_judge": ar, "results": rows, "paired_response_bounds": paired_summary,
            "sampler_ablation": ablation, "tuned_dlm_beats_untuned": better,
            "ratios": ratios, "training": timing,
            "samples": {label: r.get("generation", {}).get("samples", [])[:3] for label, r in results.items()}}
    print(json.dumps(line))
    print()
    print("| system | cond. bits/ref. token: response-only (kind) | padded bound (DLM) | parse rate | "
          "judge NLL, AR SFT judge | judge NLL, untuned AR | exact first line | first-line similarity | "
          "distinct-2 | mean length (tok) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        resp = (f"{r['cond_bits_per_token']:.3f} ± {r['stderr']:.3f} (elbo)" if r["kind"] == "elbo"
                else f"{r['cond_bits_per_token']:.3f} (exact nll)")
        padded = "n/a" if r["padded_bits_per_token"] is None else f"{r['padded_bits_per_token']:.3f} ± {r['padded_stderr']:.3f}"
        print(f"| {label} | {resp} | {padded} | {r['parse_rate']:.3f} | "
              f"{_fmt(r['judge_nll'])} | {_fmt(r['judge_nll_base'])} | {r['exact_first_line']:.3f} | "
              f"{r['first_line_similarity']:.3f} | "
              f"{_fmt(r['distinct_2'])} | {_fmt(r['mean_tokens'], 1)} |")
    print()
    print("| response-only bound, paired on shared draws (same rows, same noisy inputs) | bits/ref. token ± stderr |")
    print("|---|---|")
    v = paired_summary["untuned-rainbow"]
    print(f"| rainbow SFT - untuned | {-v['bits_per_token']:+.3f} ± {v['stderr']:.3f} |")
    v = paired_summary["eos-rainbow"]
    print(f"| EOS padding - rainbow padding | {v['bits_per_token']:+.3f} ± {v['stderr']:.3f} |")
    if ablation:
        print()
        print("| tuned DLM (rainbow), threshold sampler | parse rate | judge NLL | exact first line | "
              "first-line similarity | distinct-2 | longest repeat | mean length |")
        print("|---|---|---|---|---|---|---|---|")
        for block, g in ablation.items():
            print(f"| block size {block} | {g['parse_rate']:.3f} | {_fmt(g['judge_nll'])} | {g['exact_first_line']:.3f} | "
                  f"{g['first_line_similarity']:.3f} | "
                  f"{_fmt(g['distinct_2'])} | {_fmt(g['longest_repeat'])} | {_fmt(g['mean_tokens'], 1)} |")
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


def combine(chunks: list[Estimate]) -> Estimate:
    """One estimate from independent chunks (separate seeds): token-weighted mean, variances added."""
    count = sum(e.tokens for e in chunks)
    bits = sum(e.bits_per_token * e.tokens for e in chunks) / count
    stderr = math.sqrt(sum((e.stderr * e.tokens) ** 2 for e in chunks)) / count
    return Estimate(bits, stderr, count, chunks[0].samples, chunks[0].kind)


def paired_conditional(models: dict[str, str], ecfg: InstructEvalConfig) -> dict[str, Estimate]:
    """Response-only conditional ELBOs of diffusion models on shared draws, with ``"<b>-<first>"`` differences.

    Rows are prompt + response + EOS (no padding), so every model scores the same ids whatever padding
    it was tuned with; chunked and seeded as ``conditional_likelihood`` (chunk i: seed + i), which makes
    each model's figure equal to its own response-only bound there. Differences pair on shared draws.
    """
    loaded = {name: load_model(path) for name, path in models.items()}
    first = next(iter(loaded.values()))
    rows, _ = heldout_rows(first, ecfg)
    for name, m in loaded.items():
        other, _ = heldout_rows(m, ecfg)
        if [(r.prompt, r.response) for r in other] != [(r.prompt, r.response) for r in rows]:
            raise SystemExit(f"{name} formats the held-out rows differently: no paired comparison")
    eos, pad = first.tokenizer.eos_token_id, pad_id(first.tokenizer)
    ordered = sorted(rows, key=lambda r: len(r.prompt) + len(r.response))
    denoisers = {name: ModelDenoiser(m) for name, m in loaded.items()}
    per_chunk: dict[str, list[Estimate]] = {}
    for i, lo in enumerate(range(0, len(ordered), ecfg.batch_size)):
        b = collate([ar_row(r, eos) for r in ordered[lo : lo + ecfg.batch_size]], pad)
        est = paired_elbo(denoisers, b["input_ids"], attention_mask=b["attention_mask"], keep=b["prompt_mask"],
                          n=ecfg.mc_samples, seed=ecfg.seed + i, batch_size=ecfg.batch_size)
        for k, v in est.items():
            per_chunk.setdefault(k, []).append(v)
    return {k: combine(v) for k, v in per_chunk.items()}


def sampler_ablation(model: str, ecfg: InstructEvalConfig, block_sizes: list[int], extra_judges: dict) -> dict:
    """Generation metrics of ``model`` with other semi-AR block sizes (LLaDA: smaller blocks curb EOS over-production)."""
    from dlm_factory.dlm.evaluation.instruct import generation_metrics, generations

    if not block_sizes:
        return {}
    loaded, judge = load_model(model), load_model(ecfg.judge)
    rows, _ = heldout_rows(loaded, ecfg)
    rows = rows[: ecfg.gen_examples]
    out = {}
    for block in block_sizes:
        cfg = ecfg.model_copy(update={"sampler": ecfg.sampler.model_copy(update={"block_size": block})})
        g = generation_metrics(loaded, rows, generations(loaded, rows, cfg), judge, extra_judges)
        out[block] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in g.items() if k != "samples"}
        out[block]["samples"] = g["samples"][:2]
        print(f"tuned DLM, block size {block}: {out[block]}", file=sys.stderr)
    return out


def _round(x, n: int = 3):
    return None if x is None else round(x, n)


def _ratio(a, b):
    return None if a is None or b is None else round(a / b, 3)


def _fmt(x, n: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{n}f}"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    sys.exit(main())
