"""Conversion benchmark: does AR -> diffusion conversion beat training a DLM from scratch?

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/convert.py [--base-model DIR] [--steps N] ...

Everything is measured in one run on the same held-out rolling windows
(``dlm.data.corpus.rolling_windows``: whole held-out documents, each starting with the
checkpoint's start token, every token scored once; the AR NLL and every ELBO count the
same tokens):
- quality: ELBO (bits/token) of the converted DLM, the ablations no-shift and
  no-annealing (same steps), and a DLM trained from scratch (same architecture, data and
  recipe; random init) given the converted model's *total* training compute: the AR
  pretraining of the base plus the conversion, at the same batch and sequence length.
  The ELBOs are estimated on shared draws (``paired_elbo``), so each variant's difference
  to the converted model comes with its own, much smaller, standard error. Each row
  reports the training it cost: tokens seen and 6*N*D FLOPs (``compute``);
- speed: diffusion vs AR training throughput (tokens/s) of the same model and batch,
  the two step kinds interleaved so machine load hits both alike.
Trained variants are kept under ``--work`` and reused by a re-run with the same config
(``is_done``). Prints one JSON line and markdown tables; writes bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm.checkpoint.io import load_model, save_model
from dlm_factory.dlm.checkpoint.record import StageRecord, is_done, read_record
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.data.corpus import Blocks, read_documents, rolling_windows, tokenize_blocks
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.diffusion.objective import diffusion_loss
from dlm_factory.dlm.evaluation.likelihood import ar_nll, paired_elbo
from dlm_factory.dlm.stages.bootstrap import ar_objective
from dlm_factory.dlm.stages.convert import ConvertConfig, convert, convert_key, ensure_mask_token
from dlm_factory.dlm.train.config import TrainConfig
from dlm_factory.home import factory_home

CONVERTED = "converted (shift + annealing)"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=".factory/models/stdlib-ar", help="AR checkpoint to convert")
    p.add_argument("--steps", type=int, default=150, help="conversion steps of the converted variants")
    p.add_argument("--scratch-steps", type=int, default=None,
                   help="steps of the from-scratch DLM (default: equal compute, the base's pretraining tokens "
                        "at this batch and length plus --steps)")
    p.add_argument("--ar-tokens", type=int, default=None,
                   help="pretraining tokens of the base (default: read from its stage record)")
    p.add_argument("--anneal-steps", type=int, default=75, help="annealing steps of the annealed variants")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-chars", type=int, default=2_000_000, help="training corpus cap")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out rolling windows (documents in order)")
    p.add_argument("--stride", type=int, default=None, help="tokens scored per window after a document's first "
                                                            "(default: half a window)")
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--throughput-steps", type=int, default=12, help="timed steps per kind (after 2 warm-up)")
    p.add_argument("--work", default=None, help="where the variants go (default: $FACTORY_HOME/cache/bench-convert)")
    p.add_argument("--out", default="bench/results/convert.json")
    return p.parse_args(argv)


# --- compute accounting --------------------------------------------------------------------------

def stage_tokens(record: StageRecord) -> int:
    """Training tokens a stage saw: optimizer steps x sequences per step x sequence length (its config)."""
    cfg = record.config
    return int(cfg["train"]["steps"]) * int(cfg["train"]["batch_size"]) * int(cfg["seq_len"])


def equal_compute_steps(ar_tokens: int, conversion_steps: int, batch_size: int, seq_len: int) -> int:
    """Steps at ``batch_size x seq_len`` that see as many tokens as AR pretraining plus the conversion."""
    return math.ceil(ar_tokens / (batch_size * seq_len)) + conversion_steps


def matmul_params(model) -> int:
    """Parameters that cost FLOPs per token: all but the input embedding (a lookup); the output head counts."""
    emb = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not emb)
    head = model.get_output_embeddings()
    return n + emb.numel() if head is not None and head.weight is emb else n  # a tied head still multiplies


def compute(params: int, tokens: int) -> dict:
    """Training compute: tokens seen and 6*N*D FLOPs (forward + backward; Kaplan et al. 2020)."""
    return {"tokens": tokens, "flops": 6 * params * tokens}


# --- quality -------------------------------------------------------------------------------------

def random_init_copy(base: str, dest: Path) -> str:
    """Same architecture and tokenizer as ``base``, fresh random weights (seed 1234); kept if ``dest`` exists."""
    from transformers import AutoModelForCausalLM

    if not (dest / "config.json").is_file():
        loaded = load_model(base)
        torch.manual_seed(1234)
        loaded.model = AutoModelForCausalLM.from_config(loaded.model.config)
        save_model(loaded, dest, overwrite=dest.exists())
    return str(dest)


def train_variant(src: str, out: Path, cfg: ConvertConfig) -> dict:
    """Convert ``src`` into ``out`` unless it already holds exactly this conversion."""
    key = convert_key(src, cfg)
    reused = is_done(out, key)
    if not reused:  # the checkpoint dir is per config: a resumed run never mixes two configs
        convert(src, out, cfg, progress=False, overwrite=out.exists(),
                checkpoint_dir=out.parent / f".ckpt-{out.name}-{key.digest().removeprefix('sha256:')[:12]}")
    result = read_record(out).result
    return {"reused": reused, "final_train_loss": round(result["final_loss"], 4),
            "train_seconds": result["seconds"], "train_tokens_per_s": result["tokens_per_s"]}


def quality(args, work: Path) -> tuple[list[dict], dict]:
    base = str(Path(args.base_model).resolve())
    ar = load_model(base)
    per_step = args.batch_size * args.seq_len
    if args.ar_tokens is not None:
        ar_tokens, ar_steps = args.ar_tokens, math.ceil(args.ar_tokens / per_step)
    else:
        record = read_record(base)
        if record is None or record.stage != "bootstrap":
            raise SystemExit(f"{base}: no bootstrap record to read its pretraining compute from; pass --ar-tokens")
        ar_tokens, ar_steps = stage_tokens(record), int(record.config["train"]["steps"])
    scratch_steps = args.scratch_steps or equal_compute_steps(ar_tokens, args.steps, args.batch_size, args.seq_len)

    def cfg(steps: int, **kw) -> ConvertConfig:
        train = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=10, log_every=25)
        return ConvertConfig(seq_len=args.seq_len, max_chars=args.max_chars, train=train,
                             **{"anneal_steps": args.anneal_steps, **kw})

    scratch_init = random_init_copy(base, work / "scratch-init")
    variants = {  # name -> (source, config, training tokens including the source's)
        CONVERTED: (base, cfg(args.steps), ar_tokens + args.steps * per_step),
        "ablation: no shift": (base, cfg(args.steps, shift=False), ar_tokens + args.steps * per_step),
        "ablation: no annealing": (base, cfg(args.steps, anneal_steps=0), ar_tokens + args.steps * per_step),
        "from scratch (random init, equal compute)": (scratch_init, cfg(scratch_steps), scratch_steps * per_step),
    }
    params = matmul_params(ar.model)
    w = rolling_windows(ar.tokenizer, read_documents("stdlib:heldout"), args.seq_len, stride=args.stride,
                        max_windows=args.eval_windows, max_positions=ar.max_positions)
    ar_est = ar_nll(ar.model, w.ids, attention_mask=w.attention_mask, keep=w.keep)
    rows = [{"model": "AR base (exact NLL)", "steps": ar_steps, "bits_per_token": ar_est.bits_per_token,
             "stderr": 0.0, **compute(params, ar_tokens)}]
    denoisers, info = {}, {}
    for i, (name, (src, vcfg, tokens)) in enumerate(variants.items()):
        info[name] = {"steps": vcfg.train.steps, **compute(params, tokens), **train_variant(src, work / f"v{i}", vcfg)}
        denoisers[name] = ModelDenoiser(load_model(work / f"v{i}"))
        print(f"[train] {name}: {info[name]}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    est = paired_elbo(denoisers, w.ids, attention_mask=w.attention_mask, keep=w.keep, n=args.mc_samples, seed=0)
    eval_seconds = time.perf_counter() - t0
    for name in denoisers:
        diff = None if name == CONVERTED else est[f"{name}-{CONVERTED}"]
        rows.append({"model": name, **info[name], "bits_per_token": est[name].bits_per_token,
                     "stderr": est[name].stderr,
                     "diff_vs_converted": None if diff is None else diff.bits_per_token,
                     "diff_stderr": None if diff is None else diff.stderr})
        print(f"[quality] {name}: {est[name].bits_per_token:.3f} ± {est[name].stderr:.3f} bits/token", file=sys.stderr)
    meta = {"eval_windows": int(w.ids.shape[0]), "eval_documents": w.documents, "eval_tokens": ar_est.tokens,
            "mc_samples": args.mc_samples, "matmul_params": params, "ar_pretraining_tokens": ar_tokens,
            "scratch_steps": scratch_steps, "eval_seconds": round(eval_seconds, 1)}
    return rows, meta


def throughput(args) -> dict:
    """Interleaved AR and diffusion training steps on two copies of the same model and batches."""
    ar = load_model(args.base_model)
    dl = load_model(args.base_model)
    mask_id, mask, _ = ensure_mask_token(dl)
    spec = DiffusionSpec(mask_token_id=mask_id, mask_token=mask, tokenizer_digest=tokenizer_digest(dl.tokenizer))
    docs = read_documents("stdlib:train", max_chars=300_000)
    blocks = Blocks(tokenize_blocks(ar.tokenizer, docs, args.seq_len))
    opt_ar = torch.optim.AdamW(ar.model.parameters(), lr=1e-4)
    opt_dl = torch.optim.AdamW(dl.model.parameters(), lr=1e-4)
    ar.model.train()
    dl.model.train()

    def step(kind: str, i: int) -> float:
        batch = blocks.batch(i, args.batch_size)
        t0 = time.perf_counter()
        if kind == "ar":
            loss, _ = ar_objective(ar.model, batch, i, None)
            opt = opt_ar
        else:
            loss, _ = diffusion_loss(dl.model, spec, batch["input_ids"], generator=torch.Generator().manual_seed(i))
            opt = opt_dl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"ar": [], "diffusion": []}
    for i in range(args.throughput_steps + 2):
        order = ("ar", "diffusion") if i % 2 == 0 else ("diffusion", "ar")
        for kind in order:
            dt = step(kind, i)
            if i >= 2:
                times[kind].append(dt)
    tokens = args.batch_size * args.seq_len
    ar_tps = tokens / statistics.median(times["ar"])
    dl_tps = tokens / statistics.median(times["diffusion"])
    return {"ar_tokens_per_s": round(ar_tps, 1), "diffusion_tokens_per_s": round(dl_tps, 1),
            "ratio": round(dl_tps / ar_tps, 3), "timed_steps": args.throughput_steps,
            "batch": f"{args.batch_size}x{args.seq_len}"}


def markdown(result: dict) -> str:
    meta = result
    out = [f"| model (held-out: {meta['eval_windows']} windows, {meta['eval_tokens']} tokens) | training steps | "
           "tokens seen | 6ND FLOPs | bits/token ± stderr | Δ vs converted (paired) ± stderr |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in result["quality"]:
        diff = "" if r.get("diff_vs_converted") is None else f"{r['diff_vs_converted']:+.3f} ± {r['diff_stderr']:.3f}"
        steps = (f"{r['steps']} (AR)" if r["model"].startswith("AR") else
                 f"{meta['ar_steps']} (AR) + {r['steps']}" if not r["model"].startswith("from scratch") else
                 f"{r['steps']}")
        err = "exact" if r["stderr"] == 0.0 else f"{r['stderr']:.3f}"
        out.append(f"| {r['model']} | {steps} | {r['tokens'] / 1e6:.2f}M | {r['flops']:.2e} | "
                   f"{r['bits_per_token']:.3f} ± {err} | {diff} |")
    speed = result["throughput"]
    out += ["", f"| training throughput (same model, batch {speed['batch']}) | tokens/s |", "|---|---:|",
            f"| AR (causal LM loss) | {speed['ar_tokens_per_s']:.0f} |",
            f"| diffusion (masked loss) | {speed['diffusion_tokens_per_s']:.0f} |",
            f"| **ratio diffusion / AR** | **{speed['ratio']:.2f}x** |"]
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse(argv)
    wall = time.perf_counter()
    torch.manual_seed(0)
    speed = throughput(args)
    print(f"[speed] {speed}", file=sys.stderr)
    work = Path(args.work) if args.work else factory_home() / "cache" / "bench-convert"
    work.mkdir(parents=True, exist_ok=True)
    rows, meta = quality(args, work)
    by = {r["model"]: r for r in rows}
    scratch = next(r for r in rows if r["model"].startswith("from scratch"))
    result = {"bench": "convert", "base_model": args.base_model, "steps": args.steps,
              "ar_steps": rows[0]["steps"], **meta, "quality": rows,
              "scratch_minus_converted_bits": scratch["diff_vs_converted"],
              "scratch_minus_converted_stderr": scratch["diff_stderr"],
              "converted_minus_ar_bits": by[CONVERTED]["bits_per_token"] - rows[0]["bits_per_token"],
              "throughput": speed, "torch_threads": torch.get_num_threads(),
              "wall_seconds": round(time.perf_counter() - wall, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print()
    print(markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    main()
