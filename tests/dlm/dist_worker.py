"""A tiny training run through the shared loop, launched by the distributed tests with ``torchrun``.

    torchrun --nproc_per_node 2 -m tests.dlm.dist_worker OUT.json --zero 2 [--checkpoint-dir D]

The model (a 2-layer Llama, vocabulary 96) and the data (token blocks with a learnable
structure) are built from seeds alone, so every rank and every launch sees the same ones.
Rank 0 writes the loss curve, the final weights' sum and the number of ranks to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

VOCAB, SEQ, MASK = 96, 32, 95


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def blocks(n: int = 256) -> torch.Tensor:
    """Blocks of arithmetic runs (start, step random): predictable from context, so the loss falls."""
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 90, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % 90


def run(out: str, *, zero: int | None, steps: int, batch_size: int, grad_accum: int, checkpoint_dir: str | None,
        checkpoint_every: int, slow_from: int | None) -> dict:
    from dlm_factory.dlm import runtime
    from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
    from dlm_factory.dlm.data.corpus import Blocks
    from dlm_factory.dlm.diffusion.objective import diffusion_loss
    from dlm_factory.dlm.train.config import TrainConfig
    from dlm_factory.dlm.train.deepspeed import zero_config
    from dlm_factory.dlm.train.loop import train

    rt = runtime.configure("cpu")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3, warmup_steps=2,
                      checkpoint_every=checkpoint_every, keep_checkpoints=2, log_every=1,
                      deepspeed=zero_config(zero) if zero is not None else None)
    spec = DiffusionSpec(mask_token_id=MASK, mask_token="[MASK]", shift=True, eps=1e-3, tokenizer_digest="-",
                         source="-", source_digest="-")
    data = Blocks(blocks())
    mb = cfg.micro_batch()

    def batch_fn(step, slot):
        if slow_from is not None and step >= slow_from:
            time.sleep(0.4)  # a long step: room for the test to kill the run mid-training
        return data.batch(step * cfg.slots() + slot, mb, cfg.seed)

    def objective(model, batch, step, generator):
        return diffusion_loss(model, spec, batch["input_ids"], generator=generator)

    model = build_model()
    result = train(model, batch_fn, objective, cfg, checkpoint_dir=checkpoint_dir, progress=False)
    report = {"losses": [v for _, v in result.losses], "final_loss": result.final_loss, "world_size": rt.world_size,
              "resumed_from": result.resumed_from, "weight_sum": float(sum(p.double().sum() for p in model.parameters())),
              "tokens_per_s": result.tokens_per_s}
    if rt.master:
        with open(out, "w") as f:
            json.dump(report, f)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--zero", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--slow-from", type=int)
    a = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run(a.out, zero=a.zero, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
        checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every, slow_from=a.slow_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
