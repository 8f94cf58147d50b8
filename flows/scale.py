"""``scale`` flow: plan a ladder, train its rungs in parallel (each a multi-process job), fit and report.

Locally each rung is a ``torchrun`` job on this machine (``config.nproc`` processes,
DeepSpeed ZeRO ``config.zero``), ``max_parallel`` rungs at a time (their tasks carry the
``gpu`` tag, so a Prefect concurrency limit on it caps them across flows too). With a
``kubernetes`` job template each rung is an Indexed Job of N pods x G GPUs
(tasks.kubernetes), writing to the object store (``output`` must be a URL), and the report
collects the rungs' records from there. A failed rung is reported with the others and
fails the flow after every rung has had its chance; the finished rungs are reused by a rerun.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
from dlm_factory.dlm.stages.scale import ScaleConfig
from dlm_factory.flows.naming import run_name
from dlm_factory.home import factory_home
from dlm_factory.tasks.kubernetes import DistributedJobSpec, launch_distributed_task
from dlm_factory.tasks.models import bootstrap_task
from dlm_factory.tasks.scale import (
    fetch_rung_record_task,
    plan_task,
    report_task,
    rung_job_spec,
    rung_task,
)


@flow(name="scale", log_prints=True, flow_run_name=run_name("scale", base="model"))
def scale_flow(model: str | None = None, ladder: str | None = None, output: str | None = None,
               config: ScaleConfig | None = None, max_parallel: int = 1,
               kubernetes: DistributedJobSpec | None = None,
               bootstrap_config: BootstrapConfig | None = None) -> dict:
    """Train a size ladder with the diffusion and AR objectives and fit L(C) = a*C^-b + c to both.

    model: the model to grow or the family's reference (empty: bootstrap the stdlib AR model).
    ladder: overrides config.ladder (LAYERSxHIDDEN or checkpoint dirs, comma-separated, increasing).
    output: dir or URL (default $FACTORY_HOME/scaling/<model name>).
    kubernetes: a job template (image, nodes, GPUs per node): run each rung as an Indexed Job.
    """
    home = factory_home()
    cfg = config or ScaleConfig()
    if ladder:
        cfg = cfg.model_copy(update={"ladder": ladder})
    if not model:
        model = bootstrap_task(str(home / "models" / "stdlib-ar"), bootstrap_config)
    output = output or str(home / "scaling" / model.rstrip("/").rsplit("/", 1)[-1])

    # Plan: every check before anything is trained
    planned = plan_task(model, output, cfg)

    # Train: the rungs as parallel tasks
    jobs = [(i, obj) for i in range(len(planned["plan"]["rungs"])) for obj in cfg.objectives]
    failed = []
    step = max(1, max_parallel)
    for lo in range(0, len(jobs), step):
        batch = jobs[lo : lo + step]
        if kubernetes is not None:
            futures = [launch_distributed_task.submit(rung_job_spec(kubernetes, planned, i, obj, cfg, output))
                       for i, obj in batch]
        else:
            futures = [rung_task.submit(planned, i, obj, cfg, max_parallel) for i, obj in batch]
        for (i, obj), future in zip(batch, futures, strict=True):
            state = future.wait() or future.state
            if not state.is_completed():
                failed.append(f"{planned['plan']['rungs'][i]['name']} ({obj}): {str(state.message or state.name)[:300]}")
    if failed:
        get_run_logger().error("rungs failed: %s", "; ".join(failed))
        raise FactoryError(f"{len(failed)} rung(s) failed: " + "; ".join(failed))

    # Fit and report
    if kubernetes is not None:
        for i, obj in jobs:
            fetch_rung_record_task(planned, i, obj, output)
    report = report_task(planned, cfg, output)
    m = report.get("multiplier")
    print(f"ladder at {output}: plot {report['plot']}"
          + (f"; DLM needs {m['value']:.2f}x the AR compute" if m else ""))
    return {"output": output, "plot": report["plot"], "multiplier": m,
            "laws": {k: v["law"] for k, v in report["fits"].items()}}
