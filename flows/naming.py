"""Run names that say flow, base model and user(s): ``flow_run_name`` callables for every flow.

Prefect calls them inside the run, where ``prefect.runtime.flow_run.parameters`` holds the
run's parameters; a path or URL shows as its last component, several users as a list.
"""

from __future__ import annotations

from collections.abc import Callable


def short(value) -> str:
    """The last component of a path or URL (``None``/empty: ``stdlib``, the embedded base)."""
    if not value:
        return "stdlib"
    return str(value).rstrip("/").rsplit("/", 1)[-1] or str(value)


def users_label(users) -> str:
    """``all users``, one id, or up to three ids and a count."""
    if not users:
        return "all users"
    if isinstance(users, str):
        return users
    users = list(users)
    return ",".join(users[:3]) + (f"+{len(users) - 3}" if len(users) > 3 else "")


def run_name(flow: str, base: str | None = "base_model", users: str | None = None,
             extra: str | None = None, all_users: bool = True) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<flow> [· <extra>] · <base model> [· <users>]`` from the run's parameters.

    ``base``, ``users``, ``extra``: parameter names; an empty users parameter reads ``all users``
    (``all_users=False``: it is left out, e.g. a general model published under no user).
    """
    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        parts = [flow]
        if extra:
            parts.append(str(params.get(extra) or extra))
        if base:
            parts.append(short(params.get(base)))
        if users and (params.get(users) or all_users):
            parts.append(users_label(params.get(users)))
        return " · ".join(parts)

    return name
