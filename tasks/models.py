"""Prefect tasks over dlm/: bootstrap, convert, evaluate.

Thin wrappers: orchestration only (retries, idempotent re-runs, artifacts). "Already
done?" is the core's one ``is_done(output, key)`` (inputs by digest, config). Long
training tasks checkpoint under ``$FACTORY_HOME/cache/checkpoints/`` so a retried or
re-run task resumes instead of starting over.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from dlm_factory.digest import json_digest
from dlm_factory.dlm.checkpoint.record import StageKey, is_done
from dlm_factory.dlm.evaluation.corpus import EvalConfig, evaluate
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap, bootstrap_key
from dlm_factory.dlm.stages.convert import ConvertConfig, convert, convert_key
from dlm_factory.home import factory_home


def checkpoint_dir(key: StageKey) -> Path:
    """Per-stage, per-input, per-config checkpoint dir: a retried or re-run task resumes where it stopped."""
    return factory_home() / "cache" / "checkpoints" / f"{key.stage}-{json_digest(key.model_dump())[7:19]}"


def reuse(output: str, key: StageKey) -> bool:
    """True (and logged) when ``output`` is already done; else False, logging when a stale model is replaced."""
    if is_done(output, key):
        get_run_logger().info("reusing %s at %s (same inputs and config)", key.stage, output)
        return True
    if Path(output).exists():
        get_run_logger().warning("%s holds a model made from other inputs or config: replacing it "
                                 "(the old one stays until the new one is complete)", output)
    return False


@task(name="bootstrap", retries=1, task_run_name="bootstrap -> {output}")
def bootstrap_task(output: str, config: BootstrapConfig | None = None) -> str:
    """Train the stdlib base model unless ``output`` already holds one made from the same corpus and config."""
    cfg = config or BootstrapConfig()
    key = bootstrap_key(cfg)
    if reuse(output, key):
        return output
    result = bootstrap(cfg, output, checkpoint_dir=checkpoint_dir(key), progress=False,
                       overwrite=Path(output).exists())
    get_run_logger().info("bootstrap: final loss %.3f, %.0f tokens/s", result.final_loss, result.tokens_per_s)
    return output


@task(name="convert", retries=1, task_run_name="convert {base_model} -> {output}")
def convert_task(base_model: str, output: str, config: ConvertConfig | None = None) -> str:
    """Convert ``base_model`` into a DLM at ``output`` (reused when already converted from it with this config)."""
    cfg = config or ConvertConfig()
    key = convert_key(base_model, cfg)
    if reuse(output, key):
        return output
    result = convert(base_model, output, cfg, checkpoint_dir=checkpoint_dir(key), progress=False,
                     overwrite=Path(output).exists())
    get_run_logger().info("convert: final loss %.3f, %.0f tokens/s", result.final_loss, result.tokens_per_s)
    return output


@task(name="evaluate", task_run_name="evaluate {model}")
def eval_task(model: str, config: EvalConfig | None = None) -> dict:
    """ELBO (diffusion) or exact NLL (AR) in bits/token on the held-out split."""
    return evaluate(model, config or EvalConfig())


def report_artifact(key: str, rows: list[dict], description: str) -> None:
    """A Prefect table artifact (shown in the UI under the flow run); ``key`` is made key-safe."""
    safe = "".join(c if c.isalnum() else "-" for c in key.lower())  # Prefect: lowercase, digits, dashes
    create_table_artifact(key=safe, table=rows, description=description)
