"""Data-parallel training under DeepSpeed across processes (torchrun, gloo on CPU), and crash-safe resume.

Tolerance of the loss-curve comparisons: 1e-4 nats. Two ranks with micro-batch b run
exactly the rows and masking noise of one process with two micro-batches of b (the slots of
``TrainConfig.slots``), so the curves differ only by the order of floating-point sums in the
gradient all-reduce (float32 rounding, measured 2.4e-7 after 8 steps); 1e-4 leaves room for
that rounding to grow over the steps while any real difference (another batch, other noise:
~1e-1 here) is three orders of magnitude larger.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.train.checkpoints import COMMIT_MARKER, committed, latest_checkpoint
from dlm_factory.dlm.train.deepspeed import zero_config

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


def torchrun(out: Path, *args: str, nproc: int = 2, wait: bool = True, log: Path | None = None):
    """Launch ``tests.dlm.dist_worker`` under torchrun in its own session (so a test can SIGKILL the group)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "FACTORY_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tests.dlm.dist_worker", str(out), *args]
    stream = open(log or out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return proc
    code = proc.wait(timeout=900)
    assert code == 0, (log or out.with_suffix(".log")).read_text()[-3000:]
    return json.loads(out.read_text())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (torchrun starts each worker in a session of its own)."""
    import psutil

    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


def reference(tmp_path: Path, **kw) -> dict:
    """One process, the plain torch loop (no DeepSpeed), the same global batch as two slots."""
    from tests.dlm import dist_worker

    return dist_worker.run(str(tmp_path / "ref.json"), zero=None, steps=kw.get("steps", 8), batch_size=8,
                           grad_accum=2, checkpoint_dir=None, checkpoint_every=50, slow_from=None)


def test_zero_config_refuses_unsupported_stages():
    assert zero_config(2)["zero_optimization"] == {"stage": 2}
    assert zero_config(3, offload=True)["zero_optimization"]["offload_param"] == {"device": "cpu"}
    for bad in (4, -1):
        with pytest.raises(FactoryError, match="ZeRO stage"):
            zero_config(bad)


def test_one_process_with_two_slots_equals_the_global_batch(tmp_path):
    """Fast check of the slot arithmetic: 1 process x 2 micro-batches of 4 == what 2 ranks x 4 will see."""
    from dlm_factory.dlm.train.config import TrainConfig

    cfg = TrainConfig(batch_size=8, grad_accum=1)
    assert (cfg.slots(2), cfg.micro_batch(2)) == (2, 4)
    assert (cfg.model_copy(update={"grad_accum": 2}).slots(1), cfg.model_copy(update={"grad_accum": 2}).micro_batch(1)) == (2, 4)
    with pytest.raises(FactoryError, match="2 processes"):
        TrainConfig(batch_size=6, grad_accum=2).micro_batch(2)


def test_a_world_of_many_without_deepspeed_is_refused(monkeypatch):
    from dlm_factory.dlm import runtime
    from dlm_factory.dlm.train.config import TrainConfig
    from dlm_factory.dlm.train.loop import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    try:
        runtime.configure("cpu")
        with pytest.raises(FactoryError, match="need DeepSpeed"):
            train(None, None, None, TrainConfig(steps=1, batch_size=2))
    finally:
        monkeypatch.undo()
        runtime.configure("cpu")


def test_uncommitted_checkpoints_are_ignored(tmp_path):
    (tmp_path / "step-000003").mkdir()
    (tmp_path / "step-000003" / COMMIT_MARKER).write_text("{}")
    (tmp_path / "step-000006").mkdir()  # shards and state written, marker not yet: a crash mid-save
    (tmp_path / "step-000006" / "state.json").write_text("{}")
    (tmp_path / ".tmp-step-000009").mkdir()
    assert [p.name for p in committed(tmp_path)] == ["step-000003"]
    assert latest_checkpoint(tmp_path).name == "step-000003"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, zero):
    ref = reference(tmp_path)
    got = torchrun(tmp_path / f"zero{zero}.json", "--zero", str(zero))
    assert got["world_size"] == 2
    assert got["losses"] == pytest.approx(ref["losses"], abs=TOL)
    assert got["losses"][-1] < got["losses"][0]
    # The consolidated fp32 weights are the reference's (ZeRO-3: gathered from both partitions).
    assert got["weight_sum"] == pytest.approx(ref["weight_sum"], rel=1e-6)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_final_loss(tmp_path):
    """2 ranks, ZeRO-2, checkpoints every 3 steps; the whole process group is SIGKILLed mid-run,
    after the step-3 checkpoint is committed; a copy of it without its marker stands in for a
    later half-written one. The rerun resumes from step 3 and ends where an uninterrupted run does."""
    steps = ["--steps", "12", "--checkpoint-every", "3", "--zero", "2"]
    full = torchrun(tmp_path / "full.json", *steps)
    ckpt = tmp_path / "ckpt"
    proc = torchrun(tmp_path / "killed.json", *steps, "--checkpoint-dir", str(ckpt), "--slow-from", "3", wait=False)
    deadline = time.monotonic() + 600
    while not (ckpt / "step-000003" / COMMIT_MARKER).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # mid-step 4 or 5 (each takes > 0.4 s now)
    kill_tree(proc)
    assert not (tmp_path / "killed.json").exists()
    assert [p.name for p in committed(ckpt)] == ["step-000003"]
    half = ckpt / "step-000009"
    shutil.copytree(ckpt / "step-000003", half)
    (half / COMMIT_MARKER).unlink()
    resumed = torchrun(tmp_path / "resumed.json", *steps, "--checkpoint-dir", str(ckpt))
    assert resumed["resumed_from"] == 3
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=TOL)
    assert resumed["losses"] == pytest.approx(full["losses"][3:], abs=TOL)
    assert resumed["weight_sum"] == pytest.approx(full["weight_sum"], rel=1e-6)
