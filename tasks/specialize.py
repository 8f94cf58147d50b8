"""Prefect tasks over dlm.stages.specialize: one user's specialist, and the user listing.

Orchestration only. A user's specialist is skipped when ``is_done`` (same base and
same user data by digest, same config); a failure is retried only when it is
transient (the object store, a process killed for memory), never for bad input,
and it never touches another user's output: every path comes from
``dlm.data.users.user_dir``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from dlm_factory.dlm.data.users import USER_ID, check_user_id, user_dir
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.specialize import SpecializeConfig, specialize, specialize_key
from dlm_factory.tasks.models import checkpoint_dir, reuse
from dlm_factory.tasks.retry import retry_on

# Retry errors that may pass (I/O, memory), never bad input (FactoryError).
_transient = retry_on(OSError, MemoryError, RuntimeError, never=(FactoryError,))


@task(name="list-users", retries=2, retry_delay_seconds=5)
def list_users_task(data_root: str) -> list[str]:
    """The user ids with a data prefix under ``<data_root>/users/`` (invalid names are skipped and logged)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(Path(data_root) / "users") if "://" not in data_root else
                                     data_root.rstrip("/") + "/users")
    if not fs.exists(path):
        return []
    names = sorted(Path(p.rstrip("/")).name for p in fs.ls(path, detail=False))
    bad = [n for n in names if not USER_ID.fullmatch(n)]
    if bad:
        get_run_logger().warning("skipping %d entries under users/ that are not valid user ids", len(bad))
    return [n for n in names if USER_ID.fullmatch(n)]


@task(name="specialize", tags=["gpu"], retries=2, retry_delay_seconds=10, retry_condition_fn=_transient,
      task_run_name="specialize {user}")
def specialize_task(model: str, data_root: str, user: str, output_root: str, general: str | None = None,
                    config: SpecializeConfig | None = None) -> dict:
    """``user``'s specialist at ``<output_root>/users/<user>/specialist`` (skipped when its data is unchanged)."""
    cfg = config or SpecializeConfig()
    check_user_id(user)
    output = user_dir(output_root, user, "specialist")
    key = specialize_key(model, data_root, user, cfg)
    if reuse(output, key):
        from dlm_factory.dlm.checkpoint.record import read_record

        return {"user": user, "status": "unchanged", "output": output, "data_digest": key.inputs["data"],
                **_row(read_record(output).result)}
    result = specialize(model, data_root, user, output, cfg, general=general, checkpoint_dir=checkpoint_dir(key),
                        progress=False, overwrite=Path(output).exists())
    return {"user": user, "status": "trained", "output": output, "data_digest": result.data_digest,
            **_row(result.report)}


def _row(report: dict) -> dict:
    elbo = report["elbo"]
    return {"elbo_before": elbo["untuned"]["bits_per_token"], "elbo_after": elbo["merged_4bit"]["bits_per_token"],
            "elbo_change": elbo["merged_4bit-untuned"]["bits_per_token"],
            "elbo_change_stderr": elbo["merged_4bit-untuned"]["stderr"],
            "bytes_4bit": report["bytes"]["merged_4bit"]["checkpoint"],
            "bytes_ratio": report["bytes_ratio_4bit_vs_bf16"]["checkpoint"]}


@task(name="demo-users")
def demo_users_task(data_root: str, users: dict[str, str]) -> list[str]:
    """Write the demo users' data (one stdlib package each) under ``data_root``; unchanged files stay as they are."""
    from dlm_factory.dlm.data.users import write_demo_users

    return write_demo_users(data_root, users)
