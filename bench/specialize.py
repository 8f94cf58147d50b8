"""Specialist benchmark: is specialisation real, what 4 bits cost, and two users in parallel vs in turn.

    .venv/bin/python bench/specialize.py            # after `make demo` (general model, specialist base, users)

Measured in ONE run:
1. Quality, per demo user, on the user's held-out split (rolling windows, identical for
   every contender: they share one tokenizer), all on shared Monte Carlo draws so the
   differences are paired: the user's specialist (merged 4-bit, as served) vs the
   untuned specialist base, vs the general model, and vs another user's specialist.
2. Size and merge loss, from each specialist's stage record: linear-layer and whole-
   checkpoint bytes of the 4-bit model relative to bf16, and the held-out ELBO change from
   the adapter-on-4-bit model (what was trained) to the merged 4-bit model (what ships).
3. Wall time of two users' specialists trained one after the other vs in two threads of
   one process (as the flow runs them), alternated ``--repeats`` times; the median ratio.

Prints one JSON line, then a markdown report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import read_record
from dlm_factory.dlm.data.corpus import rolling_windows
from dlm_factory.dlm.data.users import DEMO_USERS, user_dir, user_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import paired_elbo
from dlm_factory.dlm.stages.specialize import SpecializeConfig, specialize
from dlm_factory.dlm.train.config import TrainConfig
from dlm_factory.home import factory_home


def parse() -> argparse.Namespace:
    home = factory_home()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--general", default=str(home / "models" / "stdlib-dlm"))
    p.add_argument("--base", default=str(home / "models" / "specialist-dlm"), help="the untuned specialist base")
    p.add_argument("--root", default=str(home), help="holds users/<id>/data and users/<id>/specialist")
    p.add_argument("--users", default=",".join(DEMO_USERS))
    p.add_argument("--windows", type=int, default=24, help="held-out windows per user")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--timing-steps", type=int, default=20, help="training steps of each timed specialist")
    p.add_argument("--repeats", type=int, default=2, help="alternated sequential/parallel timings")
    p.add_argument("--out", default="bench/results/specialize.json")
    return p.parse_args()


def quality(args, users: list[str]) -> list[dict]:
    general = ModelDenoiser(load_model(args.general))
    base = ModelDenoiser(load_model(args.base))
    specialists = {u: ModelDenoiser(load_model(user_dir(args.root, u, "specialist"))) for u in users}
    rows = []
    for i, user in enumerate(users):
        other = users[(i + 1) % len(users)]
        docs = user_documents(args.root, user, "heldout")
        w = rolling_windows(base.tokenizer, docs, args.seq_len, max_windows=args.windows)
        est = paired_elbo({"own": specialists[user], "untuned": base, "general": general, "other": specialists[other]},
                          w.ids, attention_mask=w.attention_mask, keep=w.keep, n=args.mc_samples, seed=0)
        row = {"user": user, "other": other, "tokens": est["own"].tokens}
        for name in ("own", "untuned", "general", "other"):
            row[name] = [round(est[name].bits_per_token, 4), round(est[name].stderr, 4)]
        for name in ("untuned", "general", "other"):  # paired difference: contender - own (> 0: own is better)
            d = est[f"{name}-own"]
            row[f"{name}-own"] = [round(d.bits_per_token, 4), round(d.stderr, 4)]
        rows.append(row)
        print(f"quality {user}: {row}", file=sys.stderr)
    return rows


def sizes(args, users: list[str]) -> list[dict]:
    out = []
    for user in users:
        r = read_record(user_dir(args.root, user, "specialist")).result
        out.append({"user": user, "bytes_4bit": r["bytes"]["merged_4bit"], "bytes_bf16": r["bytes"]["merged_bf16"],
                    "ratio": r["bytes_ratio_4bit_vs_bf16"], "merge_change_relative": r["merge_change_relative"],
                    "adapter_4bit": r["elbo"]["adapter_4bit"], "merged_4bit": r["elbo"]["merged_4bit"],
                    "merged_bf16": r["elbo"]["merged_bf16"]})
    return out


def timing(args, users: list[str]) -> dict:
    cfg = SpecializeConfig(seq_len=args.seq_len, eval_windows=4, mc_samples=2,
                           train=TrainConfig(steps=args.timing_steps, batch_size=8, lr=2e-3, warmup_steps=2))
    pair = users[:2]

    def one(user: str, work: Path) -> None:
        specialize(args.base, args.root, user, work / user, cfg, progress=False)

    seq, par = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            t = time.perf_counter()
            for u in pair:
                one(u, Path(a))
            seq.append(time.perf_counter() - t)
            t = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda u: one(u, Path(b)), pair))
            par.append(time.perf_counter() - t)
    return {"users": pair, "steps": args.timing_steps, "sequential_s": [round(x, 1) for x in seq],
            "parallel_s": [round(x, 1) for x in par],
            "ratio_parallel_over_sequential": round(statistics.median(p / s for p, s in zip(par, seq, strict=True)), 3)}


def main() -> int:
    args = parse()
    users = [u for u in args.users.split(",") if u]
    start = time.perf_counter()
    result = {"bench": "specialize", "general": args.general, "base": args.base, "mc_samples": args.mc_samples,
              "windows": args.windows, "quality": quality(args, users), "size": sizes(args, users),
              "timing": timing(args, users)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print("\n| user | tokens | own specialist | untuned base - own | general - own | other user's - own |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in result["quality"]:
        def f(v):
            return f"{v[0]:+.3f} ± {v[1]:.3f}"
        print(f"| {r['user']} | {r['tokens']} | {r['own'][0]:.3f} ± {r['own'][1]:.3f} | {f(r['untuned-own'])} | "
              f"{f(r['general-own'])} | {f(r['other-own'])} ({r['other']}) |")
    print("\nbits/token on the user's held-out split; a difference > 0 means the user's own specialist is better "
          "(paired on shared draws, ± one standard error).")
    print("\n| user | 4-bit / bf16 bytes, linear layers | whole checkpoint | ELBO adapter on 4-bit | merged 4-bit | "
          "merged bf16 | merge change |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["size"]:
        print(f"| {r['user']} | {r['ratio']['linear']:.3f} | {r['ratio']['checkpoint']:.3f} | "
              f"{r['adapter_4bit']['bits_per_token']:.3f} | {r['merged_4bit']['bits_per_token']:.3f} | "
              f"{r['merged_bf16']['bits_per_token']:.3f} | {100 * r['merge_change_relative']:+.2f}% |")
    t = result["timing"]
    print(f"\nTwo users ({', '.join(t['users'])}, {t['steps']} steps each): parallel / sequential wall time = "
          f"{t['ratio_parallel_over_sequential']} (median of {len(t['parallel_s'])}; sequential {t['sequential_s']} s, "
          f"parallel {t['parallel_s']} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
