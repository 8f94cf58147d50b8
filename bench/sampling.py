"""Sampler benchmark: speed and quality of diffusion decoding vs the AR model's cached generate().

    .venv/bin/python bench/sampling.py --threads 1            # full run (defaults below)
    .venv/bin/python bench/sampling.py --prompts 4 --lengths 16,32 --model M --ar-model A --judge J   # smoke

Measured in ONE run, with the contenders interleaved per prompt batch (the order
rotates from batch to batch), so machine load shared with other jobs hits every
contender alike:
1. Fast-dLLM threshold decoding (tau 0.9, dual and prefix cache) vs LLaDA low-confidence
   remasking with steps = length, at each length: speed-up and the paired quality gap.
2. The fastest diffusion configuration vs the AR checkpoint's ``generate()`` with KV
   cache: tokens/s ratio, with the AR sampling temperature whose judge NLL is closest
   (matched quality: within +-2%, or the nearest one, reported as such).
3. Unsupervised CFG weight vs judge NLL and parse rate.

The judge is no contender: an AR model of another size and seed, trained for the
purpose by the project's own bootstrap on the stdlib train split (``--judge`` names
another; built once and reused from ``$FACTORY_HOME/models``). It reads every
contender's output the same way, as text: the prompt as a document start (its own
start token), the response decoded and re-encoded by its own tokenizer. Judge NLL is
pooled over tokens (a ratio estimator); its error bar is the standard error across
prompts, and differences between contenders are paired over the same prompts.

Every contender decodes exactly ``length`` tokens per prompt (no early stop on EOS,
AR included), so tokens/s compare like with like; quality is measured on the
response cut at its first EOS. Quality: judge NLL (nats per judge token), parse
rate of prompt + response (complete lines only), distinct-2 and longest repeated
n-gram. Prints one JSON line, then a markdown report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import is_done, model_digest, read_record
from dlm_factory.dlm.data.batching import left_pad
from dlm_factory.dlm.data.corpus import read_documents, rolling_windows, stdlib_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import ar_nll
from dlm_factory.dlm.evaluation.metrics import (
    judge_nlls,
    paired_difference,
    parse_rate,
    pooled_mean,
    repetition,
)
from dlm_factory.dlm.sampling.generate import encode_prompts
from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap, bootstrap_key
from dlm_factory.dlm.train.config import TrainConfig
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


def judge_config(hidden: int = 320, layers: int = 4, heads: int = 4, intermediate: int = 864, steps: int = 400,
                 seed: int = 1) -> BootstrapConfig:
    """The independent judge: the bootstrap recipe (stdlib train split, same corpus cap, batch and lr as the
    contenders' base) at another size and seed. Default 320 wide (contenders: 256), 4 layers, seed 1 (0)."""
    return BootstrapConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=intermediate,
                           train=TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup_steps=30, seed=seed,
                                             log_every=50))


def judge_name(cfg: BootstrapConfig) -> str:
    return (f"bench-judge-ar-d{cfg.hidden_size}-l{cfg.num_layers}-s{cfg.train.steps}-seed{cfg.train.seed}")


def ensure_judge(path: Path, cfg: BootstrapConfig) -> dict:
    """Train the judge into ``path`` unless it already holds exactly this bootstrap (then reuse it)."""
    start = time.perf_counter()
    reused = is_done(path, bootstrap_key(cfg))
    if not reused:
        print(f"training the judge {path} (once; later runs reuse it)", file=sys.stderr, flush=True)
        bootstrap(cfg, path, progress=False, checkpoint_dir=path.parent / f".ckpt-{path.name}",
                  overwrite=path.exists())
    result = read_record(path).result
    return {"path": str(path), "reused": reused, "train_seconds": result.get("seconds"),
            "final_loss": result.get("final_loss"), "setup_seconds": round(time.perf_counter() - start, 1),
            "config": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                       "intermediate_size": cfg.intermediate_size, "steps": cfg.train.steps, "seed": cfg.train.seed}}


def check_independent(judge_path: str, contenders: dict[str, str]) -> None:
    """Refuse a judge that is a contender (same weights, config and tokenizer: the same bytes)."""
    jd = model_digest(judge_path)
    for role, path in contenders.items():
        if model_digest(path) == jd:
            raise SystemExit(f"--judge {judge_path} is the {role} contender ({path}): a judge is never a contender")


def judge_scores(judge, prompts: list[str], texts: list[str]) -> list[tuple[float, int]]:
    """(total NLL in nats, judge tokens) of each response text given its prompt, read as text by the judge.

    The judge encodes the prompt as a document start (its own start token, as the contenders were
    prompted with theirs) and the response with its own tokenizer, so every contender (diffusion or AR,
    whatever its tokenizer) is scored by one rule. An empty response scores (0, 0).
    """
    tok = judge.tokenizer
    p_ids = encode_prompts(tok, prompts)
    conts = [tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
    return judge_nlls(judge, p_ids, conts)




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


def quality(judge, tokenizer, prompts: list[str], outputs, contender_judge=None) -> dict:
    """Quality of one contender's outputs; ``judge_scores`` keeps the per-prompt judge figures for pairing."""
    eos = tokenizer.eos_token_id
    cut = [cut_at_eos(o, eos) for o in outputs]
    responses = [c for c, _ in cut]
    decoded = [tokenizer.decode(c, skip_special_tokens=True) for c in responses]
    texts = [snippet(p, r, ended) for p, r, (_, ended) in zip(prompts, decoded, cut, strict=True)]
    rep = repetition(responses)
    scores = judge_scores(judge, prompts, decoded)
    nll, se = pooled_mean(scores)
    out = {"judge_nll": nll, "judge_nll_se": se, "judge_tokens": sum(n for _, n in scores),
           "parse_rate": parse_rate(texts), "distinct_2": rep["distinct_2"],
           "longest_repeat": rep["longest_repeat"],
           "mean_tokens_before_eos": sum(map(len, responses)) / len(responses), "judge_scores": scores}
    if contender_judge is not None:  # for comparison only: how the old self-judging scored the same text
        out["contender_judge_nll"] = pooled_mean(judge_scores(contender_judge, prompts, decoded))[0]
    return out


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


def judge_strength(judge, ar, windows: int = 64) -> dict:
    """Exact held-out NLL (bits/token) of the judge and of the AR contender on the same rolling windows
    (each with its own tokenizer; the figures are comparable when the tokenizers are equal)."""
    docs = read_documents("stdlib:heldout")
    out = {}
    for role, m in (("judge", judge), ("ar_contender", ar)):
        w = rolling_windows(m.tokenizer, docs, 128, max_windows=windows, max_positions=m.max_positions)
        est = ar_nll(m.model, w.ids, attention_mask=w.attention_mask, keep=w.keep)
        out[role] = {"bits_per_token": round(est.bits_per_token, 4), "tokens": est.tokens}
    out["same_tokenizer"] = judge.tokenizer.get_vocab() == ar.tokenizer.get_vocab()
    return out


def compare(rows: dict, a: str, b: str) -> dict:
    """Judge NLL of contender a vs b on the same prompts: paired difference (nats/token) and relative gap."""
    d, se = paired_difference(rows[a]["judge_scores"], rows[b]["judge_scores"])
    return {"diff": d, "se": se, "rel": rel(rows[a]["judge_nll"], rows[b]["judge_nll"]),
            "resolved": bool(abs(d) > 2 * se) if not math.isnan(se) else False}


def main(argv=None) -> int:
    home = factory_home() / "models"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(home / "stdlib-dlm"), help="diffusion checkpoint")
    ap.add_argument("--ar-model", default=str(home / "stdlib-ar"), help="AR checkpoint: the baseline (never the judge)")
    ap.add_argument("--judge", help="AR checkpoint that judges (default: the bench judge, trained once under "
                                    "$FACTORY_HOME/models with --judge-* and reused)")
    ap.add_argument("--judge-hidden", type=int, default=320, help="bench judge: width (the contenders' base: 256)")
    ap.add_argument("--judge-layers", type=int, default=4, help="bench judge: transformer blocks")
    ap.add_argument("--judge-heads", type=int, default=4, help="bench judge: attention heads")
    ap.add_argument("--judge-intermediate", type=int, default=864, help="bench judge: MLP width")
    ap.add_argument("--judge-steps", type=int, default=400, help="bench judge: training steps (batch 16x128)")
    ap.add_argument("--judge-seed", type=int, default=1, help="bench judge: seed (the contenders' base: 0)")
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
    wall = time.perf_counter()

    dlm, ar = load_model(args.model), load_model(args.ar_model)
    if dlm.spec is None or ar.spec is not None:
        raise SystemExit("--model must be a diffusion checkpoint and --ar-model an AR one")
    if args.judge:
        judge_info = {"path": args.judge, "reused": True}
    else:
        jcfg = judge_config(args.judge_hidden, args.judge_layers, args.judge_heads, args.judge_intermediate,
                            args.judge_steps, args.judge_seed)
        judge_info = ensure_judge(home / judge_name(jcfg), jcfg)
    check_independent(judge_info["path"], {"AR": args.ar_model, "diffusion": args.model})
    judge = load_model(judge_info["path"])
    if judge.spec is not None:
        raise SystemExit("--judge must be an AR checkpoint")
    judge_info["strength"] = judge_strength(judge, ar)
    print(f"judge: {judge_info}", file=sys.stderr, flush=True)
    denoiser = ModelDenoiser(dlm)
    tok = dlm.tokenizer
    prompts = heldout_prompts(args.prompts)
    prompt_ids = encode_prompts(tok, prompts)  # as a document starts: the start token, then the text
    B = args.block_size
    report = {"bench": "sampling", "model": args.model, "ar_model": args.ar_model, "judge": judge_info,
              "prompts": len(prompts), "batch_size": args.batch_size, "block_size": B,
              "threads": torch.get_num_threads(),
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
            q = quality(judge, tok, prompts, c.outputs, contender_judge=ar)
            steps = c.steps / c.batches  # sequential model calls per batch
            rows[c.name] = {"seconds": c.seconds, "tokens_per_s": len(prompts) * L / c.seconds,
                            "steps_per_batch": steps, "tokens_per_step": L / steps, **q}
        base = rows["llada"]
        for name, r in rows.items():
            r["speedup_vs_llada"] = base["seconds"] / r["seconds"]
            r["nll_vs_llada"] = compare(rows, name, "llada")
            r["parse_rel_vs_llada"] = rel(r["parse_rate"], base["parse_rate"])
        diff = [n for n in rows if not n.startswith("ar_")]
        best = max(diff, key=lambda n: rows[n]["tokens_per_s"])
        ar_names = [n for n in rows if n.startswith("ar_")]
        match = min(ar_names, key=lambda n: abs(rel(rows[n]["judge_nll"], rows[best]["judge_nll"])))
        vs_ar = compare(rows, best, match)
        report["lengths"][str(L)] = {
            "rows": rows,
            "threshold_dual_vs_llada": {"speedup": rows["threshold_dual"]["speedup_vs_llada"],
                                        "nll": rows["threshold_dual"]["nll_vs_llada"],
                                        "parse_rel": rows["threshold_dual"]["parse_rel_vs_llada"]},
            "best_vs_ar": {"best": best, "ar_matched": match, "nll": vs_ar,
                           "matched_within_2pct": abs(vs_ar["rel"]) <= 0.02,
                           "tokens_per_s_ratio": rows[best]["tokens_per_s"] / rows[match]["tokens_per_s"],
                           "ratio_vs_ar_greedy": rows[best]["tokens_per_s"] / rows[ar_names[0]]["tokens_per_s"]},
        }

    print(f"cfg table (length {args.cfg_length})", file=sys.stderr, flush=True)
    weights = [float(w) for w in args.cfg_weights.split(",")]
    contenders = [Contender(f"cfg_{w:g}", diffusion(denoiser, fixed(sampler="threshold", length=args.cfg_length,
                                                                     cache="dual", cfg_weight=w)))
                  for w in weights]
    run_interleaved(contenders, prompt_ids, args.batch_size)
    cfg_rows = {c.name: {"cfg_weight": w, "seconds": c.seconds, **quality(judge, tok, prompts, c.outputs)}
                for w, c in zip(weights, contenders, strict=True)}
    for name, r in cfg_rows.items():
        r["nll_vs_w0"] = compare(cfg_rows, name, contenders[0].name)
    report["cfg"] = list(cfg_rows.values())
    report["wall_seconds"] = round(time.perf_counter() - wall, 1)

    line = json.dumps(clean(report))
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(markdown(report))
    return 0


def _pm(x: float, se: float, n: int = 3) -> str:
    return f"{x:.{n}f} ± {se:.{n}f}" if not math.isnan(se) else f"{x:.{n}f}"


def _diff(c: dict) -> str:
    return f"{c['diff']:+.3f} ± {c['se']:.3f} ({c['rel']:+.1%})"


def markdown(report: dict) -> str:
    j = report["judge"]
    cfg = j.get("config", {})
    size = f"d={cfg['hidden_size']}, {cfg['num_layers']} layers, {cfg['steps']} steps, seed {cfg['seed']}; " if cfg else ""
    st = j["strength"]
    out = [f"### Sampling benchmark ({report['prompts']} held-out prompts, batch {report['batch_size']}, "
           f"block {report['block_size']}, {report['threads']} threads)", "",
           f"Judge: `{Path(j['path']).name}` ({size}held-out exact NLL {st['judge']['bits_per_token']:.3f} "
           f"bits/token vs the AR contender's {st['ar_contender']['bits_per_token']:.3f}"
           f"{', same tokenizer' if st['same_tokenizer'] else ', own tokenizer'}). Judge NLL in nats per judge "
           "token ± its standard error across prompts; Δ: paired difference vs LLaDA on the same prompts.", ""]
    out += ["| length | contender | tok/s | speed-up vs LLaDA | tokens/step | judge NLL | Δ NLL vs LLaDA | parse rate | distinct-2 | longest repeat | tokens before EOS |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for L, entry in report["lengths"].items():
        for name, r in entry["rows"].items():
            delta = "" if name == "llada" else _diff(r["nll_vs_llada"])
            out.append(f"| {L} | {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_llada']:.2f}x | {r['tokens_per_step']:.2f} | "
                       f"{_pm(r['judge_nll'], r['judge_nll_se'])} | {delta} | {r['parse_rate']:.2f} | "
                       f"{r['distinct_2']:.3f} | {r['longest_repeat']:.1f} | {r['mean_tokens_before_eos']:.1f} |")
    out += ["", "| length | threshold+dual cache vs LLaDA (steps = length) | best diffusion vs AR generate() |", "|---:|---|---|"]
    for L, entry in report["lengths"].items():
        t, b = entry["threshold_dual_vs_llada"], entry["best_vs_ar"]
        out.append(f"| {L} | {t['speedup']:.2f}x faster, judge NLL {_diff(t['nll'])}, parse {t['parse_rel']:+.1%} | "
                   f"{b['best']}: {b['tokens_per_s_ratio']:.2f}x the tok/s of {b['ar_matched']} "
                   f"(judge NLL {_diff(b['nll'])}{', matched' if b['matched_within_2pct'] else ', NOT matched'}); "
                   f"{b['ratio_vs_ar_greedy']:.2f}x greedy AR |")
    out += ["", "| CFG weight | judge NLL | Δ vs w = 0 | parse rate | distinct-2 | seconds |", "|---:|---:|---:|---:|---:|---:|"]
    for r in report["cfg"]:
        delta = "" if r["cfg_weight"] == report["cfg"][0]["cfg_weight"] else _diff(r["nll_vs_w0"])
        out.append(f"| {r['cfg_weight']:g} | {_pm(r['judge_nll'], r['judge_nll_se'])} | {delta} | {r['parse_rate']:.2f} | "
                   f"{r['distinct_2']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    sys.exit(main())
