"""dlm.runtime: device choice, precision policy, ranks, and rank-0-only writes."""

from __future__ import annotations

import pytest
import torch

from dlm_factory.dlm import runtime
from dlm_factory.dlm.errors import FactoryError

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def fresh_runtime(monkeypatch):
    """Each test decides the process runtime itself; the previous one is restored afterwards."""
    monkeypatch.setattr(runtime, "_current", None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "FACTORY_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def test_device_choices(fresh_runtime):
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    for bad in ("gpu", "cuda:x", "auto:1", "", "cpu:0:1"):
        with pytest.raises(FactoryError, match="expected auto, cpu, cuda or cuda:N|auto takes no index"):
            runtime.resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(fresh_runtime, capsys):
    from dlm_factory.cli import main

    with pytest.raises(FactoryError, match="CUDA is not available on this machine"):
        runtime.resolve_device("cuda:0")
    assert main(["eval", "--model", "does-not-matter", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda: CUDA is not available")


def test_ranks_come_from_the_launcher_environment(fresh_runtime):
    fresh_runtime.setenv("RANK", "1")
    fresh_runtime.setenv("LOCAL_RANK", "1")
    fresh_runtime.setenv("WORLD_SIZE", "2")
    rt = runtime.configure("cpu")
    assert (rt.rank, rt.local_rank, rt.world_size, rt.master) == (1, 1, 2, False)
    assert runtime.current() is rt
    fresh_runtime.setenv("RANK", "2")
    with pytest.raises(FactoryError, match="RANK=2 is outside WORLD_SIZE=2"):
        runtime.configure("cpu")
    fresh_runtime.setenv("RANK", "one")
    with pytest.raises(FactoryError, match=r"\$RANK='one' is not an integer"):
        runtime.configure("cpu")


def test_factory_device_env_is_the_default(fresh_runtime):
    fresh_runtime.setenv("FACTORY_DEVICE", "cpu")
    assert runtime.current().device == torch.device("cpu") and runtime.current().master


def test_precision_policy_and_generators():
    cpu = runtime.Runtime(device=torch.device("cpu"))
    assert cpu.precision("auto") == "fp32" and cpu.precision("bf16") == "bf16"
    with cpu.autocast("auto"):
        assert not torch.is_autocast_enabled("cpu")
    with cpu.autocast("bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    g = cpu.generator(7)
    assert g.device == torch.device("cpu")
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_only_rank_zero_writes_a_model(fresh_runtime, tiny_ar, tmp_path):
    from dlm_factory.dlm.checkpoint.io import load_model, save_model

    loaded = load_model(tiny_ar, device="cpu")
    fresh_runtime.setattr(runtime, "_current", runtime.Runtime(device=torch.device("cpu"), rank=1, world_size=2))
    save_model(loaded, tmp_path / "rank1")  # barrier is a no-op without a process group
    assert not (tmp_path / "rank1").exists()
    fresh_runtime.setattr(runtime, "_current", runtime.Runtime(device=torch.device("cpu")))
    save_model(loaded, tmp_path / "rank0")
    assert (tmp_path / "rank0" / "model.safetensors").is_file()
