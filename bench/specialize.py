"""Specialist benchmark: is specialisation real, what 4 bits cost, and two users in parallel vs in turn.

    .venv/bin/python bench/specialize.py --small-budget     # builds its models (cached), then measures

The models come from ``bench/user_models.py`` (the factory's own stages, cached by stage
keys): the general DLM and the specialist base are trained on the stdlib *without* the
demo users' packages (``GENERAL_TRAIN``), so no contender has seen a user's files, and
each demo user gets a QLoRA specialist on its train split.

Measured in ONE run:
1. Quality, per demo user, on the user's held-out split (rolling windows, identical for
   every contender: they share one tokenizer), all on shared Monte Carlo draws so the
   differences are paired: the user's specialist (merged 4-bit, as served) vs the
   untuned specialist base, vs the general model, and vs another user's specialist.
2. Size and merge loss, from each specialist's stage record: linear-layer and whole-
   checkpoint bytes of the 4-bit model relative to bf16 (embeddings and an untied head are
   stored NF4 too: ``dlm.checkpoint.nf4``), the bytes with and without double quantization
   of the linear layers (the export keeps the smaller), and the held-out ELBO change from
   the adapter-on-4-bit model (what was trained) to the merged 4-bit model (what ships).
3. Wall time of two users' specialists trained one after the other vs at once in two
   threads of one process (as the flow runs them), alternated ``--repeats`` times, the
   order of the two modes swapped every repeat; the median ratio. Both modes run in worker
   threads with the same torch thread count (``--threads``): a first run of this bench
   timed the sequential mode in the main thread with 2 intra-op threads, which on the
   loaded 2-core machine is ~8x slower than a worker thread (OpenMP threads competing for
   busy cores), and reported an impossible 0.15x.

Prints one JSON line, then a markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from user_models import add_arguments, build

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import read_record
from dlm_factory.dlm.data.corpus import rolling_windows
from dlm_factory.dlm.data.users import user_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import paired_elbo
from dlm_factory.dlm.stages.specialize import specialize
from dlm_factory.home import factory_home


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--windows", type=int, default=24, help="held-out windows per user")
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (per job, both timing modes)")
    p.add_argument("--timing-steps", type=int, default=30, help="training steps of each timed specialist")
    p.add_argument("--repeats", type=int, default=3, help="alternated sequential/parallel timings")
    p.add_argument("--out", default="bench/results/specialize.json")
    return p.parse_args(argv)


def quality(args, m) -> list[dict]:
    users = m.users
    general = ModelDenoiser(load_model(m.general))
    base = ModelDenoiser(load_model(m.base))
    specialists = {u: ModelDenoiser(load_model(m.specialists[u])) for u in users}
    rows = []
    for i, user in enumerate(users):
        other = users[(i + 1) % len(users)]
        docs = user_documents(m.root, user, "heldout", heldout_fraction=m.spec_config.heldout_fraction)
        w = rolling_windows(base.tokenizer, docs, m.spec_config.seq_len, max_windows=args.windows)
        est = paired_elbo({"own": specialists[user], "untuned": base, "general": general, "other": specialists[other]},
                          w.ids, attention_mask=w.attention_mask, keep=w.keep, n=args.mc_samples, seed=0)
        row = {"user": user, "other_user": other, "tokens": est["own"].tokens}
        for name in ("own", "untuned", "general", "other"):
            row[name] = [round(est[name].bits_per_token, 4), round(est[name].stderr, 4)]
        for name in ("untuned", "general", "other"):  # paired difference: contender - own (> 0: own is better)
            d = est[f"{name}-own"]
            row[f"{name}-own"] = [round(d.bits_per_token, 4), round(d.stderr, 4)]
        rows.append(row)
        print(f"quality {user}: {row}", file=sys.stderr)
    return rows


def sizes(m) -> list[dict]:
    out = []
    for user in m.users:
        r = read_record(m.specialists[user]).result
        out.append({"user": user, "bytes_4bit": r["bytes"]["merged_4bit"], "bytes_bf16": r["bytes"]["merged_bf16"],
                    "ratio": r["bytes_ratio_4bit_vs_bf16"], "merge_change_relative": r["merge_change_relative"],
                    "adapter_4bit": r["elbo"]["adapter_4bit"], "merged_4bit": r["elbo"]["merged_4bit"],
                    "merged_bf16": r["elbo"]["merged_bf16"], "export": r.get("export")})
    return out


def timing(args, m) -> dict:
    """Two users' specialists (the bench's config, ``--timing-steps`` steps) one after the other vs at once."""
    cfg = m.spec_config.model_copy(update={"eval_windows": 4, "mc_samples": 2, "train": m.spec_config.train.model_copy(
        update={"steps": args.timing_steps, "warmup_steps": min(args.timing_steps - 1, 5)})})
    pair = m.users[:2]

    def one(user: str, work: Path) -> float:
        t = time.perf_counter()
        specialize(m.base, m.root, user, work / user, cfg, progress=False)
        return time.perf_counter() - t

    def run(workers: int) -> tuple[float, list[float]]:
        with tempfile.TemporaryDirectory(prefix="bench-specialize-") as tmp, ThreadPoolExecutor(workers) as pool:
            t = time.perf_counter()  # a fresh output dir every time: nothing is reused
            each = list(pool.map(lambda u: one(u, Path(tmp)), pair))
            return time.perf_counter() - t, each

    seq, par, each = [], [], {"sequential": [], "parallel": []}
    run(1)  # warm-up: first-use costs (imports, kernels) are paid before any timed run
    for r in range(args.repeats):
        for mode in (("sequential", "parallel") if r % 2 == 0 else ("parallel", "sequential")):
            wall, jobs = run(1 if mode == "sequential" else 2)
            (seq if mode == "sequential" else par).append(wall)
            each[mode].append([round(x, 1) for x in jobs])
    return {"users": pair, "steps": args.timing_steps, "threads_per_job": args.threads,
            "sequential_s": [round(x, 1) for x in seq], "parallel_s": [round(x, 1) for x in par], "per_job_s": each,
            "ratio_parallel_over_sequential": round(statistics.median(p / s for p, s in zip(par, seq, strict=True)), 3),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    m = build(args, default_work=factory_home() / "bench-users")
    built = time.perf_counter() - start
    params = {k: sum(p.numel() for p in load_model(path).model.parameters())
              for k, path in (("general", m.general), ("base", m.base))}
    result = {"bench": "specialize", "work": str(m.work), "params": params, "mc_samples": args.mc_samples,
              "windows": args.windows, "specialize_config": m.spec_config.model_dump(), "build_seconds": m.seconds,
              "quality": quality(args, m), "size": sizes(m), "timing": timing(args, m)}
    result["seconds"] = {"build": round(built, 1), "total": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(markdown(result))
    return 0


def markdown(r0: dict) -> str:
    params, sc = r0["params"], r0["specialize_config"]
    tc = sc["train"]
    out = []
    out.append(f"\nGeneral DLM {params['general']:,} parameters, specialist base {params['base']:,} "
          f"({params['general'] / params['base']:.1f}x smaller); specialists: QLoRA rank {sc['qlora']['rank']}, "
          f"{tc['steps']} steps at lr {tc['lr']:g}, batch {tc['batch_size']}.")
    out.append("\n| user | tokens | own specialist | untuned base - own | general - own | other user's - own |")
    out.append("|---|---:|---:|---:|---:|---:|")
    def f(v):
        return f"{v[0]:+.3f} ± {v[1]:.3f}"

    for r in r0["quality"]:
        out.append(f"| {r['user']} | {r['tokens']} | {r['own'][0]:.3f} ± {r['own'][1]:.3f} | {f(r['untuned-own'])} | "
              f"{f(r['general-own'])} | {f(r['other-own'])} ({r['other_user']}) |")
    out.append("\nbits/token on the user's held-out split; a difference > 0 means the user's own specialist is better "
          "(paired on shared draws, ± one standard error).")
    out.append("\n| user | bytes bf16 | 4-bit | 4-bit / bf16, linear layers | whole checkpoint | "
               "double quant (bytes with / without) | ELBO adapter on 4-bit | merged 4-bit | merged bf16 | merge change |")
    out.append("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in r0["size"]:
        ex = r.get("export") or {}
        both = ex.get("checkpoint_bytes", {})
        dq = (f"{'yes' if ex.get('double_quant') else 'no'} ({both.get('double_quant', '-')} / "
              f"{both.get('single_quant', '-')})") if ex else "-"
        out.append(f"| {r['user']} | {r['bytes_bf16']['checkpoint']} | {r['bytes_4bit']['checkpoint']} | "
              f"{r['ratio']['linear']:.3f} | {r['ratio']['checkpoint']:.3f} | {dq} | "
              f"{r['adapter_4bit']['bits_per_token']:.3f} | {r['merged_4bit']['bits_per_token']:.3f} | "
              f"{r['merged_bf16']['bits_per_token']:.3f} | {100 * r['merge_change_relative']:+.2f}% |")
    t = r0["timing"]
    out.append(f"\nTwo users ({', '.join(t['users'])}, {t['steps']} steps each): parallel / sequential wall time = "
          f"{t['ratio_parallel_over_sequential']} (median of {len(t['parallel_s'])}; sequential {t['sequential_s']} s, "
          f"parallel {t['parallel_s']} s; {t['threads_per_job']} torch thread(s) per job; load average "
          f"{t['load_average']}).")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
