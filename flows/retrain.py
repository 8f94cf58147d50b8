"""``retrain`` flow (nightly): re-specialize, re-validate and re-publish the users whose data changed.

A user's data digest (names and contents of every document under ``users/<id>/data``) is
compared with the one recorded in the lineage of their latest published ensemble; users
with no published ensemble count as changed. Changed users go through specialize ->
validate -> publish (the factory's own stages, users in parallel); unchanged users are
skipped and listed. A failing user never fails the run: the result and the final state's
message name them.
"""

from __future__ import annotations

from prefect import flow, tags
from prefect.states import Completed
from pydantic import BaseModel, Field

from dlm_factory.flows.demo import PROFILES, FactoryConfig
from dlm_factory.flows.factory import Profile, specialize_validate, user_rows
from dlm_factory.flows.naming import run_name, short
from dlm_factory.home import factory_home
from dlm_factory.tasks.factory import data_changes_task, summary_task
from dlm_factory.tasks.specialize import list_users_task


class RetrainConfig(BaseModel):
    """What ``retrain`` retrains with: the factory's specialize and validate settings."""

    general: str | None = Field(None, description="the general DLM the ensembles use (empty: $FACTORY_HOME/models/stdlib-dlm)")
    users: list[str] | None = Field(None, description="users to consider (empty: every user under <data_root>/users/)")
    data_root: str | None = Field(None, description="root holding users/<id>/data (empty: $FACTORY_HOME)")
    catalog: str | None = Field(None, description="catalog root URL (empty: $FACTORY_CATALOG or the embedded file:// catalog)")
    stages: FactoryConfig = Field(default_factory=lambda: PROFILES["default"],
                                  description="specialize/ensemble settings (the factory's; other stages are unused)")


@flow(name="retrain", log_prints=True, flow_run_name=run_name("retrain", base=None, extra="profile"))
def retrain_flow(profile: Profile = "default", config: RetrainConfig | None = None) -> dict:
    """Specialize -> validate -> publish each user whose data digest changed since their last published ensemble.

    profile: the factory profile whose specialize/ensemble settings apply (``default`` or ``smoke``),
    unless ``config.stages`` is set. Unchanged users are skipped and listed in the result.
    """
    cfg = config or RetrainConfig(stages=PROFILES[profile])
    if config is not None and "stages" not in config.model_fields_set:
        cfg = cfg.model_copy(update={"stages": PROFILES[profile]})
    home = str(factory_home())
    data_root = cfg.data_root or home
    general = cfg.general or str(factory_home() / "models" / "stdlib-dlm")
    with tags("retrain", f"base:{short(general)}"):
        users = cfg.users or list_users_task(data_root)
        changes = data_changes_task(data_root, users, cfg.catalog)
        changed = changes["changed"]
        if changed:
            specialists, validated = specialize_validate(cfg.stages, changed, general, data_root, short(general),
                                                         cfg.catalog)
            rows = list(user_rows(changed, specialists, validated).values())
        else:
            rows = []
        rows += [{"user": u, "status": "unchanged"} for u in changes["unchanged"]]
        for r in rows:
            r["data_digest"] = changes["digests"][r["user"]]
        summary_task("retrain-summary", {"Users": rows}, f"retrain: {len(changed)} changed, "
                                                         f"{len(changes['unchanged'])} unchanged")
    failed = [r["user"] for r in rows if r["status"] not in {"ok", "unchanged"}]
    for r in rows:
        print(f"{r['user']:12s} {r['status']}")
    result = {"changed": changed, "unchanged": changes["unchanged"], "users": rows, "failed": failed}
    return Completed(message=(f"users failed: {', '.join(failed)}" if failed else
                              f"{len(changed)} retrained, {len(changes['unchanged'])} unchanged"), data=result)
