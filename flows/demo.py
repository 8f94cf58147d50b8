"""The umbrella ``factory`` flow's settings: one pydantic model (the UI's form) and two named profiles.

``default`` is the embedded demo (``make demo``: every stage on 2 CPU cores, budgeted to stay
under ~15 minutes after the install; docs/orchestration.md has the per-stage estimate) and
``smoke`` shrinks every stage to a few seconds (what CI runs on a fresh ``FACTORY_HOME`` to
prove the entry point works end to end). Its gate tests plumbing, not quality: point
estimates (``z=0``) with a margin of -1 bit/token (the ensemble may be up to that much worse
than a member) and no sample checks, so that the publish -> pull -> answer path runs on
models trained for seconds, whose ELBO differences are a few thousandths of a bit either way
(measured: json +0.0024 with the pool form). The default profile keeps the gate's defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from dlm_factory.dlm.data.users import DEMO_USERS
from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.evaluation.decoding import DraftEvalConfig
from dlm_factory.dlm.evaluation.gate import GateConfig
from dlm_factory.dlm.evaluation.instruct import InstructEvalConfig
from dlm_factory.dlm.sampling.sampler import SamplerConfig, random_order
from dlm_factory.dlm.sampling.speculative import SpeculativeConfig
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
from dlm_factory.dlm.stages.convert import ConvertConfig
from dlm_factory.dlm.stages.distill import DistillConfig
from dlm_factory.dlm.stages.ensemble import EnsembleConfig
from dlm_factory.dlm.stages.instruct import InstructConfig
from dlm_factory.dlm.stages.scale import ScaleConfig
from dlm_factory.dlm.stages.specialize import SPECIALIST_BASE, SPECIALIST_CONVERT, SpecializeConfig
from dlm_factory.dlm.train.config import TrainConfig

TEMPLATE_USER = "template"  # EnsembleConfig needs a user: each user's copy replaces it


# The demo's users: three of the four stdlib packages (docs/orchestration.md has the time budget).
DEMO_FACTORY_USERS = {u: DEMO_USERS[u] for u in ("email", "json", "unittest")}


def _demo_scale() -> ScaleConfig:
    """A two-rung ladder from scratch, in process (no torchrun start-up): 1.2e12 FLOPs in all (~1 min on 2 cores)."""
    return ScaleConfig(ladder="2x64,2x128", init="scratch", max_chars=1_000_000, budget=3e11, zero=None,
                       eval=EvalConfig(mc_samples=8, max_windows=16))


def _demo_ensemble() -> EnsembleConfig:
    """The gate's checks at an eighth of the standalone default's evaluation (32 windows x 8 draws, 4 lambdas,
    8 sampled prompts): about half a minute per user on 2 cores (estimate) instead of a few minutes."""
    return EnsembleConfig(user=TEMPLATE_USER, lambdas=[0.25, 0.5, 1.0, 2.0], max_windows=32, mc_samples=8,
                          gate=GateConfig(prompts=8))


def _demo_distill() -> DistillConfig:
    """Half the standalone default's trajectories and two thirds of its steps (~1 min on 2 cores, estimate):
    a demo of the stage; docs/distill.md has the recipe that measured 1.4-1.6x AR + KV at 128 tokens."""
    return DistillConfig(prompts=256, length=64, train=TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10))


class FactoryConfig(BaseModel):
    """Every stage's settings of the umbrella ``factory`` flow, in pipeline order."""

    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig, description="stdlib AR base model (when no base model is given)")
    convert: ConvertConfig = Field(default_factory=ConvertConfig, description="AR -> diffusion conversion")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out ELBO / NLL")
    distill: DistillConfig = Field(default_factory=_demo_distill, description="the AR teacher's greedy continuations distilled into the DLM (a faster speculative drafter)")
    draft_eval: DraftEvalConfig = Field(default_factory=DraftEvalConfig, description="speculative decoding with the converted and the distilled drafter: tokens per verification")
    scale: ScaleConfig = Field(default_factory=_demo_scale, description="the size ladder and its scaling-law fits (small: a demo of the stage)")
    instruct: InstructConfig = Field(default_factory=InstructConfig, description="instruction tuning (and its judge)")
    instruct_eval: InstructEvalConfig = Field(default_factory=InstructEvalConfig, description="held-out instructions")
    users: dict[str, str] = Field(default_factory=lambda: dict(DEMO_FACTORY_USERS), description="demo users: id -> the stdlib package that is their data")
    specialist_base: BootstrapConfig = Field(default_factory=lambda: SPECIALIST_BASE, description="the small AR model behind the specialists")
    specialist_convert: ConvertConfig = Field(default_factory=lambda: SPECIALIST_CONVERT, description="its conversion to a DLM")
    specialize: SpecializeConfig = Field(default_factory=SpecializeConfig, description="each user's QLoRA specialist")
    ensemble: EnsembleConfig = Field(default_factory=_demo_ensemble,
                                     description=f"each user's ensemble and its validation gate (user {TEMPLATE_USER!r} is replaced per user)")
    prompt: str = Field("import {package}\n", description="what each user's pulled ensemble answers ({package}: the user's package)")
    # random order: the demo's models are small enough that confidence-ordered greedy decoding collapses
    # into newlines ('#' and blank lines, measured on a fresh-clone demo); random order does not
    sampler: SamplerConfig = Field(default_factory=lambda: random_order(48), description="decoding of the answers (default: random-order ancestral sampling at temperature 1)")
    max_parallel: int = Field(2, ge=1, description="users trained at the same time")


def _tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=2e-3, warmup_steps=2, log_every=5, **kw)


PROFILES: dict[str, FactoryConfig] = {
    "default": FactoryConfig(),
    "smoke": FactoryConfig(
        bootstrap=BootstrapConfig(max_chars=200_000, vocab_size=512, hidden_size=64, num_layers=2, num_heads=2,
                                  intermediate_size=128, seq_len=64, max_positions=256, train=_tiny(20)),
        convert=ConvertConfig(max_chars=100_000, seq_len=64, anneal_steps=5, train=_tiny(10)),
        eval=EvalConfig(seq_len=64, max_windows=4, mc_samples=4),
        distill=DistillConfig(max_chars=100_000, prompts=8, prompt_len=8, length=16, teacher_batch=8, train=_tiny(2)),
        draft_eval=DraftEvalConfig(prompts=2, speculative=SpeculativeConfig(length=16)),
        scale=ScaleConfig(ladder="1x32,2x32", init="scratch", max_chars=50_000, seq_len=32, budget=3e8, min_steps=5,
                          zero=None, curve_bins=4, train=TrainConfig(steps=1, batch_size=8, lr=2e-3, warmup_steps=0,
                                                                      log_every=5),
                          eval=EvalConfig(seq_len=32, mc_samples=2, max_windows=4)),
        instruct=InstructConfig(response_len=32, train=_tiny(5)),
        instruct_eval=InstructEvalConfig(response_len=32, max_examples=8, gen_examples=4, mc_samples=2),
        users={"json": "json", "email": "email"},
        specialist_base=SPECIALIST_BASE.model_copy(update={"max_chars": 100_000, "seq_len": 64, "train": _tiny(10)}),
        specialist_convert=ConvertConfig(max_chars=50_000, seq_len=64, anneal_steps=3, train=_tiny(6)),
        specialize=SpecializeConfig(seq_len=64, train=_tiny(4), eval_windows=4, mc_samples=2),
        ensemble=EnsembleConfig(user=TEMPLATE_USER, lambdas=[1.0], seq_len=32, max_windows=6, mc_samples=2,
                                gate=GateConfig(prompts=0, z=0.0, margin=-1.0)),
        sampler=random_order(16),
    ),
}
