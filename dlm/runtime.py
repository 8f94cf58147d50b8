"""Device, precision and ranks: decided once per process, honoured by every stage.

The nanoGPT ``train.py`` preamble as a module::

    rt = runtime.current()            # device from --device / $FACTORY_DEVICE ("auto")
    rt.device                         # cuda:<LOCAL_RANK> when CUDA is there, else cpu
    with rt.autocast("auto"): ...     # bf16 autocast on CUDA, fp32 on CPU (or "bf16" there too)
    rt.master                         # rank 0: this process logs, checkpoints, writes outputs
    rt.barrier()                      # ranks wait here for the master's writes

Ranks come from the launcher's environment (``torchrun``/DeepSpeed: ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``); a plain process is rank 0 of 1. The CLI calls
``configure(args.device)`` once; library callers may too, or rely on
``$FACTORY_DEVICE`` (default ``auto``), which is how a Kubernetes pod chooses.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from dlm_factory.dlm.errors import FactoryError

Precision = Literal["auto", "fp32", "bf16"]
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and which rank it is (see the module docstring)."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and outputs, publishes artifacts."""
        return self.rank == 0

    def precision(self, requested: Precision = "auto") -> Literal["fp32", "bf16"]:
        """``auto``: bf16 on CUDA (weights stay fp32 under autocast), fp32 on CPU where bf16 is slower."""
        if requested != "auto":
            return requested
        return "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"

    def autocast(self, requested: Precision = "auto") -> AbstractContextManager:
        """bf16 autocast on this device when the precision policy says so, else a no-op."""
        if self.precision(requested) == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def serve_4bit_dequantized(self) -> bool:
        """Serve 4-bit (bitsandbytes) checkpoints dequantized to fp32 on CPU, as stored on CUDA.

        The weights are stored and downloaded 4-bit either way. On CPU, bitsandbytes' 4-bit
        kernels cost more than the fp32 matmuls of the same dequantized weights at the
        specialists' widths (docs/ensemble.md: 9.0 vs 6.4 ms per cached step of the demo
        specialist), and a specialist's fp32 copy is a few MB; on CUDA the 4-bit kernels are
        what saves memory."""
        return self.device.type != "cuda"

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on this device (CUDA sampling ops refuse a CPU generator)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    @property
    def backend(self) -> str:
        """The collective backend of this device: NCCL on CUDA, gloo on CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    def init_distributed(self) -> bool:
        """Join the process group of the launcher's ranks (once; DeepSpeed reuses it). False in one process."""
        if self.world_size == 1:
            return False
        if not torch.distributed.is_initialized():
            kwargs = {"device_id": self.device} if self.device.type == "cuda" else {}
            torch.distributed.init_process_group(backend=self.backend, **kwargs)
        return True

    def _joined(self) -> bool:
        """Whether collectives reach the other ranks (the process group is up; ``init_distributed`` joins it)."""
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process, or before the process group is up)."""
        if self._joined():
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (the values themselves in one process)."""
        if not self._joined():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_agree(self, value: int) -> bool:
        """Whether every rank holds the same integer ``value`` (True in one process)."""
        if not self._joined():
            return True
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0]) == value and int(-t[1]) == value

    def describe(self) -> dict:
        """What a stage record keeps about where it ran."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "world_size": self.world_size,
                "torch": torch.__version__}


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto|cpu|cuda[:N]`` -> a torch device; asking for CUDA where there is none is a FactoryError."""
    m = _DEVICE.match(requested.strip().lower())
    if m is None:
        raise FactoryError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    kind, index = m[1], m[2]
    if kind == "auto" and index is not None:
        raise FactoryError(f"--device {requested!r}: auto takes no index")
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if available else torch.device("cpu")
    if not available:
        raise FactoryError(f"--device {requested}: CUDA is not available on this machine "
                           f"(torch {torch.__version__}); use --device cpu or auto")
    n = int(index) if index is not None else local_rank % torch.cuda.device_count()
    if n >= torch.cuda.device_count():
        raise FactoryError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", n)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as e:
        raise FactoryError(f"${name}={value!r} is not an integer (set by the launcher: torchrun, DeepSpeed)") from e


_current: Runtime | None = None


def configure(device: str | None = None) -> Runtime:
    """Decide this process's runtime once: ``device`` (else ``$FACTORY_DEVICE``, else auto) and ranks."""
    global _current
    rank, local_rank, world = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise FactoryError(f"RANK={rank} is outside WORLD_SIZE={world}")
    dev = resolve_device(device or os.environ.get("FACTORY_DEVICE", "auto"), local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _current = Runtime(device=dev, rank=rank, local_rank=local_rank, world_size=world)
    return _current


def current() -> Runtime:
    """The runtime decided by ``configure`` (called with the defaults on first use)."""
    return _current if _current is not None else configure()


def model_device(model) -> torch.device:
    """The device a model's parameters live on."""
    return next(model.parameters()).device


def inference_autocast(device: torch.device) -> AbstractContextManager:
    """The precision policy for evaluation and sampling: bf16 autocast on CUDA, fp32 on CPU."""
    return Runtime(device=torch.device(device)).autocast("auto")
