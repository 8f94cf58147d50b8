"""Text in, text out: prompts are encoded (chat template for tuned models), sampled and decoded.

``generate`` drives a diffusion checkpoint through ``dlm.sampling.sampler.sample``;
``ar_generate`` is the AR baseline (HF ``generate`` with its KV cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlm_factory.dlm.checkpoint.io import Loaded
from dlm_factory.dlm.data.batching import left_pad, pad_id
from dlm_factory.dlm.data.corpus import Document, encode_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.runtime import inference_autocast, model_device
from dlm_factory.dlm.sampling.sampler import SamplerConfig, Step, sample


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each raw prompt as the start of a document, as training and evaluation see one:
    the checkpoint's start token (BOS where the tokenizer adds it, else EOS) followed by the text."""
    return encode_documents(tokenizer, [Document(f"prompt-{i}", p) for i, p in enumerate(prompts)])


def generate(loaded, prompts: list[str], cfg: SamplerConfig, *,
             on_step: Callable[[Step], None] | None = None, chat: bool | None = None) -> list[str]:
    """Tokenize ``prompts``, sample with ``ModelDenoiser(loaded)`` and decode the responses.

    ``chat``: format each prompt as a user turn with the chat template, exactly as
    instruction tuning did; None (default) does so when the model was instruction-tuned.
    """

    denoiser = ModelDenoiser(loaded)  # refuses an AR checkpoint with a clear error
    if chat is None:
        chat = "instruct" in loaded.spec.stage_names()
    if chat:
        from dlm_factory.dlm.data.chat import encode_chat, ensure_chat_template

        ensure_chat_template(loaded.tokenizer)
        prompt_ids = encode_chat(loaded.tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    else:
        prompt_ids = encode_prompts(loaded.tokenizer, prompts)
    ids = sample(denoiser, prompt_ids, cfg, on_step=on_step)
    return [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in ids]


@torch.no_grad()
def ar_generate(loaded: Loaded, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16, *,
                temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Greedy decoding with HF ``generate`` (KV cache), left-padded batches; cut at the first EOS.

    ``temperature`` > 0: ancestral sampling at that temperature instead (no top-k/top-p), seeded."""
    tok, model = loaded.tokenizer, loaded.model
    eos, pad = tok.eos_token_id, pad_id(tok)
    device = model_device(model)
    out: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        ids, am = left_pad(prompts[lo : lo + batch_size], pad)
        P = ids.shape[1]
        sampling = dict(do_sample=False)
        if temperature > 0:
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(seed * 1_000_003 + lo)  # HF samples from the global generator
        with inference_autocast(device):
            gen = model.generate(input_ids=ids.to(device), attention_mask=am.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, use_cache=True, **sampling)
        for row in gen[:, P:].tolist():
            cut = next((i for i, t in enumerate(row) if t in (eos, pad)), len(row))
            out.append(row[:cut])
    return out
