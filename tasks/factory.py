"""Prefect tasks of the umbrella ``factory`` and the ``retrain`` flows: catalog round trip, answers, summary.

Orchestration only. Pulling goes through the catalog client (every file's sha256 checked
before the dir appears); a pull whose destination already holds that exact version is
reused. Answers are cached by Prefect on the pulled ensemble's digest, the prompt and the
sampler settings (JSON results, never pickles). Users whose data digest equals the one
recorded with their latest published ensemble are "unchanged" for ``retrain``.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from dlm_factory.catalog import Catalog, CatalogError, StorageError
from dlm_factory.dlm.data.users import check_user_id, user_data_digest
from dlm_factory.dlm.sampling.sampler import SamplerConfig
from dlm_factory.tasks.models import artifact_key, digest_cache_key, markdown_table
from dlm_factory.tasks.retry import retry_on
from dlm_factory.tasks.validate import ENSEMBLE_NAME

PULL_MARKER = ".catalog-pull.json"  # written by Catalog.pull: the ref and digest a pulled dir holds


@task(name="pull-ensemble", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on(StorageError),
      task_run_name="pull {ref}")
def pull_ensemble_task(ref: str, user: str, dest: str, root: str | None = None) -> dict:
    """Pull ``user``'s published ensemble ``ref`` (members included) into ``dest``, every file checksum-verified.

    Reused when ``dest`` already holds that version (same manifest digest); a link artifact
    points at the catalog entry.
    """
    check_user_id(user)
    ref = ref.removeprefix(f"{user}/")  # a published ref (user/name:version) names the user already
    cat = Catalog(root)
    shown = cat.show(ref, user=user)  # the manifest (latest followed), its URL, the card checked
    manifest = shown.manifest
    marker = Path(dest) / PULL_MARKER
    held = json.loads(marker.read_text()) if marker.is_file() else {}
    if held.get("digest") == manifest.digest:
        get_run_logger().info("reusing the pull of %s at %s (same digest %s)", shown.ref, dest, manifest.digest)
        files, downloaded, cached = len(manifest.files), 0, 0
    else:
        pulled = cat.pull(shown.ref.removeprefix(f"{user}/"), dest, user=user, force=marker.is_file(), progress=False)
        files, downloaded, cached = len(pulled.manifest.files), pulled.downloaded_bytes, pulled.cached_files
    create_link_artifact(key=artifact_key(f"catalog-{user}"), link=shown.url, link_text=shown.ref,
                         description=f"catalog entry of {user}'s ensemble ({manifest.digest})")
    return {"user": user, "ref": shown.ref, "digest": manifest.digest, "path": dest, "files": files,
            "downloaded_bytes": downloaded, "cached_files": cached, "url": shown.url}


@task(name="answer", cache_key_fn=digest_cache_key("ensemble"), persist_result=True, result_serializer="json",
      task_run_name="answer {user}")
def answer_task(ensemble: str, user: str, prompt: str, sampler: SamplerConfig | None = None) -> dict:
    """One answer to ``prompt`` from the ensemble in ``ensemble`` (a pulled catalog dir), members verified."""
    import time

    from dlm_factory.dlm.checkpoint.ensemble import load_ensemble

    loaded = load_ensemble(ensemble)
    start = time.perf_counter()
    text = loaded.generate([prompt], sampler or SamplerConfig(length=48), chat=False)[0]
    return {"user": user, "prompt": prompt, "answer": text, "seconds": round(time.perf_counter() - start, 2)}


@task(name="gate-report", task_run_name="gate report {user}")
def gate_report_task(user: str, ensemble_dir: str) -> bool:
    """``user``'s gate report (gate.md: the checks table first, then the contenders) as a markdown artifact.

    Returns whether the report is there (a build that failed before its gate wrote none).
    """
    report = Path(ensemble_dir) / "gate.md"
    if not report.is_file():
        return False
    create_markdown_artifact(key=artifact_key(f"gate-{user}"), markdown=report.read_text(),
                             description=f"validation gate of {user}'s ensemble")
    return True


@task(name="summary", task_run_name="summary {key}")
def summary_task(key: str, sections: dict[str, list[dict]], title: str) -> str:
    """The closing tables (figures first, paths last) as one markdown artifact; returns the markdown."""
    md = f"### {title}\n\n" + "\n".join(f"**{name}**\n\n" + markdown_table(rows) for name, rows in sections.items())
    create_markdown_artifact(key=artifact_key(key), markdown=md, description=title)
    return md


@task(name="data-changes", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on(StorageError, OSError),
      task_run_name="data changes of {users}")
def data_changes_task(data_root: str, users: list[str], root: str | None = None) -> dict:
    """Split ``users`` into those whose data digest differs from their latest published ensemble's and the rest.

    A user with no published ensemble (or one published without a recorded data digest) counts as changed.
    """
    cat = Catalog(root)
    changed, unchanged, digests = [], [], {}
    for user in users:
        now = user_data_digest(data_root, user)
        digests[user] = now
        try:
            published = cat.resolve(ENSEMBLE_NAME, user=user).lineage.data_digests.get(user)
        except CatalogError:  # never published
            published = None
        (unchanged if published == now else changed).append(user)
    get_run_logger().info("changed: %s; unchanged: %s", ", ".join(changed) or "none", ", ".join(unchanged) or "none")
    return {"changed": changed, "unchanged": unchanged, "digests": digests}
