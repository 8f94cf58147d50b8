"""Prefect task over dlm.stages.distill: the AR teacher's greedy continuations distilled into a DLM.

Orchestration only, as ``tasks.models.convert_task``: "already done?" is the core's
``is_done(output, distill_key(...))`` (student, teacher and corpus by digest, the config),
and the training checkpoints under ``$FACTORY_HOME/cache/checkpoints/`` so a retried task
resumes.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from dlm_factory.dlm.evaluation.decoding import DraftEvalConfig, drafter_agreement
from dlm_factory.dlm.stages.distill import DistillConfig, distill, distill_key
from dlm_factory.tasks.models import checkpoint_dir, digest_cache_key, reuse


@task(name="distill", retries=1, task_run_name="distill {teacher} -> {model} -> {output}")
def distill_task(model: str, teacher: str, output: str, config: DistillConfig | None = None) -> str:
    """Distil ``teacher`` (AR, the DLM's lineage source as a rule) into the DLM ``model``; returns ``output``.

    ``model``: the DLM student dir; ``teacher``: a causal checkpoint with the same token ids;
    ``output``: where the distilled DLM is written (reused as is when it already holds a
    distillation of the same student, teacher and corpus with the same config, replaced when
    it holds anything else); ``config``: ``DistillConfig`` (None: the defaults).
    """
    cfg = config or DistillConfig()
    key = distill_key(model, teacher, cfg)
    if reuse(output, key):
        return output
    result = distill(model, teacher, output, cfg, checkpoint_dir=checkpoint_dir(key), progress=False,
                     overwrite=Path(output).exists())
    get_run_logger().info("distill: %d teacher trajectories (%.0f%% ended early), final loss %.3f, %.0f tokens/s",
                          result.trajectories, 100 * result.teacher_eos_fraction, result.train.final_loss,
                          result.train.tokens_per_s)
    return output


@task(name="drafter-eval", task_run_name="drafter {drafter} for {verifier}",
      cache_key_fn=digest_cache_key("drafter", "verifier"), persist_result=True, result_serializer="json")
def drafter_eval_task(drafter: str, verifier: str, config: DraftEvalConfig | None = None) -> dict:
    """Tokens per verification (and exactness) of ``drafter`` in greedy speculative decoding for ``verifier``."""
    return drafter_agreement(drafter, verifier, config)
