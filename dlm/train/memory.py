"""Memory a training run will need, estimated before it starts (so a rung that cannot fit is refused).

Per rank, with N parameters, R ranks and AdamW (ZeRO, Rajbhandari et al. 2020, section 3):

    weights     4N fp32 (bf16: 2N working copy)        / R at ZeRO-3
    gradients   4N (bf16: 2N)                          / R at ZeRO >= 2
    optimizer   8N Adam moments                        / R at ZeRO >= 1
    master      4N fp32 copy of the partition          / R, ZeRO >= 1 (DeepSpeed keeps one in fp32 too)
    activations per layer s*b*h*(34 + 5*a*s/h) bytes in 16-bit (Korthikanti et al. 2022, no
                recomputation; doubled in fp32) plus the logits, 3 * b*s*V*4 bytes (logits,
                their softmax and its gradient)
    runtime     0.5 GiB per process on CPU (the imports measured 0.26 GiB; doubled for data,
                tokenizer and engine), 1 GiB per GPU process (CUDA context and allocator slack)

CPU offload moves the optimizer (and master) to host memory, and at ZeRO-3 the weights too.
On CPU all ranks share the host: the job needs R x per-rank + offloaded bytes. On GPUs each
rank needs its own device's share, and offloaded bytes come out of the host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30


@dataclass
class MemoryEstimate:
    params: int
    ranks: int
    zero: int | None  # None: plain torch, one process
    offload: bool
    weights: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    host_offload: float  # per rank, in host memory

    @property
    def per_rank(self) -> float:
        """Bytes on one rank's device (the host on CPU), offloaded bytes excluded."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in ("weights", "gradients", "optimizer",
                                                                          "activations", "runtime"))
        off = f", offloaded to host {self.host_offload / GIB:.2f}" if self.host_offload else ""
        return f"{self.per_rank / GIB:.2f} GiB per rank ({parts}{off})"

    def to_dict(self) -> dict:
        return {**asdict(self), "per_rank_gib": round(self.per_rank / GIB, 4)}


def estimate_memory(params: int, *, layers: int, hidden: int, heads: int, vocab: int, seq_len: int, micro_batch: int,
                    ranks: int = 1, zero: int | None = None, offload: bool = False, bf16: bool = False,
                    device: str = "cpu") -> MemoryEstimate:
    """The per-rank memory of training ``params`` parameters (see the module docstring for each term)."""
    R = max(ranks, 1)
    z = -1 if zero is None else zero
    w_bytes = 2 if bf16 else 4
    weights = w_bytes * params / (R if z >= 3 else 1)
    gradients = w_bytes * params / (R if z >= 2 else 1)
    optimizer = 8 * params / (R if z >= 1 else 1)
    master = (4 * params / R) if z >= 1 else 0.0
    act16 = layers * seq_len * micro_batch * hidden * (34 + 5 * heads * seq_len / hidden)
    activations = act16 * (1 if bf16 else 2) + 3 * micro_batch * seq_len * vocab * 4
    runtime = (1.0 if device == "cuda" else 0.5) * GIB
    host = 0.0
    if offload:
        host = optimizer + master
        optimizer, master = 0.0, 0.0
        if z >= 3:
            host += weights
            weights = 0.0
    return MemoryEstimate(params=params, ranks=R, zero=zero, offload=offload, weights=weights,
                          gradients=gradients, optimizer=optimizer + master, activations=activations,
                          runtime=runtime, host_offload=host)


def available_memory(device: str) -> tuple[float, str]:
    """(bytes available to one rank's device, where): free host memory on CPU, one GPU's total on CUDA."""
    if device == "cuda":
        import torch

        return float(torch.cuda.mem_get_info(0)[1]), f"each GPU ({torch.cuda.get_device_name(0)})"
    import psutil

    return float(psutil.virtual_memory().available), "this host (free memory)"


def host_available() -> float:
    import psutil

    return float(psutil.virtual_memory().available)
