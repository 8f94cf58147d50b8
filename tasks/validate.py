"""Prefect tasks over dlm.stages.ensemble and the catalog: build and gate one user's ensemble, publish a passing one.

Orchestration only. The build is skipped when ``is_done`` (same members by digest, same
user data, same config). Publishing puts the members in the catalog first (content-
addressed: an unchanged member is the version already there), pins the ensemble to their
catalog versions and digests, then publishes the ensemble under ``ensembles/<user>/``.
A gate that failed publishes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import get_run_logger, task

from dlm_factory.catalog import Catalog, StorageError
from dlm_factory.dlm.checkpoint.ensemble import read_spec, repin
from dlm_factory.dlm.checkpoint.record import read_record
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.ensemble import (
    EnsembleConfig,
    build_ensemble,
    ensemble_key,
    gate_passed,
)
from dlm_factory.tasks.models import reuse
from dlm_factory.tasks.retry import retry_on

ENSEMBLE_NAME = "assistant"  # the catalog name of every user's ensemble: ensembles/<user>/assistant


@task(name="build-ensemble", tags=["gpu"], retries=1, retry_condition_fn=retry_on(OSError, never=(FactoryError,)),
      task_run_name="ensemble {user}")
def ensemble_task(general: str, specialist: str, user: str, output: str, names: dict[str, str],
                  base: str | None = None, config: EnsembleConfig | None = None) -> dict:
    """Tune and gate ``user``'s ensemble into ``output``; returns the verdict and the chosen combination."""
    cfg = (config or EnsembleConfig(user=user)).model_copy(update={"user": user})
    key = ensemble_key(general, specialist, cfg, base)
    if not reuse(output, key):
        build_ensemble(general, specialist, output, cfg, base=base, names=names, overwrite=Path(output).exists())
    spec = read_spec(output)
    return {"user": user, "output": output, "passed": gate_passed(output), "rule": spec.combination.rule,
            "weights": dict(spec.combination.weights)}


@task(name="publish-ensemble", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on(StorageError),
      task_run_name="publish ensemble {user}")
def publish_ensemble_task(ensemble_dir: str, user: str, members: dict[str, str], names: dict[str, str],
                          root: str | None = None) -> dict:
    """Publish the members, pin the ensemble to their catalog versions, publish it for ``user``."""
    if not gate_passed(ensemble_dir):
        raise FactoryError(f"{ensemble_dir}: the validation gate did not pass; nothing is published")
    cat = Catalog(root)
    kinds = {"specialist": "specialist"}
    for role, path in members.items():
        cat.publish(path, names[role], kind=kinds.get(role, "general"), progress=False)
    spec = read_spec(ensemble_dir)
    pinned = cat.ensemble_spec([(m.name, m.role) for m in spec.members])
    with tempfile.TemporaryDirectory(prefix="ensemble-") as tmp:
        staged = Path(tmp) / "ensemble"
        shutil.copytree(ensemble_dir, staged, ignore=shutil.ignore_patterns(".ensemble-local.json"))
        repin(staged, {m.name: m for m in pinned.members})
        record = read_record(ensemble_dir)  # its user-data digest: what `retrain` compares with
        data = {user: record.inputs["data"]} if record and "data" in record.inputs else {}
        res = cat.publish(staged, ENSEMBLE_NAME, kind="ensemble", user=user, progress=False,
                          lineage={"data_digests": data})
    get_run_logger().info("%s ensemble %s (%s)", "published" if res.created else "unchanged", res.ref, res.digest)
    return {"user": user, "ref": res.ref, "version": res.version, "digest": res.digest, "created": res.created}
