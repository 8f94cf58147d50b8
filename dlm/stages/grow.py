"""Function-preserving growth of a Llama-style decoder: more layers, a wider residual stream.

The grown model computes exactly the function of the original at initialisation (logits
equal up to float rounding, tested < 1e-5), so continued training starts from what the
small model knew instead of from scratch.

Depth (LLaMA Pro, Wu et al. 2024; Net2Net's identity layers, Chen et al. 2016): new blocks
are copies of the block below them with the output projections of attention (``o_proj``)
and MLP (``down_proj``) zeroed, so each new block adds nothing to the residual stream. The
zeroed matrices still receive gradients (their inputs are the copied block's activations),
so the blocks start learning at the first step. New blocks are spread evenly: the k-th
block of the original is followed by its share of copies.

Width (Net2Net-style, with the rule "zero the writers, randomise the readers"): the residual
stream grows from H to H' with new dimensions that stay exactly zero: every matrix that
*writes* into the residual stream (token embedding, ``o_proj``, ``down_proj``) gets zero rows
for them, every matrix that *reads* it (q/k/v, gate/up, the output head) gets random columns
for them (multiplied by zero, so harmless, and they give the zero rows a gradient). Attention
grows by whole heads of the same head dimension (new q/k/v rows random, new ``o_proj``
columns zero), the MLP by new units (new gate/up rows random, new ``down_proj`` columns zero).
RMSNorm is made exact by scaling: with the new dims at zero, mean(x'^2) = (H/H') mean(x^2),
so the norm weights are multiplied by sqrt(H/H') and ``rms_norm_eps`` by H/H'.

Supported: the Llama layout (llama, mistral, qwen2: ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, RMSNorm, rotary positions). Other families are refused.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch

from dlm_factory.dlm.errors import FactoryError

GROWABLE = {"llama", "mistral", "qwen2"}
_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Shape:
    """Depth and width of a decoder: ``layers`` blocks over a residual stream of ``hidden`` dims."""

    layers: int
    hidden: int

    def __str__(self) -> str:
        return f"{self.layers}x{self.hidden}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        m = _SHAPE.match(text)
        if m is None or int(m[1]) < 1 or int(m[2]) < 1:
            raise FactoryError(f"{text!r}: expected LAYERSxHIDDEN, e.g. 4x128")
        return cls(int(m[1]), int(m[2]))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_shape(config) -> Shape:
    return Shape(config.num_hidden_layers, config.hidden_size)


def grown_config(config, shape: Shape, *, allow_shrink: bool = False):
    """The config of ``config`` grown to ``shape`` (heads of the same size, MLP in the same ratio).

    ``allow_shrink``: a smaller shape too (a config to initialise at random, not to grow into).
    """
    model_type = getattr(config, "model_type", "?")
    if model_type not in GROWABLE:
        raise FactoryError(f"growth supports Llama-style decoders ({', '.join(sorted(GROWABLE))}), not {model_type}; "
                           "give a ladder of checkpoints instead")
    old = model_shape(config)
    if not allow_shrink and (shape.layers < old.layers or shape.hidden < old.hidden):
        raise FactoryError(f"cannot grow {old} to {shape}: growth only adds layers and width")
    hd = head_dim(config)
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    group = heads // kv
    if shape.hidden % hd or (shape.hidden // hd) % group:
        raise FactoryError(f"width {shape.hidden} is not a whole number of {hd}-dim heads in groups of {group} "
                           f"(query heads per key/value head); choose a multiple of {hd * group}")
    new = copy.deepcopy(config)
    ratio = shape.hidden / old.hidden
    new.num_hidden_layers = shape.layers
    new.hidden_size = shape.hidden
    new.head_dim = hd
    new.num_attention_heads = shape.hidden // hd
    new.num_key_value_heads = new.num_attention_heads // group
    new.intermediate_size = int(round(config.intermediate_size * ratio))
    if not allow_shrink:  # growth: exact RMSNorm over the wider stream (a config for random init keeps eps)
        new.rms_norm_eps = config.rms_norm_eps / ratio
    if getattr(new, "layer_types", None) is not None:  # per-layer attention kinds (sliding/full) follow the layers
        kinds = list(config.layer_types)
        new.layer_types = [kinds[min(j, len(kinds) - 1)] for j in depth_map(old.layers, max(shape.layers, old.layers))[0]][: shape.layers]
    if getattr(new, "max_window_layers", None) is not None:
        new.max_window_layers = shape.layers
    return new


def depth_map(old: int, new: int) -> tuple[list[int], list[bool]]:
    """For each new layer: the original layer it comes from, and whether it is an added copy."""
    extra = new - old
    share = [extra // old + (1 if j >= old - extra % old else 0) for j in range(old)]  # copies go to the top first
    source, added = [], []
    for j in range(old):
        source.append(j)
        added.append(False)
        for _ in range(share[j]):
            source.append(j)
            added.append(True)
    return source, added


@torch.no_grad()
def grow(model, shape: Shape, *, seed: int = 0):
    """A new model of ``shape`` computing the same function as ``model`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    old_shape = model_shape(config)
    new_config = grown_config(config, shape)
    torch.manual_seed(seed)  # the random readers and the new heads/units
    grown = AutoModelForCausalLM.from_config(new_config, attn_implementation=config._attn_implementation)
    grown.to(next(model.parameters()).device)
    old_sd = model.state_dict()
    new_sd = grown.state_dict()
    H, H2 = old_shape.hidden, shape.hidden
    scale = math.sqrt(H / H2)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    source, added = depth_map(old_shape.layers, shape.layers)
    out: dict[str, torch.Tensor] = {}
    for name, dst in new_sd.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if m:
            i, suffix = int(m[1]), m[2]
            src = old_sd[f"model.layers.{source[i]}.{suffix}"]
            out[name] = _embed(suffix, src, dst.clone(), H, scale)
            if added[i] and suffix.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
                out[name].zero_()  # a new block adds nothing to the residual stream at first
        elif name == "model.embed_tokens.weight" or name == "model.norm.weight":
            out[name] = _embed(name, old_sd[name], dst.clone(), H, scale)
        elif name == "lm_head.weight":
            w = dst.clone()
            w[:, :H] = old_sd[name] if name in old_sd else old_sd["model.embed_tokens.weight"]
            if tied:
                w[:, H:] = 0
            out[name] = w
        elif name in old_sd and old_sd[name].shape == dst.shape:
            out[name] = old_sd[name].clone()  # buffers and anything shape-free (rotary frequencies)
        else:
            raise FactoryError(f"growth does not know how to carry {name} {tuple(dst.shape)} over")
    missing, unexpected = grown.load_state_dict(out, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise FactoryError(f"grown model state does not match its config ({missing[:3]} {unexpected[:3]})")
    if tied:
        grown.tie_weights()
    grown.eval()
    return grown


def _embed(suffix: str, src: torch.Tensor, dst: torch.Tensor, H: int, scale: float) -> torch.Tensor:
    """Place an original tensor in the corner of its grown counterpart by the rules of the module docstring."""
    if suffix.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
        dst.fill_(scale)
        dst[:H] = src * scale
        return dst
    if suffix == "model.embed_tokens.weight":  # writer: [V, H]
        dst[:, H:] = 0
        dst[:, :H] = src
        return dst
    if suffix.endswith(("o_proj.weight", "down_proj.weight")):  # writers: [H, in]
        dst.zero_()
        dst[:H, : src.shape[1]] = src
        return dst
    if suffix.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
        dst[: src.shape[0], :H] = src  # readers: [out, H]; the new columns and rows keep their random init
        return dst
    if suffix.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")):
        dst.zero_()
        dst[: src.shape[0]] = src
        return dst
    if suffix.endswith(("o_proj.bias", "down_proj.bias")):
        dst.zero_()
        dst[:H] = src
        return dst
    if src.shape == dst.shape:
        return src.clone()
    raise FactoryError(f"growth does not know how to widen {suffix} {tuple(src.shape)} -> {tuple(dst.shape)}")


def compute_params(model_or_config) -> tuple[int, int]:
    """(all parameters, the parameters that cost compute per token: all but the input embedding).

    N in C = 6 N D (Kaplan et al. 2020 count non-embedding parameters; the output head is a
    matmul per token, so it counts here, the input embedding is a lookup and does not).
    """
    if hasattr(model_or_config, "parameters"):
        model = model_or_config
        total = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        return total, total - emb + (emb if tied else 0)
    return config_params(model_or_config)


def config_params(config) -> tuple[int, int]:
    """``compute_params`` of the model a config describes, built on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return compute_params(model)
