"""``publish`` flow: put a validated model dir into the object-store catalog."""

from __future__ import annotations

from prefect import flow

from dlm_factory.flows.naming import run_name
from dlm_factory.tasks.publish import publish_task


@flow(name="publish", log_prints=True, flow_run_name=run_name("publish", base="src", users="user", extra="name", all_users=False))
def publish_flow(src: str, name: str, kind: str = "general", user: str | None = None, root: str | None = None,
                 base_model: str | None = None, parents: list[str] | None = None,
                 evals: list[dict] | None = None, lineage: dict | None = None) -> dict:
    """Publish ``src`` as a new immutable version of ``name`` (a no-op if that content is there).

    src: the model dir (safetensors only); kind: general | specialist | ensemble (ensembles need user).
    root: catalog URL (file:// or s3://); empty = $FACTORY_CATALOG or ./.factory/catalog.
    """
    res = publish_task(src, name, kind=kind, user=user, root=root, base_model=base_model,
                       parents=parents, evals=evals, lineage=lineage)
    print(f"{'published' if res.created else 'unchanged'}: {res.ref} {res.digest}")
    return {"ref": res.ref, "version": res.version, "digest": res.digest, "created": res.created, "url": res.url}
