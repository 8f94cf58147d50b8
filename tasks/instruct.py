"""Prefect tasks over dlm.instruct: instruction tuning and the held-out instruction evaluation.

Orchestration only: the tuning task checkpoints under ``$FACTORY_HOME/cache/checkpoints/``
(a retried or re-run task resumes) and is skipped when ``output`` is already done (``is_done``:
same base and data by digest, same config); the evaluation task publishes its
figures as a table artifact.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from dlm_factory.dlm.evaluation.instruct import InstructEvalConfig, evaluate_instruct, summary
from dlm_factory.dlm.stages.instruct import InstructConfig, instruct, instruct_key
from dlm_factory.tasks.models import (
    checkpoint_dir,
    digest_cache_key,
    loss_curve_artifact,
    report_artifact,
    reuse,
    training_progress,
)


@task(name="instruct", retries=1, task_run_name="instruct {model} -> {output}")
def instruct_task(model: str, output: str, config: InstructConfig | None = None) -> str:
    """Instruction-tune ``model`` into ``output`` (reused when already tuned from it with this config)."""
    cfg = config or InstructConfig()
    key = instruct_key(model, cfg)
    if reuse(output, key):
        return output
    with training_progress(f"instruct-{Path(output).name}", cfg.train.steps) as losses:
        result = instruct(model, output, cfg, checkpoint_dir=checkpoint_dir(key), progress=False,
                          overwrite=Path(output).exists())
    loss_curve_artifact(f"instruct-{Path(output).name}", losses or result.train.losses, f"instruction tuning ({cfg.objective}) loss")
    data = result.data
    get_run_logger().info("instruct (%s, template %s): %d rows, %d malformed lines, %d empty responses, "
                          "padding %.1f%%; final loss %.3f, %.0f tokens/s", cfg.objective, result.template,
                          data["rows"], data["bad_lines"], data["empty_responses"],
                          100 * data["padding"]["pad_fraction"], result.final_loss, result.tokens_per_s)
    return output


@task(name="instruct-eval", task_run_name="instruct-eval {label}", persist_result=True, result_serializer="json",
      cache_key_fn=digest_cache_key("model", "config.judge"))
def instruct_eval_task(model: str, label: str, config: InstructEvalConfig | None = None) -> dict:
    """Held-out instruction metrics of ``model``, also published as a one-row table artifact."""
    result = evaluate_instruct(model, config or InstructEvalConfig())
    report_artifact(f"instruct-eval-{label}", [{"model": label, "path": model, **summary(result)}],
                    f"Held-out instructions: {label}")
    return result
