"""``factory demo``: run the factory's flows on the embedded defaults (ephemeral Prefect API)."""

from __future__ import annotations

import argparse
import os


def prefect_env() -> None:
    """Keep Prefect's state under $FACTORY_HOME/prefect and route dlm's logs into flow runs."""
    from dlm_factory.home import factory_home

    os.environ.setdefault("PREFECT_HOME", str(factory_home() / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dlm_factory")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network beyond the object store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole factory on embedded defaults (CPU, no network)",
                       description="Bootstrap the stdlib AR model, convert it to a diffusion LM, instruction-"
                                   "tune it, and evaluate every stage, as Prefect flows on the ephemeral API. "
                                   "Outputs go to $FACTORY_HOME (default ./.factory); re-runs reuse finished stages.")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    prefect_env()
    from dlm_factory.flows.demo import demo_flow

    demo_flow()
    return 0
