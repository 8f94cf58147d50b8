"""``factory`` demo flow: every stage on the embedded defaults, in pipeline order."""

from __future__ import annotations

from prefect import flow

from dlm_factory.flows.convert import convert_flow
from dlm_factory.flows.instruct import instruct_flow


@flow(name="factory-demo", log_prints=True)
def demo_flow() -> dict:
    """Bootstrap -> convert -> evaluate -> instruct (later stages are added here as they land)."""
    converted = convert_flow()
    instructed = instruct_flow(model=converted["model"])
    return {"convert": converted, "instruct": instructed}
