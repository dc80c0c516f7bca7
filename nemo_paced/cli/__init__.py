"""The `nemo-paced` command line.

Each module in this package is one subcommand group and exposes `register(subparsers)`.
Modules import their heavy dependencies inside the handlers, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-paced",
        description=(
            "PACED distillation for the NeMo / Megatron stack: weight each training problem by "
            "w(p) = p^alpha (1-p)^beta of the student's pass rate p, estimated from K verified "
            "student rollouts. Run `nemo-paced COMMAND --help` for each command."
        ),
    )
    from nemo_paced import __version__

    parser.add_argument("--version", action="version", version=f"nemo-paced {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
