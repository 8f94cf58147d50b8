"""CUDA checks (marked `gpu`, skipped without CUDA): the runtime on a GPU pod.

Run on a machine with a GPU: `.venv/bin/python -m pytest -m gpu -s tests/dlm/test_gpu.py`
(the figures, e.g. peak memory, are printed as one JSON line per test).
"""

from __future__ import annotations

import json

import pytest
import torch

from dlm_factory.dlm import runtime

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_runtime(monkeypatch):
    monkeypatch.setattr(runtime, "_current", None)
    rt = runtime.configure("cuda")
    torch.cuda.reset_peak_memory_stats()
    yield rt
    monkeypatch.setattr(runtime, "_current", None)


def test_bf16_training_step_on_cuda_tracks_cpu_fp32(cuda_runtime, tiny_ar):
    from dlm_factory.dlm.checkpoint.io import load_model
    from dlm_factory.dlm.diffusion.objective import ar_loss
    from dlm_factory.dlm.train.config import TrainConfig
    from dlm_factory.dlm.train.loop import train

    ids = torch.randint(10, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    cpu = load_model(tiny_ar, device="cpu")
    with torch.no_grad():
        reference = float(ar_loss(cpu.model, ids)[0])
    loaded = load_model(tiny_ar)
    assert next(loaded.model.parameters()).device.type == "cuda"
    cfg = TrainConfig(steps=2, batch_size=8, warmup_steps=1)
    assert cuda_runtime.precision(cfg.precision) == "bf16"
    result = train(loaded.model, lambda s, m: {"input_ids": ids}, lambda model, b, s, g: ar_loss(model, b["input_ids"]),
                   cfg, progress=False)
    assert result.losses[0][1] == pytest.approx(reference, abs=0.05)  # bf16 autocast vs fp32 on CPU
    print(json.dumps({"test": "bf16_train", "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                      "cpu_fp32_loss": reference, "cuda_bf16_loss": result.losses[0][1]}))


def test_elbo_and_sampler_on_cuda(cuda_runtime, tiny_dlm):
    from dlm_factory.dlm.checkpoint.io import load_model
    from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
    from dlm_factory.dlm.diffusion.objective import corrupt
    from dlm_factory.dlm.evaluation.likelihood import elbo
    from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample

    ids = torch.randint(10, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    on_cpu = elbo(ModelDenoiser(load_model(tiny_dlm, device="cpu")), ids, n=16, seed=3)
    gpu = ModelDenoiser(load_model(tiny_dlm))
    on_gpu = elbo(gpu, ids, n=16, seed=3)
    assert on_gpu.tokens == on_cpu.tokens
    assert on_gpu.bits_per_token == pytest.approx(on_cpu.bits_per_token, abs=0.1)  # other RNG stream, bf16
    g = cuda_runtime.generator(0)
    noisy, masked = corrupt(ids.cuda(), torch.full((4,), 0.5, device="cuda"), gpu.spec, generator=g)
    assert noisy.device.type == "cuda" and 0.3 < masked.float().mean().item() < 0.7
    out = sample(gpu, [[5, 6, 7], [9]], SamplerConfig(length=16, block_size=8, stop_at_eos=False))
    assert [len(r) for r in out] == [16, 16] and all(0 <= t < len(gpu.tokenizer) for r in out for t in r)
    print(json.dumps({"test": "elbo_sampler", "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                      "elbo_cpu": on_cpu.bits_per_token, "elbo_cuda": on_gpu.bits_per_token}))
