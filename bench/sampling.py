"""Sampler benchmark: speed and quality of diffusion decoding vs the AR model's cached generate().

    .venv/bin/python bench/sampling.py                       # full run (defaults below)
    .venv/bin/python bench/sampling.py --prompts 4 --lengths 16,32 --model M --ar-model A   # smoke

Measured in ONE run, with the contenders interleaved per prompt batch (the order
rotates from batch to batch), so machine load shared with other jobs hits every
contender alike:
1. Fast-dLLM threshold decoding (tau 0.9, dual and prefix cache) vs LLaDA low-confidence
   remasking with steps = length, at each length: speed-up and the relative quality gap.
2. The fastest diffusion configuration vs the AR checkpoint's ``generate()`` with KV
   cache: tokens/s ratio, with the AR sampling temperature whose judge NLL is closest
   (matched quality: within +-2%, or the nearest one, reported as such).
3. Unsupervised CFG weight vs judge NLL and parse rate.

Every contender decodes exactly ``length`` tokens per prompt (no early stop on EOS,
AR included), so tokens/s compare like with like; quality is measured on the
response cut at its first EOS. Quality: judge NLL (nats/token under the AR
checkpoint), parse rate of prompt + response (complete lines only), distinct-2 and
longest repeated n-gram. Prints one JSON line, then a markdown report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.data.batching import left_pad
from dlm_factory.dlm.data.corpus import stdlib_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.metrics import judge_nll, parse_rate, repetition
from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample
from dlm_factory.home import factory_home


def heldout_prompts(n: int, lines: int = 3) -> list[str]:
    """The first ``lines`` lines of functions in the held-out stdlib files, dedented; files taken round-robin."""
    per_file = []
    for doc in stdlib_documents("heldout"):
        src = doc.text.splitlines()
        found = []
        for i, line in enumerate(src[: len(src) - lines]):
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":"):
                found.append(textwrap.dedent("\n".join(src[i : i + lines])) + "\n")
        per_file.append(found)
    prompts, k = [], 0
    while len(prompts) < n and any(k < len(f) for f in per_file):
        prompts += [f[k] for f in per_file if k < len(f)]
        k += 1
    return prompts[:n]


def cut_at_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    return (ids[: ids.index(eos)], True) if eos in ids else (ids, False)


def snippet(prompt: str, response: str, ended: bool) -> str:
    """Prompt + response; a response cut by the length limit loses its last, partial line."""
    text = prompt + response
    return text if ended else text[: text.rfind("\n") + 1]


class Contender:
    """One way of decoding; accumulates wall time, sequential steps and outputs over the prompt batches."""

    def __init__(self, name, run):
        self.name, self.run = name, run
        self.seconds, self.outputs, self.steps, self.batches = 0.0, [], 0, 0

    def __call__(self, batch_ids):
        start = time.perf_counter()
        out, steps = self.run(batch_ids)
        self.seconds += time.perf_counter() - start
        self.outputs += out
        self.steps += steps
        self.batches += 1


def diffusion(denoiser, cfg: SamplerConfig):
    def run(batch):
        events = []
        out = sample(denoiser, batch, cfg, on_step=lambda e: events.append(None))
        return out, len(events)

    return run


def autoregressive(ar, length: int, temperature: float, seed: int):
    from transformers import GenerationConfig

    tok = ar.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    gc = GenerationConfig(max_new_tokens=length, eos_token_id=[],  # [] = never stop early (None would inherit EOS)
                          pad_token_id=tok.pad_token_id, use_cache=True, **sampling)

    def run(batch):
        ids, am = left_pad(batch, tok.pad_token_id)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = ar.model.generate(input_ids=ids, attention_mask=am, generation_config=gc)
        return out[:, ids.shape[1] :].tolist(), length

    return run


def quality(judge, tokenizer, prompts: list[str], prompt_ids, outputs) -> dict:
    eos = tokenizer.eos_token_id
    cut = [cut_at_eos(o, eos) for o in outputs]
    responses = [c for c, _ in cut]
    texts = [snippet(p, tokenizer.decode(c, skip_special_tokens=True), ended)
             for p, (c, ended) in zip(prompts, cut, strict=True)]
    rep = repetition(responses)
    return {"judge_nll": judge_nll(judge, prompt_ids, responses), "parse_rate": parse_rate(texts),
            "distinct_2": rep["distinct_2"], "longest_repeat": rep["longest_repeat"],
            "mean_tokens_before_eos": sum(map(len, responses)) / len(responses)}


def run_interleaved(contenders: list[Contender], prompt_ids, batch_size: int) -> None:
    batches = [prompt_ids[i : i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    for bi, batch in enumerate(batches):
        k = bi % len(contenders)
        for c in contenders[k:] + contenders[:k]:  # rotate who goes first
            c(batch)
        print(f"  batch {bi + 1}/{len(batches)} done", file=sys.stderr, flush=True)


def rel(a: float, b: float) -> float:
    """Relative difference of a vs b ((a - b) / |b|)."""
    return (a - b) / abs(b) if b else float("nan")


def clean(obj):
    """NaN -> null, so the JSON line is strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def main(argv=None) -> int:
    home = factory_home() / "models"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(home / "stdlib-dlm"), help="diffusion checkpoint")
    ap.add_argument("--ar-model", default=str(home / "stdlib-ar"), help="AR checkpoint: the baseline and the judge")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    ap.add_argument("--lengths", default="64,128,256", help="response lengths")
    ap.add_argument("--block-size", type=int, default=32, help="semi-AR block size")
    ap.add_argument("--cfg-weights", default="0,0.5,1.0,1.5", help="CFG weights for the CFG table")
    ap.add_argument("--cfg-length", type=int, default=64, help="response length of the CFG table")
    ap.add_argument("--ar-temperatures", default="0,0.7,1.0", help="AR sampling temperatures (0 = greedy)")
    ap.add_argument("--nocache-max-length", type=int, default=128,
                    help="run the cache-less threshold contender only up to this length (it costs like LLaDA)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    ar_temps = [float(x) for x in args.ar_temperatures.split(",")]

    dlm, ar = load_model(args.model), load_model(args.ar_model)
    if dlm.spec is None or ar.spec is not None:
        raise SystemExit("--model must be a diffusion checkpoint and --ar-model an AR one")
    denoiser = ModelDenoiser(dlm)
    tok = dlm.tokenizer
    prompts = heldout_prompts(args.prompts)
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    B = args.block_size
    report = {"bench": "sampling", "model": args.model, "ar_model": args.ar_model, "prompts": len(prompts),
              "batch_size": args.batch_size, "block_size": B, "threads": torch.get_num_threads(),
              "mean_prompt_tokens": sum(map(len, prompt_ids)) / len(prompt_ids), "lengths": {}}

    def fixed(**kw):
        return SamplerConfig(block_size=B, stop_at_eos=False, **kw)

    for L in lengths:
        print(f"length {L}", file=sys.stderr, flush=True)
        contenders = [
            Contender("llada", diffusion(denoiser, fixed(sampler="llada", length=L, steps=L))),
            Contender("threshold_dual", diffusion(denoiser, fixed(sampler="threshold", length=L, cache="dual"))),
            Contender("threshold_prefix", diffusion(denoiser, fixed(sampler="threshold", length=L, cache="prefix"))),
            Contender("threshold_dual_tau0.5", diffusion(denoiser, fixed(sampler="threshold", length=L, cache="dual",
                                                                           threshold=0.5))),
            Contender("threshold_dual_block8", diffusion(denoiser, SamplerConfig(
                sampler="threshold", length=L, cache="dual", block_size=8, stop_at_eos=False))),
        ] + [Contender(f"ar_t{t:g}", autoregressive(ar, L, t, seed=0)) for t in ar_temps]
        if L <= args.nocache_max_length:
            contenders.insert(3, Contender("threshold_nocache", diffusion(denoiser, fixed(
                sampler="threshold", length=L, cache="none"))))
        run_interleaved(contenders, prompt_ids, args.batch_size)
        rows = {}
        for c in contenders:
            q = quality(ar, tok, prompts, prompt_ids, c.outputs)
            steps = c.steps / c.batches  # sequential model calls per batch
            rows[c.name] = {"seconds": c.seconds, "tokens_per_s": len(prompts) * L / c.seconds,
                            "steps_per_batch": steps, "tokens_per_step": L / steps, **q}
        base = rows["llada"]
        for r in rows.values():
            r["speedup_vs_llada"] = base["seconds"] / r["seconds"]
            r["nll_rel_vs_llada"] = rel(r["judge_nll"], base["judge_nll"])
            r["parse_rel_vs_llada"] = rel(r["parse_rate"], base["parse_rate"])
        diff = [n for n in rows if not n.startswith("ar_")]
        best = max(diff, key=lambda n: rows[n]["tokens_per_s"])
        ar_names = [n for n in rows if n.startswith("ar_")]
        match = min(ar_names, key=lambda n: abs(rel(rows[n]["judge_nll"], rows[best]["judge_nll"])))
        report["lengths"][str(L)] = {
            "rows": rows,
            "threshold_dual_vs_llada": {"speedup": rows["threshold_dual"]["speedup_vs_llada"],
                                        "nll_rel": rows["threshold_dual"]["nll_rel_vs_llada"],
                                        "parse_rel": rows["threshold_dual"]["parse_rel_vs_llada"]},
            "best_vs_ar": {"best": best, "ar_matched": match,
                           "nll_rel_vs_ar": rel(rows[best]["judge_nll"], rows[match]["judge_nll"]),
                           "matched_within_2pct": abs(rel(rows[best]["judge_nll"], rows[match]["judge_nll"])) <= 0.02,
                           "tokens_per_s_ratio": rows[best]["tokens_per_s"] / rows[match]["tokens_per_s"],
                           "ratio_vs_ar_greedy": rows[best]["tokens_per_s"] / rows[ar_names[0]]["tokens_per_s"]},
        }

    print(f"cfg table (length {args.cfg_length})", file=sys.stderr, flush=True)
    weights = [float(w) for w in args.cfg_weights.split(",")]
    contenders = [Contender(f"cfg_{w:g}", diffusion(denoiser, fixed(sampler="threshold", length=args.cfg_length,
                                                                     cache="dual", cfg_weight=w)))
                  for w in weights]
    run_interleaved(contenders, prompt_ids, args.batch_size)
    report["cfg"] = [{"cfg_weight": w, "seconds": c.seconds, **quality(ar, tok, prompts, prompt_ids, c.outputs)}
                     for w, c in zip(weights, contenders, strict=True)]

    line = json.dumps(clean(report))
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    out = [f"### Sampling benchmark ({report['prompts']} held-out prompts, batch {report['batch_size']}, "
           f"block {report['block_size']}, {report['threads']} threads)", ""]
    out += ["| length | contender | tok/s | speed-up vs LLaDA | tokens/step | judge NLL | Δ NLL | parse rate | Δ parse | distinct-2 | longest repeat | tokens before EOS |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for L, entry in report["lengths"].items():
        for name, r in entry["rows"].items():
            out.append(f"| {L} | {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_llada']:.2f}x | {r['tokens_per_step']:.2f} | "
                       f"{r['judge_nll']:.3f} | {r['nll_rel_vs_llada']:+.1%} | {r['parse_rate']:.2f} | "
                       f"{r['parse_rel_vs_llada']:+.1%} | {r['distinct_2']:.3f} | {r['longest_repeat']:.1f} | "
                       f"{r['mean_tokens_before_eos']:.1f} |")
    out += ["", "| length | threshold+dual cache vs LLaDA (steps = length) | best diffusion vs AR generate() |", "|---:|---|---|"]
    for L, entry in report["lengths"].items():
        t, b = entry["threshold_dual_vs_llada"], entry["best_vs_ar"]
        out.append(f"| {L} | {t['speedup']:.2f}x faster, NLL {t['nll_rel']:+.1%}, parse {t['parse_rel']:+.1%} | "
                   f"{b['best']}: {b['tokens_per_s_ratio']:.2f}x the tok/s of {b['ar_matched']} "
                   f"(NLL {b['nll_rel_vs_ar']:+.1%}{', matched' if b['matched_within_2pct'] else ', NOT matched'}); "
                   f"{b['ratio_vs_ar_greedy']:.2f}x greedy AR |")
    out += ["", "| CFG weight | judge NLL | parse rate | distinct-2 | seconds |", "|---:|---:|---:|---:|---:|"]
    for r in report["cfg"]:
        out.append(f"| {r['cfg_weight']:g} | {r['judge_nll']:.3f} | {r['parse_rate']:.2f} | {r['distinct_2']:.3f} | "
                   f"{r['seconds']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
