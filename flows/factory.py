"""The umbrella ``factory`` flow: every stage in order, users mapped in parallel, a closing summary.

bootstrap -> convert (+ held-out eval) -> scale (a small ladder) -> instruct -> specialize every
user -> validate (build + gate each ensemble; a passing one is published with its members) ->
pull each published ensemble back from the catalog (every file checksum-verified) -> one answer
per user from the pulled ensemble -> the summary table (an artifact, and printed).

Every stage reuses a finished output by input digest (``is_done`` in the core, Prefect caches
for evaluations and answers), so a re-run with unchanged inputs only checks digests. A failing
user never fails the flow: its row says where it stopped, and the run ends ``Completed`` with a
message naming the failed users (also in the result's ``failed``).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, tags
from prefect.states import Completed

from dlm_factory.dlm.data.users import user_dir
from dlm_factory.flows.convert import convert_flow
from dlm_factory.flows.demo import PROFILES, FactoryConfig
from dlm_factory.flows.instruct import instruct_flow
from dlm_factory.flows.naming import run_name, short, users_label
from dlm_factory.flows.scale import scale_flow
from dlm_factory.flows.specialize import specialize_flow
from dlm_factory.flows.validate import validate_flow
from dlm_factory.home import factory_home
from dlm_factory.tasks.factory import (
    answer_task,
    gate_report_task,
    pull_ensemble_task,
    summary_task,
)
from dlm_factory.tasks.specialize import demo_users_task

Profile = Literal["default", "smoke"]


def _stage_flows(base: str, users: list[str]):
    """specialize and validate with run names saying base and users (their modules are shared with issue 14/15)."""
    label = f"{base} · {users_label(users)}"
    return (specialize_flow.with_options(flow_run_name=f"specialize · {label}"),
            validate_flow.with_options(flow_run_name=f"validate · {label}"))


def specialize_validate(config: FactoryConfig, users: list[str], general: str, home: str, base: str,
                        catalog: str | None) -> tuple[dict, dict]:
    """Specialize ``users`` (in parallel), then validate and publish their ensembles: shared with ``retrain``."""
    specialize, validate = _stage_flows(base, users)
    specialists = specialize(users=users, general=general, data_root=home, config=config.specialize,
                             base_config=config.specialist_base, convert_config=config.specialist_convert,
                             max_parallel=config.max_parallel)
    trained = [r["user"] for r in specialists["users"] if r["status"] != "failed"]
    validated = (validate(users=trained, general=general, base=specialists["model"], config=config.ensemble,
                          catalog=catalog) if trained else {"users": [], "not_published": []})
    for r in validated["users"]:
        gate_report_task(r["user"], user_dir(str(factory_home()), r["user"], "ensemble"))
    return specialists, validated


def user_rows(users: list[str], specialists: dict, validated: dict) -> dict[str, dict]:
    """One summary row per user from the specialize and validate results (the first failure wins)."""
    rows = {u: {"user": u, "status": "ok"} for u in users}
    for r in specialists["users"]:
        row = rows.setdefault(r["user"], {"user": r["user"], "status": "ok"})
        row.update({"specialist": r["status"], "elbo_before": r.get("elbo_before"), "elbo_after": r.get("elbo_after")})
        if r["status"] == "failed":
            row.update(status="failed: specialize", error=r.get("error"))
    for r in validated["users"]:
        row = rows[r["user"]]
        row["ensemble"] = r["status"]
        if r["status"] == "published":
            row["ref"] = r["detail"]
        elif row["status"] == "ok":
            row.update(status=f"failed: validate ({r['status']})", error=r.get("detail"))
    for row in rows.values():
        if row["status"] == "ok" and "ensemble" not in row:
            row.update(status="failed: validate", error="not validated")
    return rows


@flow(name="factory", log_prints=True, flow_run_name=run_name("factory", extra="profile"))
def factory_flow(profile: Profile = "default", config: FactoryConfig | None = None, base_model: str | None = None,
                 catalog: str | None = None):
    """The whole factory, end to end, with a summary table; failing users are listed, never fail the run.

    profile: ``default`` (the embedded demo) or ``smoke`` (tiny budgets, for CI); ignored when
    ``config`` is given. base_model: an AR checkpoint (dir or URL); empty = bootstrap the stdlib
    model. catalog: catalog root URL (file:// or s3://); empty = $FACTORY_CATALOG or the embedded one.
    """
    cfg = config or PROFILES[profile]
    home = str(factory_home())
    base = short(base_model)
    with tags("factory", f"profile:{profile if config is None else 'custom'}", f"base:{base}"):
        converted = convert_flow.with_options(flow_run_name=f"convert · {base}")(
            base_model=base_model, bootstrap_config=cfg.bootstrap, convert_config=cfg.convert, eval_config=cfg.eval)
        scaled = scale_flow.with_options(flow_run_name=f"scale · {base} · {cfg.scale.ladder}")(
            model=converted["base_model"], config=cfg.scale)
        instructed = instruct_flow.with_options(flow_run_name=f"instruct · {short(converted['model'])}")(
            model=converted["model"], config=cfg.instruct, eval_config=cfg.instruct_eval)
        users = demo_users_task(home, cfg.users)
        specialists, validated = specialize_validate(cfg, users, converted["model"], home, base, catalog)
        rows = user_rows(users, specialists, validated)

        published = [u for u, r in rows.items() if r.get("ensemble") == "published"]
        pulls = {u: pull_ensemble_task.with_options(tags=[f"user:{u}"]).submit(
            rows[u]["ref"], u, user_dir(home, u, "pulled"), catalog) for u in published}
        answers = {}
        for u, fut in pulls.items():
            state = fut.wait() or fut.state
            if not state.is_completed():
                rows[u].update(status="failed: pull", error=str(state.message)[:300])
                continue
            pulled = fut.result()
            rows[u].update(digest=pulled["digest"], pulled=pulled["path"])
            prompt = cfg.prompt.replace("{package}", cfg.users.get(u, u))
            answers[u] = answer_task.with_options(tags=[f"user:{u}"]).submit(pulled["path"], u, prompt, cfg.sampler)
        for u, fut in answers.items():
            state = fut.wait() or fut.state
            if state.is_completed():
                out = fut.result()
                rows[u].update(prompt=out["prompt"], answer=out["answer"][:200], status="ok")
            else:
                rows[u].update(status="failed: answer", error=str(state.message)[:300])

        table = list(rows.values())
        stages = [{"stage": "convert", "figure": "DLM bits/token", "value": round(converted["dlm"]["bits_per_token"], 4),
                   "versus": round(converted["ar"]["bits_per_token"], 4), "path": converted["model"]},
                  {"stage": "scale", "figure": "DLM/AR compute multiplier",
                   "value": (scaled.get("multiplier") or {}).get("value"), "versus": None, "path": scaled["plot"]},
                  {"stage": "instruct", "figure": "tuned cond. bits/token",
                   "value": _cond(instructed["tuned"]), "versus": _cond(instructed["untuned"]),
                   "path": instructed["model"]}]
        summary = summary_task("factory-summary", {"Stages": stages, "Users": table},
                               f"factory ({profile if config is None else 'custom'}, base {base}): stages and users")
    print(summary)
    failed = [r["user"] for r in table if r["status"] != "ok"]
    result = {"convert": converted, "scale": scaled, "instruct": instructed, "specialize": specialists,
              "validate": validated, "users": table, "failed": failed}
    message = f"users failed: {', '.join(failed)}" if failed else f"all {len(table)} users ok"
    return Completed(message=message, data=result)


def _cond(result: dict) -> float | None:
    value = (result.get("likelihood") or {}).get("bits_per_token")
    return None if value is None else round(value, 4)
