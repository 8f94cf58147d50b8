"""``validate`` flow: per user, build the ensemble "general DLM + the user's specialist", gate it, publish it if it passes.

Users are independent: a failing build or a failed gate is reported in the table and
the result, publishes nothing for that user, and never stops the others.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dlm_factory.dlm.data.users import user_dir
from dlm_factory.dlm.stages.ensemble import EnsembleConfig
from dlm_factory.flows.naming import run_name
from dlm_factory.home import factory_home
from dlm_factory.tasks.models import report_artifact
from dlm_factory.tasks.validate import ensemble_task, publish_ensemble_task


@flow(name="validate", log_prints=True, flow_run_name=run_name("validate", base="general", users="users"))
def validate_flow(users: list[str], general: str | None = None, base: str | None = None,
                  config: EnsembleConfig | None = None, catalog: str | None = None, publish: bool = True) -> dict:
    """Build, gate and (when it passes) publish each user's ensemble.

    general: the general DLM (default $FACTORY_HOME/models/stdlib-dlm); base: the specialists'
    base DLM, which enables the emulated-fine-tuning form (default $FACTORY_HOME/models/specialist-dlm).
    Specialists are read from $FACTORY_HOME/users/<id>/specialist; ensembles go to .../ensemble.
    catalog: catalog root URL (default $FACTORY_CATALOG or the embedded file:// catalog).
    """
    home = factory_home()
    general = general or str(home / "models" / "stdlib-dlm")
    base = base or str(home / "models" / "specialist-dlm")
    rows = []
    for user in users:
        names = {"general": "stdlib-dlm", "specialist": f"specialist-{user}", "base": "specialist-base"}
        members = {"general": general, "specialist": user_dir(str(home), user, "specialist"), "base": base}
        cfg = (config or EnsembleConfig(user=user)).model_copy(update={"user": user, "data_root": str(home)})
        built = ensemble_task.submit(general, members["specialist"], user, user_dir(str(home), user, "ensemble"),
                                     names, base, cfg)
        state = built.wait() or built.state
        if not state.is_completed():
            rows.append({"user": user, "status": "failed", "detail": str(state.message)[:300]})
            continue
        verdict = built.result()
        if not verdict["passed"]:
            rows.append({"user": user, "status": "gate failed", "detail": "not published (see gate.md)"})
            continue
        if not publish:
            rows.append({"user": user, "status": "passed", "detail": verdict["rule"]})
            continue
        published = publish_ensemble_task.submit(verdict["output"], user, members, names, catalog)
        pstate = published.wait() or published.state
        rows.append({"user": user, "status": "published" if pstate.is_completed() else "publish failed",
                     "detail": published.result()["ref"] if pstate.is_completed() else str(pstate.message)[:300]})
    report_artifact("validate", rows, "Per-user ensembles: gate verdict and catalog reference")
    for r in rows:
        print(f"{r['user']:12s} {r['status']:14s} {r['detail']}")
    failed = [r["user"] for r in rows if r["status"] not in {"published", "passed"}]
    if failed:
        get_run_logger().warning("no ensemble published for: %s", ", ".join(failed))
    return {"users": rows, "not_published": failed}
