"""Prefect tasks over dlm/: bootstrap, convert, evaluate.

Thin wrappers: orchestration only (retries, idempotent re-runs, artifacts). Long
training tasks checkpoint under ``$FACTORY_HOME/cache/checkpoints/`` so a retried
or re-run task resumes instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.evaluation.corpus import EvalConfig, evaluate
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap, is_bootstrapped
from dlm_factory.dlm.stages.convert import ConvertConfig, convert
from dlm_factory.home import factory_home


def checkpoint_dir(stage: str, config: dict) -> Path:
    """Per-stage, per-config checkpoint dir: a retried or re-run task resumes where it stopped."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return factory_home() / "cache" / "checkpoints" / f"{stage}-{key}"


@task(name="bootstrap", retries=1, task_run_name="bootstrap -> {output}")
def bootstrap_task(output: str, config: BootstrapConfig | None = None) -> str:
    """Train the stdlib base model unless ``output`` already holds one made with the same config."""
    cfg = config or BootstrapConfig()
    if is_bootstrapped(Path(output), cfg):
        get_run_logger().info("reusing bootstrap model at %s", output)
        return output
    result = bootstrap(cfg, output, checkpoint_dir=checkpoint_dir("bootstrap", cfg.model_dump()), progress=False,
                       overwrite=replacing(output))
    get_run_logger().info("bootstrap: final loss %.3f, %.0f tokens/s", result.final_loss, result.tokens_per_s)
    return output


@task(name="convert", retries=1, task_run_name="convert {base_model} -> {output}")
def convert_task(base_model: str, output: str, config: ConvertConfig | None = None) -> str:
    """Convert ``base_model`` into a DLM at ``output`` (reused when already converted with this config)."""
    cfg = config or ConvertConfig()
    if (Path(output) / "diffusion.json").is_file():
        spec = DiffusionSpec.read(Path(output))
        same_source = _same_source(spec.source, base_model)
        if spec.stages and spec.stages[0].get("config") == cfg.model_dump() and same_source:
            get_run_logger().info("reusing converted model at %s", output)
            return output
    ckpt = checkpoint_dir("convert", {"base": base_model, **cfg.model_dump()})
    result = convert(base_model, output, cfg, checkpoint_dir=ckpt, progress=False, overwrite=replacing(output))
    get_run_logger().info("convert: final loss %.3f, %.0f tokens/s", result.final_loss, result.tokens_per_s)
    return output


def replacing(output: str) -> bool:
    """True (and logged) when a flow-owned ``output`` holds a model made otherwise: it is swapped out atomically."""
    if not Path(output).exists():
        return False
    get_run_logger().warning("%s holds a model made from another base or config: replacing it "
                             "(the old one stays until the new one is complete)", output)
    return True


def _same_source(recorded: str, requested: str) -> bool:
    """Whether a converted model came from ``requested`` (local paths compared resolved)."""
    if "://" in recorded or "://" in requested:
        return recorded == requested
    return Path(recorded).resolve() == Path(requested).resolve()


@task(name="evaluate", task_run_name="evaluate {model}")
def eval_task(model: str, config: EvalConfig | None = None) -> dict:
    """ELBO (diffusion) or exact NLL (AR) in bits/token on the held-out split."""
    return evaluate(model, config or EvalConfig())


def report_artifact(key: str, rows: list[dict], description: str) -> None:
    """A Prefect table artifact (shown in the UI under the flow run); ``key`` is made key-safe."""
    safe = "".join(c if c.isalnum() else "-" for c in key.lower())  # Prefect: lowercase, digits, dashes
    create_table_artifact(key=safe, table=rows, description=description)
