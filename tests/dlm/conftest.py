"""Fixtures for the ensemble, router and gate tests: demo users and a tiny user specialist.

A "specialist" here is any small DLM on the general model's tokenizer: ``tiny_dlm``
fine-tuned for a few steps on one demo user's train split with the diffusion objective
(the QLoRA specialists of the specialize stage plug in the same way).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_SEQ


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny forwards: one thread avoids OpenMP spin-waits when the cores are shared (same results).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dlm(tiny_dlm):
    """``tiny_dlm`` loaded once per module."""
    from dlm_factory.dlm.checkpoint.io import load_model

    return load_model(tiny_dlm)


def finetune_dlm(src: str, docs, out, *, steps: int = 15, lr: float = 3e-3, seed: int = 0) -> str:
    """Full fine-tuning of the DLM ``src`` on ``docs`` with the shared diffusion objective."""
    from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model
    from dlm_factory.dlm.data.corpus import Blocks, tokenize_blocks
    from dlm_factory.dlm.diffusion.objective import diffusion_loss
    from dlm_factory.dlm.train.config import TrainConfig
    from dlm_factory.dlm.train.loop import train

    loaded = load_model(src)
    blocks = Blocks(tokenize_blocks(loaded.tokenizer, docs, TINY_SEQ))
    spec = loaded.spec

    def objective(model, batch, step, generator):
        return diffusion_loss(model, spec, batch["input_ids"], generator=generator)

    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, warmup_steps=2, seed=seed, log_every=100)
    train(loaded.model, lambda step, m: blocks.batch(step, 8, seed), objective, cfg, progress=False)
    save_model(Loaded(loaded.model, loaded.tokenizer, spec), out)
    return str(out)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """Two demo users (stdlib packages json and email) under users/<id>/data/."""
    from dlm_factory.dlm.data.users import write_demo_users

    root = tmp_path_factory.mktemp("factory-home")
    write_demo_users(root, {"json": "json", "email": "email"})
    return str(root)


@pytest.fixture(scope="session")
def tiny_specialist(tiny_dlm, demo_root, tmp_path_factory) -> str:
    """``tiny_dlm`` fine-tuned on the json user's train split (15 steps)."""
    from dlm_factory.dlm.data.users import user_documents

    out = tmp_path_factory.mktemp("models") / "spec-json"
    return finetune_dlm(tiny_dlm, user_documents(demo_root, "json", "train"), out)


@pytest.fixture(scope="session")
def email_specialist(tiny_dlm, demo_root, tmp_path_factory) -> str:
    """``tiny_dlm`` fine-tuned on the email user's train split (15 steps)."""
    from dlm_factory.dlm.data.users import user_documents

    out = tmp_path_factory.mktemp("models") / "spec-email"
    return finetune_dlm(tiny_dlm, user_documents(demo_root, "email", "train"), out)


@pytest.fixture(scope="session")
def foreign_dlm(tmp_path_factory) -> str:
    """A random-weight DLM on a different tokenizer (for the tokenizer check)."""
    from dlm_factory.digest import tokenizer_digest
    from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
    from tests.dlm.helpers import plain_tokenizer, save_random_checkpoint

    tok = plain_tokenizer(["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n"] * 20)
    out = save_random_checkpoint("llama", tok, tmp_path_factory.mktemp("models") / "foreign", positions=256)
    DiffusionSpec(mask_token_id=1, mask_token="<pad>", tokenizer_digest=tokenizer_digest(tok)).write(out)
    return str(out)
