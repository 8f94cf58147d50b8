"""Options and config helpers shared by the command modules."""

from __future__ import annotations

import argparse


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where a compute command runs (decided once by ``dlm.runtime.configure``)."""
    parser.add_argument("--device", default=None, metavar="auto|cpu|cuda[:N]",
                        help="compute device (default: $FACTORY_DEVICE, else auto = CUDA when available)")


def add_training(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float) -> None:
    """The optimisation flags every training command shares (defaults shown are the stage's own)."""
    parser.add_argument("--steps", type=int, help=f"training steps (default: {steps})")
    parser.add_argument("--batch-size", type=int, help=f"sequences per step (default: {batch_size})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: {lr:g})")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="auto (default: bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    parser.add_argument("--checkpoint-dir", help="checkpoint/resume dir (default: none)")


def stage_config(base, args: argparse.Namespace, **values):
    """``base`` with the given values and the training flags of ``add_training`` set, validated as one."""
    def make():
        train = with_values(base.train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            precision=args.precision, **values.pop("train", {}))
        return with_values(base, train=train.model_dump(), **values)

    return validated(make)


def with_values(obj, **values):
    """Copy of a pydantic config with the given non-None values set (validated)."""
    data = obj.model_dump()
    data.update({k: v for k, v in values.items() if v is not None})
    return type(obj).model_validate(data)


def validated(make):
    """Build a config with ``make()``; a pydantic ValidationError becomes one FactoryError line."""
    from pydantic import ValidationError

    from dlm_factory.dlm.errors import FactoryError

    try:
        return make()
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        where = ".".join(map(str, err["loc"]))
        raise FactoryError(f"invalid {where}: {msg}" if where else f"invalid settings: {msg}") from e
