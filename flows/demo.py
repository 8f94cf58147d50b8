"""``factory`` demo flow: every stage on the embedded defaults, in pipeline order.

Two profiles: ``default`` (the real embedded demo, about 10 minutes on 2 CPU cores)
and ``smoke`` (tiny model and budgets, well under a minute of compute: what CI runs
on a fresh ``FACTORY_HOME`` to prove that the entry point works end to end).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from dlm_factory.dlm.data.users import DEMO_USERS
from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.evaluation.instruct import InstructEvalConfig
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
from dlm_factory.dlm.stages.convert import ConvertConfig
from dlm_factory.dlm.stages.instruct import InstructConfig
from dlm_factory.dlm.stages.specialize import SpecializeConfig
from dlm_factory.dlm.train.config import TrainConfig
from dlm_factory.flows.convert import convert_flow
from dlm_factory.flows.instruct import instruct_flow
from dlm_factory.flows.specialize import SPECIALIST_BASE, SPECIALIST_CONVERT, specialize_flow
from dlm_factory.home import factory_home
from dlm_factory.tasks.specialize import demo_users_task


class DemoProfile(BaseModel):
    """The configs of every stage the demo runs."""

    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig, description="stdlib AR base model")
    convert: ConvertConfig = Field(default_factory=ConvertConfig, description="AR -> diffusion conversion")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out ELBO / NLL")
    instruct: InstructConfig = Field(default_factory=InstructConfig, description="instruction tuning (and its judge)")
    instruct_eval: InstructEvalConfig = Field(default_factory=InstructEvalConfig, description="held-out instructions")
    users: dict[str, str] = Field(default_factory=lambda: dict(DEMO_USERS), description="demo users: id -> the stdlib package that is their data")
    specialist_base: BootstrapConfig = Field(default_factory=lambda: SPECIALIST_BASE, description="the small AR model behind the specialists")
    specialist_convert: ConvertConfig = Field(default_factory=lambda: SPECIALIST_CONVERT, description="its conversion to a DLM")
    specialize: SpecializeConfig = Field(default_factory=SpecializeConfig, description="each user's QLoRA specialist")


def _tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=2e-3, warmup_steps=2, log_every=5, **kw)


PROFILES: dict[str, DemoProfile] = {
    "default": DemoProfile(),
    "smoke": DemoProfile(
        bootstrap=BootstrapConfig(max_chars=200_000, vocab_size=512, hidden_size=64, num_layers=2, num_heads=2,
                                  intermediate_size=128, seq_len=64, max_positions=256, train=_tiny(20)),
        convert=ConvertConfig(max_chars=100_000, seq_len=64, anneal_steps=5, train=_tiny(10)),
        eval=EvalConfig(seq_len=64, max_windows=4, mc_samples=4),
        instruct=InstructConfig(response_len=32, train=_tiny(5)),
        instruct_eval=InstructEvalConfig(response_len=32, max_examples=8, gen_examples=4, mc_samples=2),
        users={"json": "json", "email": "email"},
        specialist_base=SPECIALIST_BASE.model_copy(update={"max_chars": 100_000, "seq_len": 64, "train": _tiny(10)}),
        specialist_convert=ConvertConfig(max_chars=50_000, seq_len=64, anneal_steps=3, train=_tiny(6)),
        specialize=SpecializeConfig(seq_len=64, train=_tiny(4), eval_windows=4, mc_samples=2),
    ),
}


@flow(name="factory-demo", log_prints=True)
def demo_flow(profile: Literal["default", "smoke"] = "default") -> dict:
    """Bootstrap -> convert -> evaluate -> instruct -> per-user specialists (later stages are added as they land).

    profile: ``default`` (the embedded demo) or ``smoke`` (tiny budgets, for CI).
    """
    p = PROFILES[profile]
    home = str(factory_home())
    converted = convert_flow(bootstrap_config=p.bootstrap, convert_config=p.convert, eval_config=p.eval)
    instructed = instruct_flow(model=converted["model"], config=p.instruct, eval_config=p.instruct_eval)
    users = demo_users_task(home, p.users)
    specialists = specialize_flow(users=users, general=converted["model"], data_root=home, config=p.specialize,
                                  base_config=p.specialist_base, convert_config=p.specialist_convert)
    return {"convert": converted, "instruct": instructed, "specialize": specialists}
