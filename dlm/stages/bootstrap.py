"""Bootstrap base model: a tiny Llama-architecture AR LM trained on the stdlib source.

No hub, no downloads: the running interpreter's standard library is a real Python
corpus on every machine. A byte-level BPE tokenizer (``tokenizers``) is trained on
the train split, then a small causal LM with the shared training loop. The result
is a normal HF checkpoint dir; from there on it is treated like any user checkpoint.
"""

from __future__ import annotations

import os

import torch
from pydantic import BaseModel, Field

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.io import Loaded, save_model
from dlm_factory.dlm.checkpoint.record import StageKey, check_output, new_record
from dlm_factory.dlm.data.corpus import Blocks, read_documents, source_digest, tokenize_blocks
from dlm_factory.dlm.data.users import GENERAL_TRAIN
from dlm_factory.dlm.diffusion.objective import ar_loss
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import materialize
from dlm_factory.dlm.train.config import TrainConfig, TrainResult
from dlm_factory.dlm.train.loop import train

EOS, PAD = "<|endoftext|>", "<|pad|>"
# Unused special tokens reserved in the vocabulary, as many real tokenizers have;
# the conversion reuses one of them as [MASK] instead of resizing the embeddings.
RESERVED = [f"<|reserved_{i}|>" for i in range(4)]


class BootstrapConfig(BaseModel):
    """Size and training budget of the bootstrap AR model (defaults: the embedded demo)."""

    data: str = Field(GENERAL_TRAIN, description="corpus for the tokenizer and the model (default: the stdlib train split without the demo users' packages)")
    max_chars: int = Field(6_000_000, gt=0, description="corpus cap in characters (deterministic subset)")
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary size, special tokens included")
    hidden_size: int = Field(256, gt=0, description="model width")
    num_layers: int = Field(4, gt=0, description="transformer blocks")
    num_heads: int = Field(4, gt=0, description="attention heads")
    intermediate_size: int = Field(688, gt=0, description="MLP width")
    seq_len: int = Field(128, ge=8, description="training sequence length")
    max_positions: int = Field(512, ge=8, description="position capacity written to the config")
    tie_embeddings: bool = Field(False, description="share the input embedding and output head (small specialists: most of their weights are the embedding)")
    tokenizer: str | None = Field(None, description="reuse this checkpoint's tokenizer instead of training one (a specialist base shares the general model's); None: train a BPE tokenizer")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=400, batch_size=16, lr=2e-3, warmup_steps=30),
                               description="optimisation settings")


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, *RESERVED],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=RESERVED, model_max_length=1_000_000)


def build_model(cfg: BootstrapConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(config)


def ar_objective(model, batch, step, generator):
    return ar_loss(model, batch["input_ids"])


def bootstrap_key(cfg: BootstrapConfig) -> StageKey:
    """What decides whether a bootstrap output is done: the corpus (and a reused tokenizer) by content, the config."""
    inputs = {"data": source_digest(cfg.data)}
    if cfg.tokenizer:
        inputs["tokenizer"] = tokenizer_digest(load_tokenizer(cfg.tokenizer))
    return StageKey(stage="bootstrap", inputs=inputs, config=cfg.model_dump(exclude={"tokenizer"}))


def load_tokenizer(src: str):
    """The tokenizer of the checkpoint ``src`` (dir or URL), ``trust_remote_code`` off."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(materialize(src), trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise FactoryError(f"{src}: no usable tokenizer ({e})") from e


def bootstrap(cfg: BootstrapConfig, output: str | os.PathLike, *, progress: bool = True,
              checkpoint_dir: str | os.PathLike | None = None, overwrite: bool = False) -> TrainResult:
    """Train tokenizer + tiny AR model and save them to ``output`` (atomic; ``overwrite`` swaps a model there)."""
    check_output(output, overwrite=overwrite)
    key = bootstrap_key(cfg)
    docs = read_documents(cfg.data, max_chars=cfg.max_chars)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer([d.text for d in docs], cfg.vocab_size)
    blocks = Blocks(tokenize_blocks(tokenizer, docs, cfg.seq_len))
    model = build_model(cfg, tokenizer)
    mb = cfg.train.micro_batch()
    result = train(model, lambda step, m: blocks.batch(step * cfg.train.slots() + m, mb, cfg.train.seed),
                   ar_objective, cfg.train, checkpoint_dir=checkpoint_dir, progress=progress)
    record = new_record(key, sources={"data": cfg.data, **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {})}, runtime=runtime.current().describe(),
                        result={"train_blocks": blocks.ids.shape[0], **result.summary()})
    save_model(Loaded(model, tokenizer, None), output, overwrite=overwrite, record=record)
    return result
