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
        epilog=EXIT_STATUS,
    )
    from nemo_paced import __version__

    parser.add_argument("--version", action="version", version=f"nemo-paced {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nemo_paced.console import quiet_third_party, setup_logging

    args = build_parser().parse_args(argv)
    quiet_third_party()
    setup_logging()
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `nemo-paced ... | head`: the reader has gone, nothing left to say
        _silence_stdout()
        return 141
    except SystemExit as stop:  # a handler's own one-line refusal of its input: the documented status 2
        if not isinstance(stop.code, str):
            raise
        print(stop.code, file=sys.stderr)
        return 2
    except Exception as error:  # the project's own errors: one line and the documented status
        status = exit_status(error)
        if status is None:
            raise
        print(f"nemo-paced {args.command}: error: {error}", file=sys.stderr)
        return status


EXIT_STATUS = """exit status (every command): 0 done; 1 a rollout job failed or timed out; 2 bad input (a file,
field, path or setting, named in the one-line message); 3 the rollout service could not be reached;
75 a training stage was stopped by a signal with its checkpoint saved; 141 the output pipe was closed."""


def exit_status(error: BaseException) -> int | None:
    """The documented exit status of one of the project's own errors; None for anything else (a bug)."""
    from nemo_paced.rollout.client import JobFailed, ServiceUnavailable

    if isinstance(error, ServiceUnavailable):
        return 3
    if isinstance(error, (JobFailed, TimeoutError)):
        return 1
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return 2
    from nemo_paced.batches import SequenceTooLong
    from nemo_paced.overrides import OverrideError
    from nemo_paced.passrates import PassRateFileError
    from nemo_paced.problems import ProblemFormatError
    from nemo_paced.references import ReferenceFileError
    from nemo_paced.rollout.client import RequestRejected
    from nemo_paced.rollout.settings import SettingsChanged
    from nemo_paced.teacher.cache import CacheError
    from nemo_paced.train.local import RunMismatch
    from recipes import UnknownRecipe

    own = (SequenceTooLong, OverrideError, PassRateFileError, ProblemFormatError, ReferenceFileError,
           RequestRejected, RunMismatch, SettingsChanged, UnknownRecipe, CacheError)
    return 2 if isinstance(error, own) else None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
