"""The ``factory`` command line: the composition root (it may import every layer; none imports it).

Each command group lives in its own module exposing ``register(subparsers)``;
modules stay light at import time (torch and Prefect are imported inside the
handlers) so ``factory catalog ...`` starts fast on serving nodes. User errors
(FactoryError, CatalogError) print one ``error: ...`` line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dlm_factory.catalog.cli import printable
from dlm_factory.catalog.errors import CatalogError
from dlm_factory.dlm.errors import FactoryError

COMMAND_MODULES = [
    "dlm_factory.cli.core",  # bootstrap, convert, eval
    "dlm_factory.cli.generate",  # generate
    "dlm_factory.cli.instruct",  # instruct, instruct-eval
    "dlm_factory.cli.distill",  # distill (AR teacher -> DLM, for parallel and speculative decoding)
    "dlm_factory.cli.specialize",  # specialize
    "dlm_factory.cli.ensemble",  # ensemble build/eval/route/show
    "dlm_factory.cli.scale",  # scale
    "dlm_factory.catalog.cli",  # catalog publish/pull/list/show/verify/gc
    "dlm_factory.cli.demo",  # demo (Prefect flows)
    "dlm_factory.cli.server",  # server start/stop/status (a real local Prefect stack)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory", description="Diffusion LM factory: convert, tune, validate, publish.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress reporting only
    try:
        if hasattr(args, "device"):  # a compute command
            from dlm_factory.dlm import runtime

            runtime.configure(args.device)  # device, precision policy and ranks, once per process
        return int(args.func(args) or 0)
    except (FactoryError, CatalogError) as e:
        print(f"error: {printable(e)}", file=sys.stderr)  # control characters escaped: one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
