"""Scaling benchmark: a 3-rung ladder trained with the diffusion and the AR objective, their laws, the multiplier.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py [--ladder 2x64,3x96,4x128] [--budget 1.5e12] ...

Measured in one run on the stdlib corpus:
- the ladder (default from scratch, ``--init scratch``: both objectives start from random
  weights of each size, the comparison SMDM makes; ``--init grow`` grows the base instead):
  params, tokens, FLOPs (6 N D, the same budget for every rung), held-out ELBO / exact NLL
  in bits/token with error bars (ELBO: Monte Carlo stderr; NLL: spread across windows);
- L(C) = a C^-b + c fitted to each objective's frontier, the compute multiplier the DLM
  needs to reach the AR loss (SMDM: ~16x) and the compute-optimal size at 10x the budget;
- throughput of one rung trained by 2 processes under ZeRO-2 vs 1 process (ZeRO-2 too),
  same global batch, as a ratio (tokens/s of the training loop, startup excluded).
Every rung runs as a ``torchrun`` job (DeepSpeed, gloo on CPU). Prints one JSON line and
markdown tables; writes bench/results/scale.json and the plot beside the ladder's outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base AR checkpoint (default: bootstrap a small one: vocab 1024, 2x64, 16-dim heads)")
    p.add_argument("--ladder", default="1x32,2x48,3x64")
    p.add_argument("--init", choices=["scratch", "grow"], default="scratch")
    p.add_argument("--budget", type=float, default=2.5e12, help="FLOPs per rung and objective")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-chars", type=int, default=4_000_000)
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--throughput-budget", type=float, default=3e11, help="FLOPs of each throughput run")
    p.add_argument("--throughput-repeats", type=int, default=2, help="runs of each process count, interleaved ABBA")
    p.add_argument("--work", help="working dir (default: a temp dir)")
    p.add_argument("--out", default="bench/results/scale.json")
    return p.parse_args()


def main() -> int:
    args = parse()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dlm_factory.dlm import runtime
    from dlm_factory.dlm.evaluation.corpus import EvalConfig
    from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap
    from dlm_factory.dlm.stages.scale import (
        ScaleConfig,
        markdown_report,
        plan_ladder,
        prepare_output,
        run_rung,
        scale,
    )
    from dlm_factory.dlm.train.config import TrainConfig

    runtime.configure("cpu")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FACTORY_HOME", str(work / "home"))
    t_start = time.perf_counter()
    model = args.model
    if not model:
        model = str(work / "base-ar")
        if not Path(model).exists():
            bootstrap(BootstrapConfig(max_chars=args.max_chars, vocab_size=1024, hidden_size=64, num_layers=2,
                                      num_heads=4, intermediate_size=172, seq_len=args.seq_len,
                                      train=TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=6)),
                      model, progress=False)
    train = TrainConfig(steps=1, batch_size=args.batch_size, lr=args.lr, log_every=50, checkpoint_every=200)
    ev = EvalConfig(mc_samples=args.mc_samples, max_windows=args.eval_windows, seq_len=args.seq_len)
    cfg = ScaleConfig(ladder=args.ladder, init=args.init, budget=args.budget, seq_len=args.seq_len,
                      max_chars=args.max_chars, zero=args.zero, nproc=1, train=train, eval=ev)
    t0 = time.perf_counter()
    report = scale(model, work / "ladder", cfg)
    ladder_s = time.perf_counter() - t0

    # Throughput: the middle rung, diffusion, 1 process vs 2 processes (ZeRO-2), same global batch. Runs are
    # interleaved 1, 2, 2, 1, ... (ABBA) so a change in the machine's load hits both alike; each repeat has its
    # own seed, hence its own output and checkpoints (nothing is reused or resumed).
    middle = args.ladder.split(",")[len(args.ladder.split(",")) // 2]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    order = [n for r in range(args.throughput_repeats) for n in ((1, 2) if r % 2 == 0 else (2, 1))]
    for i, nproc in enumerate(order):
        tcfg = cfg.model_copy(update={"ladder": middle, "nproc": nproc, "zero": 2, "objectives": ["diffusion"],
                                      "budget": args.throughput_budget, "min_steps": 5,
                                      "train": train.model_copy(update={"seed": 1000 + i})})
        plan = plan_ladder(model, tcfg)
        out = prepare_output(work / f"throughput-{i}-{nproc}", plan, tcfg, overwrite=True)
        res = run_rung(plan, plan.rungs[0], "diffusion", tcfg, out, threads=1)
        runs[nproc].append({"tokens_per_s": res["tokens_per_s"], "seconds": res["seconds"], "steps": res["steps"],
                            "world_size": res["world_size"], "load_average": os.getloadavg()[0]})
    through = {n: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs), "runs": rs}
               for n, rs in runs.items()}
    ratio = through[2]["tokens_per_s"] / through[1]["tokens_per_s"]
    wall = time.perf_counter() - t_start
    result = {"bench": "scale", "ladder": args.ladder, "init": args.init, "budget": args.budget,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "zero": args.zero,
              "rows": report["rows"], "laws": {k: v["law"] for k, v in report["fits"].items()},
              "compute_optimal": {k: v["compute_optimal"] for k, v in report["fits"].items()},
              "multiplier": report["multiplier"], "plot": report["plot"], "throughput": through,
              "throughput_ratio_2proc_zero2_vs_1proc": ratio, "ladder_seconds": round(ladder_s, 1),
              "wall_seconds": round(wall, 1), "cores": len(os.sched_getaffinity(0)),
              "load_average": os.getloadavg(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, default=str))
    print()
    print(markdown_report(report))
    print("| throughput (diffusion, rung " + middle + ", same global batch) | tokens/s (median) | runs (tokens/s, load) |")
    print("|---|---:|---|")
    for n in (1, 2):
        t = through[n]
        each = ", ".join(f"{r['tokens_per_s']:.0f} @ {r['load_average']:.1f}" for r in t["runs"])
        print(f"| {n} process{'es' if n > 1 else ''}, ZeRO-2 | {t['tokens_per_s']:.0f} | {each} |")
    print(f"| **ratio 2 / 1** | **{ratio:.2f}x** | |")
    print(f"\nwall {wall:.0f} s (ladder {ladder_s:.0f} s); load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
