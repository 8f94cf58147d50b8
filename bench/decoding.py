"""Decoding benchmark: speculative decoding (DLM drafter, AR verifier), pure diffusion before/after
``distill``, and the collapse study, each side by side against the AR model's generate() with KV cache.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.decoding --threads 1 \\
        --distilled .factory/models/stdlib-dlm-distilled --out bench/results/decoding.json
    .venv/bin/python -m bench.decoding --prompts 4 --lengths 32 --sections speculative   # smoke

(Run as a module from the repository root: it reuses the judge and scoring of bench/sampling.py.)

Three sections (``--sections``), every contender of a section in ONE run, interleaved per prompt
(speculative) or per prompt batch (the others) with the order rotating, so load shared with
other jobs hits all alike:

1. speculative: greedy speculative decoding with each drafter (the DLM, and the distilled DLM
   with ``--distilled``) without and with the drafter's prefix cache (``--refresh``), vs HF
   generate() with its KV cache. Both stop at EOS; every speculative output must equal the AR
   greedy output token for token (counted per contender). Per length: tokens/s and the ratio to
   AR (total tokens over total seconds, and the median of per-prompt ratios), mean tokens
   committed per verification round (accepted drafts + the verifier's token), draft acceptance,
   mean k, drafter positions processed per committed token.
2. diffusion: pure diffusion (threshold sampler; dual cache, or the exact block cache for a
   block-causal model made by ``factory distill --block-causal N``) of each drafter vs AR greedy
   generate() on the same batches, all decoding exactly L tokens: tokens/s, tokens committed per
   step, denoising steps/s, judge NLL ± standard error, paired Δ vs AR greedy, distinct-2,
   longest repeat.
3. collapse: samples at temperature 1 (LLaDA low-confidence remasking, random-order ancestral
   sampling, threshold) of each DLM vs the AR model's own samples at temperature 1: distinct-1,
   distinct-2, longest repeated n-gram, share of the most frequent token, judge NLL, paired Δ vs AR.

The judge is no contender: an AR model trained by the project's bootstrap at another size and
seed (``bench/sampling.py``'s ``judge_config``; here 192 wide, 300 steps, seed 1 by default), read
as text with its own tokenizer, and refused when it has the bytes of a contender.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bench.sampling import (
    Contender,
    autoregressive,
    check_independent,
    clean,
    diffusion,
    ensure_judge,
    judge_config,
    judge_name,
    judge_strength,
    quality,
    run_interleaved,
)
from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import lineage_root
from dlm_factory.dlm.data.corpus import stdlib_documents
from dlm_factory.dlm.diffusion.block_causal import trained_block_size
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.metrics import paired_difference
from dlm_factory.dlm.sampling.generate import ar_generate, encode_prompts
from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample
from dlm_factory.dlm.sampling.speculative import SpeculativeConfig, SpeculativeStats, Speculator
from dlm_factory.home import factory_home


def parse(argv=None) -> argparse.Namespace:
    home = factory_home() / "models"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(home / "stdlib-dlm"), help="the DLM drafter")
    p.add_argument("--distilled", action="append", default=[], help="a distilled DLM (repeat): also a contender")
    p.add_argument("--verifier", default=None, help="the AR model (default: the DLM's lineage)")
    p.add_argument("--judge", help="AR judge (default: the bench judge, trained once under $FACTORY_HOME/models)")
    p.add_argument("--judge-hidden", type=int, default=192, help="bench judge: width (contenders: 256)")
    p.add_argument("--judge-intermediate", type=int, default=512, help="bench judge: MLP width")
    p.add_argument("--judge-steps", type=int, default=300, help="bench judge: training steps")
    p.add_argument("--sections", default="speculative,diffusion,collapse")
    p.add_argument("--prompts", type=int, default=12, help="speculative: held-out prompts")
    p.add_argument("--lengths", default="64,128,256", help="speculative: lengths")
    p.add_argument("--k", type=int, default=4, help="speculative: first draft length (adapted)")
    p.add_argument("--refresh", default="0,16", help="speculative: drafter prefix-cache refresh periods (0: none) "
                                                    "for the DLM and the first --distilled; the others: the last one")
    p.add_argument("--collapse-drafters", type=int, default=2, help="collapse: the first N drafters only")
    p.add_argument("--quality-prompts", type=int, default=16, help="diffusion/collapse: held-out prompts")
    p.add_argument("--batch-size", type=int, default=8, help="diffusion/collapse: prompts per batch")
    p.add_argument("--diffusion-length", type=int, default=128)
    p.add_argument("--thresholds", default="0.9,0.5", help="diffusion: confidence thresholds tau")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--collapse-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--out", default="bench/results/decoding.json")
    return p.parse_args(argv)


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


def short(path: str) -> str:
    return Path(path).name


# ----------------------------------------------------------------------------- speculative


def speculative_section(drafters: dict[str, object], ar, prompts: list[list[int]], lengths: list[int], k: int,
                        refreshes: list[int]) -> list[dict]:
    rows = []
    for length in lengths:
        specs = {f"{name} r={r}": Speculator(d, ar, SpeculativeConfig(length=length, k=k, refresh=r))
                 for i, (name, d) in enumerate(drafters.items()) for r in (refreshes if i < 2 else refreshes[-1:])}
        names = ["ar", *specs]
        stats = {n: SpeculativeStats() for n in specs}
        secs = dict.fromkeys(names, 0.0)
        toks = dict.fromkeys(names, 0)
        ratios = {n: [] for n in specs}
        identical = dict.fromkeys(specs, 0)
        for i, prompt in enumerate(prompts):
            order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
            outs, took = {}, {}
            for who in order:
                t = time.perf_counter()
                outs[who] = ar_generate(ar, [prompt], length)[0] if who == "ar" else specs[who].generate(prompt, stats[who])
                took[who] = time.perf_counter() - t
                secs[who] += took[who]
                toks[who] += len(outs[who])
            for n in specs:
                identical[n] += outs[n] == outs["ar"]
                ratios[n].append((len(outs[n]) / took[n]) / (len(outs["ar"]) / took["ar"]))
        ar_tps = toks["ar"] / secs["ar"]
        for n, s in stats.items():
            rows.append({"length": length, "contender": n, "prompts": len(prompts), "identical": identical[n],
                         "ar_tokens_per_s": round(ar_tps, 1), "tokens_per_s": round(toks[n] / secs[n], 1),
                         "ratio_total": round((toks[n] / secs[n]) / ar_tps, 3),
                         "ratio_median": round(statistics.median(ratios[n]), 3),
                         "tokens_per_round": round(s.tokens_per_round, 3), "acceptance": round(s.acceptance, 3),
                         "mean_k": round(statistics.fmean(s.ks), 2),
                         "draft_positions_per_token": round(s.draft_positions / max(s.tokens, 1), 1)})
            print(f"speculative {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- quality sections


def distinct_1(sequences: list[list[int]]) -> float:
    tokens = [t for s in sequences for t in s]
    return len(set(tokens)) / max(len(tokens), 1)


def top_token_share(sequences: list[list[int]]) -> float:
    """Share of all generated tokens taken by the single most frequent one (1.0: total collapse)."""
    counts = Counter(t for s in sequences for t in s)
    return max(counts.values()) / sum(counts.values()) if counts else float("nan")


def score(contenders: list[Contender], judge, tok, texts: list[str], length: int, reference: str) -> dict:
    rows = {}
    for c in contenders:
        q = quality(judge, tok, texts, c.outputs)
        rows[c.name] = {"seconds": c.seconds, "tokens_per_s": len(texts) * length / c.seconds,
                        "tokens_per_step": length * c.batches / max(c.steps, 1),
                        "steps_per_s": c.steps / c.seconds,
                        "distinct_1": distinct_1(c.outputs), "top_token_share": top_token_share(c.outputs), **q}
    ref = rows[reference]
    for r in rows.values():
        d, se = paired_difference(r["judge_scores"], ref["judge_scores"])
        r["nll_vs_ref"] = {"diff": d, "se": se}
        r["speed_vs_ref"] = r["tokens_per_s"] / ref["tokens_per_s"]
    return rows


def diffusion_section(denoisers: dict[str, ModelDenoiser], ar, judge, texts, prompt_ids, args) -> dict:
    L = args.diffusion_length
    contenders = [Contender("AR generate() greedy", autoregressive(ar, L, 0.0, seed=0))]
    for name, d in denoisers.items():
        cache = "block" if trained_block_size(d.spec) else "dual"  # a block-causal model: its exact block cache
        for tau in [float(x) for x in args.thresholds.split(",")]:
            cfg = SamplerConfig(sampler="threshold", length=L, cache=cache, threshold=tau,
                                block_size=args.block_size, stop_at_eos=False)
            contenders.append(Contender(f"{name} {cache} cache tau={tau:g}", diffusion(d, cfg)))
    run_interleaved(contenders, prompt_ids, args.batch_size)
    return score(contenders, judge, ar.tokenizer, texts, L, "AR generate() greedy")


def collapse_section(denoisers: dict[str, ModelDenoiser], ar, judge, texts, prompt_ids, args) -> dict:
    L = args.collapse_length
    denoisers = dict(list(denoisers.items())[: args.collapse_drafters])
    contenders = [Contender("AR samples t=1", autoregressive(ar, L, 1.0, seed=0))]
    for name, d in denoisers.items():
        for label, kw in (("llada low-confidence", dict(sampler="llada", steps=L)),
                          ("llada low-confidence block 8", dict(sampler="llada", steps=L, block_size=8)),
                          ("llada random order", dict(sampler="llada", steps=L, remasking="random")),
                          ("threshold", dict(sampler="threshold", cache="dual"))):
            kw = {"block_size": args.block_size, **kw}
            cfg = SamplerConfig(length=L, temperature=1.0, stop_at_eos=False, **kw)
            contenders.append(Contender(f"{name} {label} t=1", diffusion(d, cfg)))
    run_interleaved(contenders, prompt_ids, args.batch_size)
    return score(contenders, judge, ar.tokenizer, texts, L, "AR samples t=1")


def frequent_tokens(tokenizer, n: int = 20, max_chars: int = 300_000) -> set[int]:
    """The ``n`` most frequent token ids of the held-out stdlib text (whitespace, newlines, punctuation)."""
    text, counts = "", Counter()
    for doc in stdlib_documents("heldout"):
        text += doc.text
        if len(text) >= max_chars:
            break
    counts.update(tokenizer(text[:max_chars], add_special_tokens=False)["input_ids"])
    return {t for t, _ in counts.most_common(n)}


def order_diagnostic(denoiser, prompt_ids, frequent: set[int], length: int, batch_size: int) -> dict:
    """Where the collapse comes from: the share of the corpus's most frequent tokens among the tokens
    committed in each quarter of the decoding order (one block of ``length``, one token per step, t = 1),
    for confidence order and random order. Confidence order that favours frequent tokens commits
    them first (a high first-quarter share); random order commits them evenly."""
    out = {}
    for remasking in ("low_confidence", "random"):
        cfg = SamplerConfig(sampler="llada", length=length, steps=length, block_size=length, temperature=1.0,
                            remasking=remasking, stop_at_eos=False)
        quarters = [[0, 0] for _ in range(4)]

        def record(step, quarters=quarters):
            q = min(4 * step.step // length, 3)
            for pairs in step.committed:
                for _, token in pairs:
                    quarters[q][0] += token in frequent
                    quarters[q][1] += 1

        for lo in range(0, len(prompt_ids), batch_size):
            sample(denoiser, prompt_ids[lo : lo + batch_size], cfg, on_step=record)
        out[remasking] = [round(f / max(n, 1), 3) for f, n in quarters]
    return out


# ----------------------------------------------------------------------------- report


def _pm(x: float, se: float) -> str:
    return f"{x:.3f} ± {se:.3f}" if not (se is None or math.isnan(se)) else f"{x:.3f}"


def markdown(report: dict) -> str:
    out = []
    if "speculative" in report:
        out += [f"### Speculative greedy vs AR generate() + KV cache ({report['threads']} threads)", "",
                "| length | drafter, prefix-cache refresh | identical to AR greedy | AR tok/s | speculative tok/s | "
                "ratio (total) | ratio (median) | tokens / verification | acceptance | mean k | drafter positions / token |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["speculative"]:
            out.append(f"| {r['length']} | {r['contender']} | {r['identical']}/{r['prompts']} | {r['ar_tokens_per_s']} | "
                       f"{r['tokens_per_s']} | {r['ratio_total']} | {r['ratio_median']} | {r['tokens_per_round']} | "
                       f"{r['acceptance']} | {r['mean_k']} | {r['draft_positions_per_token']} |")
    if "judge" in report:
        st = report["judge"]["strength"]
        out += ["", f"Judge `{Path(report['judge']['path']).name}`: held-out exact NLL {st['judge']['bits_per_token']:.3f} "
                f"bits/token vs the AR contender's {st['ar_contender']['bits_per_token']:.3f}. Judge NLL in nats per judge "
                "token ± its standard error across prompts; Δ: paired difference on the same prompts."]
    for key, title, ref in (("diffusion", "Pure diffusion vs AR greedy generate() + KV", "AR greedy"),
                            ("collapse", "Collapse study: samples at temperature 1", "AR samples")):
        if key not in report:
            continue
        sec = report[key]
        out += ["", f"### {title} (length {sec['length']}, {sec['prompts']} prompts, batch {sec['batch_size']})", "",
                f"| contender | tok/s | x {ref} | tokens/step | steps/s | judge NLL ± se | Δ vs {ref} (paired) | distinct-1 | "
                "distinct-2 | longest repeat | top-token share |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in sec["rows"].items():
            d = r["nll_vs_ref"]
            out.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speed_vs_ref']:.2f} | {r['tokens_per_step']:.2f} | "
                       f"{r['steps_per_s']:.1f} | {_pm(r['judge_nll'], r['judge_nll_se'])} | {d['diff']:+.3f} ± {d['se']:.3f} | "
                       f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {r['longest_repeat']:.1f} | "
                       f"{r['top_token_share']:.3f} |")
    if "collapse" in report:
        out += ["", "Share of the 20 most frequent held-out tokens among the tokens committed in each quarter of the "
                "decoding order (one block, one token per step, t = 1):", "",
                "| DLM | order | 1st quarter | 2nd | 3rd | 4th |", "|---|---|---:|---:|---:|---:|"]
        for name, orders in report["collapse"]["frequent_share_by_quarter"].items():
            for order, q in orders.items():
                out.append(f"| {name} | {order} | " + " | ".join(f"{x:.3f}" for x in q) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    wall = time.perf_counter()
    dlm = load_model(args.model)
    verifier_src = args.verifier or lineage_root(dlm.path, "")
    ar = load_model(verifier_src)
    paths = [args.model, *args.distilled]
    names = [short(p) if [short(q) for q in paths].count(short(p)) == 1 else f"{short(p)}#{i}" for i, p in enumerate(paths)]
    drafters = dict(zip(names, [dlm, *map(load_model, args.distilled)], strict=True))
    report = {"bench": "decoding", "drafters": dict(zip(names, paths, strict=True)), "verifier": verifier_src,
              "threads": torch.get_num_threads()}
    if "speculative" in sections:
        prompts = encode_prompts(ar.tokenizer, prompts_from_heldout(args.prompts))
        report["speculative"] = speculative_section(drafters, ar, prompts, [int(x) for x in args.lengths.split(",")],
                                                    args.k, [int(x) for x in args.refresh.split(",")])
    if sections & {"diffusion", "collapse"}:
        if args.judge:
            judge_info = {"path": args.judge}
        else:
            jcfg = judge_config(hidden=args.judge_hidden, intermediate=args.judge_intermediate, steps=args.judge_steps)
            judge_info = ensure_judge(factory_home() / "models" / judge_name(jcfg), jcfg)
        check_independent(judge_info["path"], {"AR": verifier_src, **report["drafters"]})
        judge = load_model(judge_info["path"])
        judge_info["strength"] = judge_strength(judge, ar)
        report["judge"] = judge_info
        texts = prompts_from_heldout(args.quality_prompts)
        prompt_ids = encode_prompts(ar.tokenizer, texts)
        denoisers = {n: ModelDenoiser(d) for n, d in drafters.items()}
        common = {"prompts": len(texts), "batch_size": args.batch_size}
        if "diffusion" in sections:
            report["diffusion"] = {"length": args.diffusion_length, **common,
                                   "rows": diffusion_section(denoisers, ar, judge, texts, prompt_ids, args)}
        if "collapse" in sections:
            report["collapse"] = {"length": args.collapse_length, **common,
                                  "rows": collapse_section(denoisers, ar, judge, texts, prompt_ids, args)}
            frequent = frequent_tokens(ar.tokenizer)
            report["collapse"]["frequent_tokens"] = ar.tokenizer.convert_ids_to_tokens(sorted(frequent))
            report["collapse"]["frequent_share_by_quarter"] = {
                n: order_diagnostic(d, prompt_ids, frequent, args.collapse_length, args.batch_size)
                for n, d in list(denoisers.items())[: args.collapse_drafters]}
    report["wall_seconds"] = round(time.perf_counter() - wall, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(clean(report), indent=2) + "\n")
    print(json.dumps(clean(report)))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
