"""Decoding benchmark: speculative decoding (DLM drafter, AR verifier) vs the AR model's generate() with KV cache.

    .venv/bin/python bench/decoding.py                 # after `make demo` (stdlib-dlm and its AR source)
    .venv/bin/python bench/decoding.py --prompts 4 --lengths 32   # smoke

Measured in ONE run, contenders interleaved per prompt (the order alternates), so load
shared with other jobs hits both alike. Both decode greedily from the same prompt ids
(the checkpoint's start token first) and stop at EOS; speculative greedy must reproduce
the AR output token for token, and the bench checks it on every prompt. Reported per length: tokens/s
of each, their ratio (median over prompts of the per-prompt ratio, and total tokens over
total seconds), mean tokens committed per verification round, draft acceptance, and
whether every output was identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import lineage_root
from dlm_factory.dlm.data.corpus import stdlib_documents
from dlm_factory.dlm.sampling.generate import ar_generate, encode_prompts
from dlm_factory.dlm.sampling.speculative import SpeculativeConfig, SpeculativeStats, Speculator
from dlm_factory.home import factory_home


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(factory_home() / "models" / "stdlib-dlm"), help="the DLM drafter")
    p.add_argument("--verifier", default=None, help="the AR model (default: the DLM's lineage)")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--lengths", default="64,128,256")
    p.add_argument("--k", type=int, default=4, help="first draft length (adapted)")
    p.add_argument("--draft-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--out", default="bench/results/decoding.json")
    return p.parse_args()


def prompts_from_heldout(n: int, lines: int = 3) -> list[str]:
    """The first ``lines`` lines of ``def`` blocks in held-out stdlib files, one file after another."""
    out = []
    for doc in stdlib_documents("heldout"):
        src = doc.text.splitlines()
        for i, line in enumerate(src[: max(0, len(src) - lines)]):
            if line.startswith("def ") and line.rstrip().endswith(":"):
                out.append("\n".join(src[i : i + lines]) + "\n")
                break
        if len(out) == n:
            break
    return out


def main() -> int:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    dlm = load_model(args.model)
    verifier_src = args.verifier or lineage_root(dlm.path, "")
    ar = load_model(verifier_src)
    texts = prompts_from_heldout(args.prompts)
    prompts = encode_prompts(ar.tokenizer, texts)
    rows = []
    for length in [int(x) for x in args.lengths.split(",") if x]:
        cfg = SpeculativeConfig(length=length, k=args.k, draft_steps=args.draft_steps)
        spec = Speculator(dlm, ar, cfg)
        stats = SpeculativeStats()
        ar_s = sp_s = 0.0
        ratios, identical, ar_tokens, sp_tokens = [], 0, 0, 0
        for i, prompt in enumerate(prompts):
            order = ["ar", "spec"] if i % 2 == 0 else ["spec", "ar"]
            seconds, outs = {}, {}
            for who in order:
                t = time.perf_counter()
                if who == "ar":  # HF generate() with its KV cache; both stop at the same EOS
                    outs[who] = ar_generate(ar, [prompt], length)[0]
                else:
                    outs[who] = spec.generate(prompt, stats)
                seconds[who] = time.perf_counter() - t
            identical += outs["ar"] == outs["spec"]
            ar_s += seconds["ar"]
            sp_s += seconds["spec"]
            ar_tokens += len(outs["ar"])
            sp_tokens += len(outs["spec"])
            ratios.append((len(outs["spec"]) / seconds["spec"]) / (len(outs["ar"]) / seconds["ar"]))
        row = {"length": length, "prompts": len(prompts), "identical": identical,
               "ar_tokens_per_s": round(ar_tokens / ar_s, 1), "spec_tokens_per_s": round(sp_tokens / sp_s, 1),
               "ratio_total": round((sp_tokens / sp_s) / (ar_tokens / ar_s), 3),
               "ratio_median": round(statistics.median(ratios), 3),
               "tokens_per_round": round(stats.tokens_per_round, 3), "acceptance": round(stats.acceptance, 3),
               "mean_k": round(statistics.fmean(stats.ks), 2)}
        rows.append(row)
        print(f"decoding {row}", file=sys.stderr)
    result = {"bench": "decoding", "drafter": args.model, "verifier": verifier_src, "k": args.k,
              "draft_steps": args.draft_steps, "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print("\n| length | identical to AR greedy | AR generate() tok/s | speculative tok/s | ratio (total) | "
          "ratio (median) | tokens / round | acceptance | mean k |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['identical']}/{r['prompts']} | {r['ar_tokens_per_s']} | {r['spec_tokens_per_s']} | "
              f"{r['ratio_total']} | {r['ratio_median']} | {r['tokens_per_round']} | {r['acceptance']} | {r['mean_k']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
