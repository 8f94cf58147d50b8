"""Options and config helpers shared by the command modules."""

from __future__ import annotations

import argparse


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where a compute command runs (decided once by ``dlm.runtime.configure``)."""
    parser.add_argument("--device", default=None, metavar="auto|cpu|cuda[:N]",
                        help="compute device (default: $FACTORY_DEVICE, else auto = CUDA when available)")


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
        raise FactoryError(f"invalid {'.'.join(map(str, err['loc']))}: {err['msg']}") from e
