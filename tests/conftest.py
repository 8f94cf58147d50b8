"""Shared fixtures: tiny checkpoints the project builds itself (no hub, seconds on CPU)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TINY_SEQ = 64


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) on machines without it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_bootstrap_config():
    from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
    from dlm_factory.dlm.train.config import TrainConfig

    # data given explicitly (the default now leaves out the demo users' packages): the golden values stay put
    return BootstrapConfig(data="stdlib:train", max_chars=300_000, vocab_size=512, hidden_size=64, num_layers=2, num_heads=2,
                           intermediate_size=128, seq_len=TINY_SEQ, max_positions=256,
                           train=TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, log_every=10))


def tiny_convert_config(**overrides):
    from dlm_factory.dlm.stages.convert import ConvertConfig
    from dlm_factory.dlm.train.config import TrainConfig

    values = dict(data="stdlib:train", max_chars=200_000, seq_len=TINY_SEQ, anneal_steps=10,
                  train=TrainConfig(steps=20, batch_size=8, lr=1e-3, warmup_steps=2))
    values.update(overrides)
    return ConvertConfig(**values)


@pytest.fixture(scope="session")
def tiny_ar(tmp_path_factory) -> str:
    """A tiny Llama AR checkpoint trained for 30 steps on a stdlib subset (tokenizer: 512 BPE)."""
    from dlm_factory.dlm.stages.bootstrap import bootstrap

    out = tmp_path_factory.mktemp("models") / "tiny-ar"
    bootstrap(tiny_bootstrap_config(), out, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_dlm(tiny_ar, tmp_path_factory) -> str:
    """``tiny_ar`` converted to a diffusion LM (20 steps, annealing over 10)."""
    from dlm_factory.dlm.stages.convert import convert

    out = tmp_path_factory.mktemp("models") / "tiny-dlm"
    convert(tiny_ar, out, tiny_convert_config(), progress=False)
    return str(out)


FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint():
    """http://127.0.0.1:<port> of a real S3 API (moto server in this process), shared by the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAKE_AWS.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
            mp.delenv(k, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
