"""Prefect tasks over dlm.stages.scale: plan the ladder, train a rung, fit and report.

Orchestration only. A rung is skipped when its output is done (same source and data by
digest, same settings); a rung that fails transiently (a killed process, I/O) is retried and
resumes from its checkpoint, bad input never is. On a cluster a rung is a multi-node
Indexed Job (``rung_job_spec`` + tasks.kubernetes.launch_distributed_task) writing to the
object store; locally it is a ``torchrun`` job on this machine.

The report task attaches the fits to the flow run: a markdown table artifact (the rungs), a markdown
artifact (REPORT.md: the laws, the multiplier, the compute-optimal size) and an image
artifact of the plot. Prefect 3.8's image artifact takes a URL, not bytes: the PNG is given
as a ``data:image/png;base64,`` URL (the UI renders it inline, no file server needed); the
file itself lies beside the outputs (``scaling.png``).
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.scale import (
    Plan,
    ScaleConfig,
    finish,
    machine_procs,
    markdown_report,
    plan_ladder,
    prepare_output,
    run_rung,
    rung_dir,
    rung_job,
    summarize,
)
from dlm_factory.tasks.kubernetes import DistributedJobSpec
from dlm_factory.tasks.models import image_artifact, report_artifact


def _transient(task, task_run, state) -> bool:
    """Retry on errors that may pass (I/O, a killed process), never on bad input (FactoryError)."""
    try:
        state.result()
    except FactoryError as e:
        return "exit code -9" in str(e) or "exit code 137" in str(e)  # a rank killed (memory, eviction)
    except (OSError, MemoryError):
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug: no retry
        return False
    return False


@task(name="scale-plan", task_run_name="plan ladder {config.ladder}")
def plan_task(model: str, output: str, config: ScaleConfig, overwrite: bool = False) -> dict:
    """Check the ladder (nothing is written when it is refused) and prepare the output; returns the plan."""
    plan = plan_ladder(model, config)
    local = prepare_output(output, plan, config, overwrite=overwrite)
    logger = get_run_logger()
    for r in plan.rungs:
        logger.info("%s: %s, %.2fM parameters (%.2fM compute), %d steps, %.3g tokens, %.3g FLOPs, %.2f GiB/rank",
                    r.name, r.kind, r.params / 1e6, r.compute_params / 1e6, r.steps, r.tokens, r.flops,
                    r.memory["per_rank_gib"])
    return {"plan": plan.model_dump(), "local": str(local)}


@task(name="scale-rung", tags=["gpu"], retries=1, retry_delay_seconds=5, retry_condition_fn=_transient,
      task_run_name="rung {rung_index} ({objective})")
def rung_task(planned: dict, rung_index: int, objective: str, config: ScaleConfig, max_parallel: int = 1) -> dict:
    """Train one rung with one objective (a torchrun job of config.nproc processes, or in process)."""
    plan = Plan.model_validate(planned["plan"])
    rung = plan.rungs[rung_index]
    cores, _ = machine_procs()
    threads = max(1, cores // (config.nproc * max(1, max_parallel)))  # parallel rungs share the cores
    result = run_rung(plan, rung, objective, config, planned["local"], threads=threads)
    get_run_logger().info("%s (%s): final loss %.3f, held-out %s, %.0f tokens/s", rung.name, objective,
                          result["final_loss"], (result.get("eval") or {}).get("bits_per_token"),
                          result["tokens_per_s"])
    return {"rung": rung.name, "objective": objective, "final_loss": result["final_loss"],
            "eval": result.get("eval"), "reused": bool(result.get("reused"))}


def rung_job_spec(template: DistributedJobSpec, planned: dict, rung_index: int, objective: str, config: ScaleConfig,
                  output: str) -> DistributedJobSpec:
    """The Indexed Job of one rung on a cluster: every rank runs the rung worker on the inline job.

    ``output`` must be an object-store URL (the pods upload the rung there, marker last); the
    world size is the template's nodes x GPUs per node, which the rung's batch must divide.
    """
    if "://" not in output:
        raise FactoryError("on a cluster the ladder's output must be an object-store URL (s3://...)")
    plan = Plan.model_validate(planned["plan"])
    rung = plan.rungs[rung_index]
    config.train.micro_batch(template.world_size)  # refused here, not in the pods
    job = rung_job(plan, rung, objective, config, output)
    name = re.sub(r"[^a-z0-9-]+", "-", f"scale-{rung.name}-{objective}".lower()).strip("-")[:40].rstrip("-")
    return template.model_copy(update={"name": name, "module": "dlm_factory.dlm.stages.scale",
                                       "args": [job.model_dump_json()]})


@task(name="scale-fetch-rung", retries=2, retry_delay_seconds=5)
def fetch_rung_record_task(planned: dict, rung_index: int, objective: str, output: str) -> str:
    """Copy a remote rung's record (its curve and eval) next to the local report; refuses an incomplete upload."""
    import fsspec

    from dlm_factory.dlm.paths import upload_complete

    plan = Plan.model_validate(planned["plan"])
    rung = plan.rungs[rung_index]
    url = rung_dir(output, rung, objective)
    if not upload_complete(url):
        raise FactoryError(f"{url}: the rung's upload is incomplete (no commit marker)")
    dest = Path(rung_dir(planned["local"], rung, objective))
    dest.mkdir(parents=True, exist_ok=True)
    with fsspec.open(f"{url}/stage.json", "r") as f:
        (dest / "stage.json").write_text(f.read())
    return str(dest)


@task(name="scale-report", task_run_name="fit and report")
def report_task(planned: dict, config: ScaleConfig, output: str) -> dict:
    """Fit both laws, write scaling.json / scaling.png / REPORT.md and the record (last), attach artifacts."""
    plan = Plan.model_validate(planned["plan"])
    report = summarize(plan, config, planned["local"])
    finish(plan, config, planned["local"], output, report)
    report_artifact("scale-rungs", report["rows"], "Ladder rungs: params, tokens, FLOPs, held-out bits/token")
    create_markdown_artifact(key="scale-report", markdown=markdown_report(report) + f"\nPlot: `{report['plot']}`\n",
                             description="Scaling laws of the ladder: diffusion vs AR")
    image_artifact("scale-plot", Path(report["plot"]), "L(C) fits with their points, DLM vs AR")
    return report
