"""``specialize`` flow: one QLoRA specialist per user, in parallel, skipping users whose data is unchanged.

The specialist base (a small DLM sharing the general model's tokenizer) is built first
when none is given: a small AR model bootstrapped with the general model's tokenizer,
then converted. Users run ``max_parallel`` at a time (their tasks carry the ``gpu``
tag, so a Prefect concurrency limit on it caps them across flows too). A failing user
is reported in the table and the result, never fails the others or the flow.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
from dlm_factory.dlm.stages.convert import ConvertConfig
from dlm_factory.dlm.stages.specialize import SPECIALIST_BASE, SPECIALIST_CONVERT, SpecializeConfig
from dlm_factory.flows.naming import run_name
from dlm_factory.home import factory_home
from dlm_factory.tasks.models import bootstrap_task, convert_task, report_artifact
from dlm_factory.tasks.specialize import list_users_task, specialize_task


@flow(name="specialize", log_prints=True, flow_run_name=run_name("specialize", base="general", users="users"))
def specialize_flow(users: list[str] | None = None, general: str | None = None, model: str | None = None,
                    data_root: str | None = None, config: SpecializeConfig | None = None,
                    base_config: BootstrapConfig | None = None, convert_config: ConvertConfig | None = None,
                    max_parallel: int = 2) -> dict:
    """Train a 4-bit QLoRA specialist for each user (all users under ``<data_root>/users/`` when none given).

    general: the general DLM the specialists will join (default $FACTORY_HOME/models/stdlib-dlm).
    model: the small specialist base DLM; empty = build one with the general model's tokenizer.
    data_root: the root holding users/<id>/data (default $FACTORY_HOME); outputs go to
    $FACTORY_HOME/users/<id>/specialist.
    """
    home = factory_home()
    general = general or str(home / "models" / "stdlib-dlm")
    data_root = data_root or str(home)
    if not model:
        base_cfg = (base_config or SPECIALIST_BASE).model_copy(update={"tokenizer": general})
        ar = bootstrap_task(str(home / "models" / "specialist-ar"), base_cfg)
        model = convert_task(ar, str(home / "models" / "specialist-dlm"), convert_config or SPECIALIST_CONVERT)
    users = users or list_users_task(data_root)
    rows = []
    for lo in range(0, len(users), max(1, max_parallel)):
        batch = users[lo : lo + max(1, max_parallel)]
        futures = [specialize_task.submit(model, data_root, u, str(home), general, config) for u in batch]
        for user, future in zip(batch, futures, strict=True):
            state = future.wait() or future.state
            if state.is_completed():
                rows.append(future.result())
            else:
                rows.append({"user": user, "status": "failed", "error": str(state.message or state.name)[:300]})
    failed = [r["user"] for r in rows if r["status"] == "failed"]
    report_artifact("specialize", [{k: r.get(k) for k in ("user", "status", "elbo_before", "elbo_after",
                                                          "elbo_change", "elbo_change_stderr", "bytes_4bit",
                                                          "bytes_ratio", "data_digest", "error")} for r in rows],
                    "Per-user specialists: held-out ELBO (bits/token) before/after, 4-bit bytes, data digest")
    for r in rows:
        print(f"{r['user']:12s} {r['status']:9s} " + (f"ELBO {r['elbo_before']:.3f} -> {r['elbo_after']:.3f}"
                                                     if r["status"] != "failed" else r["error"]))
    if failed:
        get_run_logger().warning("specialists failed for: %s", ", ".join(failed))
    return {"model": model, "general": general, "users": rows, "failed": failed}
