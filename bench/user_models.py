"""The models the specialist and ensemble benchmarks share, built with the factory's own stages and cached.

    general AR  bootstrap on the general corpus (default: the stdlib train split without
                the demo users' packages, ``GENERAL_TRAIN``: the general model never saw a user's data)
    general DLM convert
    base AR     bootstrap of a small model on the general model's tokenizer, same corpus
    base DLM    convert: the specialists' base (the untuned small DLM)
    specialists one QLoRA specialist per user (``dlm.stages.specialize``), on the user's train split

Every output is skipped when its stage record says it is done (same inputs by digest, same
config), so a second bench run measures only. The defaults are the demo's embedded ones
(``BootstrapConfig()``, ``ConvertConfig()``, ``SPECIALIST_BASE``, ``SPECIALIST_CONVERT``,
``SpecializeConfig()``); ``--small-budget`` scales the general model and its training down
for a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dlm_factory.dlm.checkpoint.record import is_done
from dlm_factory.dlm.data.users import DEMO_USERS, write_demo_users
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap, bootstrap_key
from dlm_factory.dlm.stages.convert import ConvertConfig, convert, convert_key
from dlm_factory.dlm.stages.specialize import (
    SPECIALIST_BASE,
    SPECIALIST_CONVERT,
    SpecializeConfig,
    specialize,
    specialize_key,
)
from dlm_factory.dlm.train.config import TrainConfig


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The build's options (shared by the benches, so both build the same models from the same flags)."""
    p.add_argument("--work", help="models, users' data and specialists (default: $FACTORY_HOME/bench-users)")
    p.add_argument("--users", default=",".join(DEMO_USERS), help="demo users (one stdlib package each)")
    p.add_argument("--small-budget", action="store_true",
                   help="general 192x4 on a 2048-token vocabulary, 200 + 100 steps; base 200 + 100 steps "
                        "(tens of minutes on a shared 2-core machine)")
    p.add_argument("--spec-steps", type=int, help="specialist training steps (default: SpecializeConfig's)")
    p.add_argument("--spec-lr", type=float, help="specialist learning rate (default: SpecializeConfig's)")
    p.add_argument("--spec-rank", type=int, help="LoRA rank (default: QLoraConfig's)")


@dataclass
class Models:
    work: Path
    root: str  # holds users/<id>/data
    users: list[str]
    general_ar: Path
    general: Path
    base_ar: Path
    base: Path
    specialists: dict[str, Path]
    spec_config: SpecializeConfig
    seconds: dict[str, float]


def configs(args) -> tuple[BootstrapConfig, ConvertConfig, BootstrapConfig, ConvertConfig, SpecializeConfig]:
    general, general_convert = BootstrapConfig(), ConvertConfig()
    base, base_convert = SPECIALIST_BASE, SPECIALIST_CONVERT
    if args.small_budget:
        general = general.model_copy(update={
            "max_chars": 2_000_000, "vocab_size": 2048, "hidden_size": 192, "num_layers": 4, "num_heads": 4,
            "intermediate_size": 512, "train": TrainConfig(steps=200, batch_size=16, lr=2e-3, warmup_steps=20)})
        general_convert = general_convert.model_copy(update={
            "max_chars": 1_000_000, "anneal_steps": 30,
            "train": TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10)})
        base = base.model_copy(update={"train": base.train.model_copy(update={"steps": 200})})
        base_convert = base_convert.model_copy(update={
            "anneal_steps": 30, "train": base_convert.train.model_copy(update={"steps": 100})})
    spec = SpecializeConfig()
    train = {k: v for k, v in (("steps", args.spec_steps), ("lr", args.spec_lr)) if v is not None}
    if train:
        spec = spec.model_copy(update={"train": spec.train.model_copy(update=train)})
    if args.spec_rank is not None:
        spec = spec.model_copy(update={"qlora": spec.qlora.model_copy(update={"rank": args.spec_rank,
                                                                              "alpha": 2 * args.spec_rank})})
    return general, general_convert, base, base_convert, spec


def build(args, *, default_work: Path) -> Models:
    """Every model the benches compare, built (or found done) in ``args.work``."""
    work = Path(args.work) if args.work else default_work
    work.mkdir(parents=True, exist_ok=True)
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    unknown = sorted(set(users) - set(DEMO_USERS))
    if unknown:
        raise SystemExit(f"not demo users: {', '.join(unknown)}")
    root = str(work / "home")
    write_demo_users(root, {u: DEMO_USERS[u] for u in users})
    gcfg, gccfg, bcfg, bccfg, scfg = configs(args)
    seconds: dict[str, float] = {}

    def stage(name: str, out: Path, key, run) -> Path:
        if not is_done(out, key):
            say(f"building {name}")
            t = time.perf_counter()
            run()
            seconds[name] = round(time.perf_counter() - t, 1)
        return out

    general_ar = stage("general AR", work / "general-ar", bootstrap_key(gcfg),
                       lambda: bootstrap(gcfg, work / "general-ar", progress=False, overwrite=True))
    general = stage("general DLM", work / "general-dlm", convert_key(general_ar, gccfg),
                    lambda: convert(general_ar, work / "general-dlm", gccfg, progress=False, overwrite=True))
    bcfg = bcfg.model_copy(update={"tokenizer": str(general_ar)})
    base_ar = stage("base AR", work / "base-ar", bootstrap_key(bcfg),
                    lambda: bootstrap(bcfg, work / "base-ar", progress=False, overwrite=True))
    base = stage("base DLM", work / "base-dlm", convert_key(base_ar, bccfg),
                 lambda: convert(base_ar, work / "base-dlm", bccfg, progress=False, overwrite=True))
    specialists = {}
    for u in users:
        out = work / "specialists" / u
        specialists[u] = stage(f"specialist {u}", out, specialize_key(base, root, u, scfg),
                               lambda u=u, out=out: specialize(base, root, u, out, scfg, general=general,
                                                               progress=False, overwrite=True))
    return Models(work, root, users, general_ar, general, base_ar, base, specialists, scfg, seconds)
