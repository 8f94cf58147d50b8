"""Test helpers: tiny random-weight checkpoints of several architectures, built from configs."""

from __future__ import annotations

from pathlib import Path

import torch


def plain_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer with only EOS/PAD specials: no room for a mask token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_config(arch: str, vocab_size: int, positions: int = 128):
    from transformers import (
        CohereConfig,
        Gemma2Config,
        GPT2Config,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma2":  # eager attention only; soft-capped attention and final logits
        return Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                            sliding_window=8)
    if arch == "granite":  # logits divided by logits_scaling outside lm_head
        return GraniteConfig(**common, logits_scaling=4.0)
    if arch == "cohere":  # logits multiplied by logit_scale outside lm_head
        return CohereConfig(**common, logit_scale=0.25)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=positions)
    raise ValueError(arch)


def save_random_checkpoint(arch: str, tokenizer, dest: Path, *, positions: int = 128, extra_rows: int = 0) -> Path:
    """Random-weight causal LM of ``arch`` with ``tokenizer``, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer) + extra_rows, positions))
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def leftovers(parent: Path) -> list[str]:
    """Temp/partial dirs a failed stage might have left in ``parent``."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith((".tmp-", ".trash-")))


def bos_tokenizer(texts: list[str], vocab_size: int = 300):
    """A Llama-style byte-level BPE tokenizer that puts ``<s>`` in front of every text by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def sharp_llama(vocab_size: int):
    """A random bidirectional Llama with sharp, context-dependent predictions (seed 0): equality checks of
    samplers and caches are not vacuous on it, where a briefly trained tiny model answers whitespace."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlm_factory.dlm.checkpoint.io import set_bidirectional

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    set_bidirectional(model)
    return model
