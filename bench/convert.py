"""Conversion benchmark: does AR -> diffusion conversion beat training a DLM from scratch?

Run:  .venv/bin/python bench/convert.py [--base-model DIR] [--steps N] ...

Everything is measured in one run on the same held-out stdlib blocks:
- quality: ELBO (bits/token) after the same number of steps for the converted DLM,
  the ablations no-shift and no-annealing, and a DLM trained from scratch (same
  architecture, data and recipe; random init), beside the AR model's exact NLL;
- speed: diffusion vs AR training throughput (tokens/s) of the same model and batch,
  the two step kinds interleaved so machine load hits both alike.
Prints one JSON line and a markdown table; writes bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm.checkpoint.io import load_model, save_model
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.data.corpus import Blocks, read_documents, tokenize_blocks
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.diffusion.objective import diffusion_loss
from dlm_factory.dlm.evaluation.likelihood import ar_nll, elbo
from dlm_factory.dlm.stages.bootstrap import ar_objective
from dlm_factory.dlm.stages.convert import ConvertConfig, convert, ensure_mask_token
from dlm_factory.dlm.train.config import TrainConfig


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=".factory/models/stdlib-ar", help="AR checkpoint to convert")
    p.add_argument("--steps", type=int, default=150, help="training steps per variant")
    p.add_argument("--anneal-steps", type=int, default=75, help="annealing steps of the annealed variants")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-chars", type=int, default=2_000_000, help="training corpus cap")
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--throughput-steps", type=int, default=12, help="timed steps per kind (after 2 warm-up)")
    p.add_argument("--out", default="bench/results/convert.json")
    return p.parse_args()


def random_init_copy(base: str, dest: Path) -> str:
    """Same architecture and tokenizer as ``base``, fresh random weights."""
    from transformers import AutoModelForCausalLM

    loaded = load_model(base)
    torch.manual_seed(1234)
    loaded.model = AutoModelForCausalLM.from_config(loaded.model.config)
    save_model(loaded, dest)
    return str(dest)


def quality(args, work: Path) -> tuple[list[dict], dict]:
    base = args.base_model
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=10, log_every=25)
    common = dict(seq_len=args.seq_len, max_chars=args.max_chars, train=train)
    variants = {
        "converted (shift + annealing)": (base, ConvertConfig(**common, anneal_steps=args.anneal_steps)),
        "ablation: no shift": (base, ConvertConfig(**common, anneal_steps=args.anneal_steps, shift=False)),
        "ablation: no annealing": (base, ConvertConfig(**common, anneal_steps=0)),
        "from scratch (random init)": (random_init_copy(base, work / "scratch-init"),
                                       ConvertConfig(**common, anneal_steps=args.anneal_steps)),
    }
    ar = load_model(base)
    docs = read_documents("stdlib:heldout")
    ids = tokenize_blocks(ar.tokenizer, docs, args.seq_len, max_blocks=args.eval_blocks)
    ar_est = ar_nll(ar.model, ids)
    rows = [{"model": "AR base (exact NLL)", "bits_per_token": ar_est.bits_per_token, "stderr": 0.0,
             "train_seconds": None}]
    for i, (name, (src, cfg)) in enumerate(variants.items()):
        t0 = time.perf_counter()
        result = convert(src, work / f"v{i}", cfg, progress=False)
        seconds = time.perf_counter() - t0
        est = elbo(ModelDenoiser(load_model(work / f"v{i}")), ids, n=args.mc_samples, seed=0)
        rows.append({"model": name, "bits_per_token": est.bits_per_token, "stderr": est.stderr,
                     "final_train_loss": result.final_loss, "train_seconds": round(seconds, 1)})
        print(f"[quality] {name}: {est.bits_per_token:.3f} ± {est.stderr:.3f} bits/token", file=sys.stderr)
    return rows, {"eval_blocks": int(ids.shape[0]), "eval_tokens": ar_est.tokens}


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


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    speed = throughput(args)
    print(f"[speed] {speed}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        rows, meta = quality(args, Path(tmp))
    conv = rows[1]["bits_per_token"]
    scratch = rows[4]["bits_per_token"]
    result = {"bench": "convert", "base_model": args.base_model, "steps": args.steps, **meta,
              "quality": rows, "converted_vs_scratch_bits": round(scratch - conv, 4), "throughput": speed,
              "torch_threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"\n| model (held-out, {meta['eval_tokens']} tokens, {args.steps} steps) | bits/token | ± stderr |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['bits_per_token']:.3f} | {r['stderr']:.3f} |")
    print("\n| training throughput (same model, batch " + speed["batch"] + ") | tokens/s |")
    print("|---|---:|")
    print(f"| AR (causal LM loss) | {speed['ar_tokens_per_s']:.0f} |")
    print(f"| diffusion (masked loss) | {speed['diffusion_tokens_per_s']:.0f} |")
    print(f"| **ratio diffusion / AR** | **{speed['ratio']:.2f}x** |")


if __name__ == "__main__":
    main()
