"""Prefect task over catalog publishing: the flow run id goes into lineage, the card into an artifact.

Publishing is idempotent (a version is named by its content digest), so a retry after a store
failure is safe: it either finds the version complete or completes it.
"""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from dlm_factory.catalog import Catalog, Published, StorageError
from dlm_factory.tasks.retry import retry_on

# Retry transient store failures only; a bad name or a bad model dir will not get better.
_retry_on_storage_error = retry_on(StorageError)


@task(name="publish", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_storage_error,
      task_run_name="publish {name}")
def publish_task(src: str, name: str, kind: str = "general", user: str | None = None, root: str | None = None,
                 base_model: str | None = None, base_model_relation: str | None = None,
                 parents: list[str] | None = None, tags: list[str] | None = None, license: str = "apache-2.0",
                 evals: list[dict] | None = None, lineage: dict | None = None) -> Published:
    """Publish the model dir ``src`` as ``name`` (see catalog.Catalog.publish); ``root`` defaults to
    $FACTORY_CATALOG or the embedded file:// catalog. Lineage gets this flow run's id."""
    from prefect.runtime import flow_run

    values = dict(lineage or {})
    if flow_run.id and not values.get("flow_run_id"):
        values["flow_run_id"] = str(flow_run.id)
    cat = Catalog(root)
    res = cat.publish(src, name, kind=kind, user=user, base_model=base_model,
                      base_model_relation=base_model_relation, parents=parents or (), tags=tags or (),
                      license=license, evals=evals, lineage=values, progress=False)
    card = cat.show(f"{name}:{res.version}", user=user if kind == "ensemble" else None).card
    body = card.split("\n---\n", 1)[1] if card.startswith("---\n") else card  # drop the YAML front matter
    status = "published" if res.created else "already published (same content)"
    create_markdown_artifact(
        key="catalog-" + re.sub(r"[^a-z0-9]+", "-", f"{user + '-' if user else ''}{name}").strip("-"),
        markdown=f"**{res.ref}** {status}\n\n`{res.url}`\n\n{body}",
        description=f"catalog: {res.ref}")
    get_run_logger().info("%s %s (%s) at %s", status, res.ref, res.digest, res.url)
    return res
