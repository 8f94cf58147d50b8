"""The distill stage: masking pattern, training on the teacher's greedy continuations, records, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import is_done, lineage_root, read_record
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.distill import (
    DistillConfig,
    distill,
    distill_key,
    distill_loss,
    distill_mask,
    teacher_trajectories,
)
from dlm_factory.dlm.train.config import TrainConfig

TINY = dict(max_chars=100_000, prompts=16, prompt_len=16, length=24, teacher_batch=8,
            train=TrainConfig(steps=15, batch_size=8, lr=3e-3, warmup_steps=2, log_every=100))


def test_mask_keeps_the_prompt_and_masks_suffixes_to_the_end():
    spec = DiffusionSpec(mask_token_id=2, mask_token="<m>", tokenizer_digest="sha256:x", shift=True)
    ids = torch.randint(3, 50, (400, 40))
    masked, share = distill_mask(ids, spec, 10, 1.0, torch.Generator().manual_seed(0))
    assert not masked[:, :10].any()  # the prompt is never masked
    frac = masked[:, 10:].float().mean(-1)
    some = frac > 0
    assert all(bool(m[m.nonzero()[0, 0]:].all()) for m in masked[some])  # one run of masks to the end
    assert torch.allclose(share[some], frac[some]) and 0.3 < frac.mean() < 0.7  # cut ~ U: half on average
    masked, share = distill_mask(ids, spec, 10, 0.0, torch.Generator().manual_seed(0))
    assert not masked[:, :10].any()
    runs = [bool(m[m.nonzero()[0, 0]:].all()) for m in masked if 3 < m.sum() < 25]
    assert sum(runs) < 0.1 * len(runs)  # scattered masks at rate t
    assert (share - masked[:, 10:].float().mean(-1)).abs().mean() < 0.1
    mixed, _ = distill_mask(ids, spec, 10, 0.5, torch.Generator().manual_seed(0))
    assert not torch.equal(mixed, masked)


def test_distill_learns_the_teachers_continuations(tiny_dlm, tiny_ar, tmp_path):
    cfg = DistillConfig(**TINY)
    out = tmp_path / "distilled"
    result = distill(tiny_dlm, tiny_ar, out, cfg, progress=False)
    assert result.trajectories == 16 and 0 <= result.teacher_eos_fraction <= 1
    record = read_record(out)
    assert record.stage == "distill" and is_done(out, distill_key(tiny_dlm, tiny_ar, cfg))
    assert not is_done(out, distill_key(tiny_dlm, tiny_ar, cfg.model_copy(update={"certainty": 0.5})))
    assert lineage_root(out, "") == lineage_root(tiny_dlm, "")  # the verifier default stays the AR source
    assert DiffusionSpec.read(out).stages[-1].stage == "distill"
    # the teacher's trajectories: prompt windows + its greedy continuations, EOS-filled when it ends early
    teacher = load_model(tiny_ar)
    prompts = torch.tensor([[teacher.tokenizer.eos_token_id] + list(range(100, 115))])
    ids, _ = teacher_trajectories(teacher, prompts, 24, 8)
    from dlm_factory.dlm.sampling.generate import ar_generate

    cont = ar_generate(teacher, prompts.tolist(), 24)[0]
    assert ids.shape == (1, 40) and ids[0, 16 : 16 + len(cont)].tolist() == cont
    # sampled trajectories (teacher_temperature > 0): seeded, and not the greedy ones
    many = prompts.repeat(4, 1)
    s1, _ = teacher_trajectories(teacher, many, 24, 8, temperature=1.0, seed=5)
    s2, _ = teacher_trajectories(teacher, many, 24, 8, temperature=1.0, seed=5)
    s3, _ = teacher_trajectories(teacher, many, 24, 8, temperature=1.0, seed=6)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1[0], ids[0])
    assert torch.equal(s1[:, :16], many)
    # the loss on the teacher's trajectories (same masks) fell: the student learned what the teacher says
    from dlm_factory.dlm.data.corpus import read_documents, tokenize_blocks

    windows = tokenize_blocks(teacher.tokenizer, read_documents(cfg.data, max_chars=cfg.max_chars), 16)
    traj, _ = teacher_trajectories(teacher, windows[torch.linspace(0, len(windows) - 1, 16).long()], 24, 8)
    before, after = load_model(tiny_dlm), load_model(out)
    with torch.no_grad():
        losses = [float(distill_loss(m.model, m.spec, traj, 16, cfg, torch.Generator().manual_seed(3))[0])
                  for m in (before, after)]
    assert losses[1] < 0.9 * losses[0]


def test_bad_pairs_and_lengths_are_refused(tiny_dlm, tiny_ar, tmp_path):
    cfg = DistillConfig(**TINY)
    with pytest.raises(FactoryError, match="teacher must be an autoregressive"):
        distill(tiny_dlm, tiny_dlm, tmp_path / "a", cfg, progress=False)
    with pytest.raises(FactoryError, match="student must be a diffusion"):
        distill(tiny_ar, tiny_ar, tmp_path / "b", cfg, progress=False)
    with pytest.raises(FactoryError, match="exceeds the models' 256 positions"):
        distill(tiny_dlm, tiny_ar, tmp_path / "c", cfg.model_copy(update={"length": 250}), progress=False)


def test_cli(tiny_dlm, tiny_ar, tmp_path, capsys):
    from dlm_factory.cli import main

    out = tmp_path / "cli"
    args = ["distill", "--model", tiny_dlm, "--output", str(out), "--prompts", "8", "--prompt-len", "16",
            "--length", "16", "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    assert main(args) == 0  # the teacher defaults to the lineage's AR model
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["teacher"] == tiny_ar and line["trajectories"] == 8 and (out / "diffusion.json").is_file()
    assert main(args) == 2
    assert "output already exists" in capsys.readouterr().err
    assert main(["distill", "--model", tiny_dlm, "--teacher", tiny_dlm, "--output", str(tmp_path / "x")]) == 2
    assert "teacher must be an autoregressive" in capsys.readouterr().err
    assert main(["distill", "--model", tiny_dlm, "--output", str(tmp_path / "y"), "--suffix-fraction", "2"]) == 2
    assert "error: invalid suffix_fraction" in capsys.readouterr().err
