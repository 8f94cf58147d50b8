"""``factory demo``: run the factory's flows on the embedded defaults (ephemeral Prefect API)."""

from __future__ import annotations

import argparse
import os
import sys

from dlm_factory.cli.options import add_device


def prefect_env() -> None:
    """Keep Prefect's state under $FACTORY_HOME/prefect and route dlm's logs into flow runs."""
    from dlm_factory.home import factory_home

    # Prefect creates PREFECT_HOME without its parents: on a fresh clone .factory does not exist yet.
    os.environ.setdefault("PREFECT_HOME", str(factory_home(create=True) / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dlm_factory")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network beyond the object store
    # The first start of the ephemeral API creates and migrates its SQLite database: measured here at
    # over 20 s (Prefect's default limit) on a busy 2-core machine, which failed a fresh clone's demo.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole factory on embedded defaults (CPU, no network)",
                       description="The umbrella `factory` flow on the ephemeral Prefect API: bootstrap the stdlib "
                                   "AR model, convert it to a diffusion LM, a small scaling ladder, instruction "
                                   "tuning, one specialist per demo user, validation, publishing, pulling the "
                                   "ensembles back (verified) and one answer per user, then a summary table. "
                                   "Outputs go to $FACTORY_HOME (default ./.factory); re-runs reuse finished stages.")
    p.add_argument("--profile", choices=["default", "smoke"], default="default",
                   help="default: the embedded demo (under ~15 min on 2 cores); smoke: tiny budgets (CI, ~2 min)")
    add_device(p)
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    prefect_env()
    from dlm_factory.flows.factory import factory_flow

    result = factory_flow(profile=args.profile)
    if result["failed"]:
        print(f"factory: users failed: {', '.join(result['failed'])} (the others are done; see the summary)",
              file=sys.stderr)
    return 0
