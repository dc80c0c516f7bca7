"""What a person running `nemo-paced` or a bench script sees on the terminal or in a SLURM log.

Third-party libraries (torch, transformers, megatron-core, ModelOpt, TRL) print dozens of deprecation
and "experimental feature" warnings on import that say nothing about the run; `quiet_third_party()`
hides them for the command line and benches only (tests keep every warning). `setup_logging()` shows
this package's INFO messages (resume, progress, warnings about degenerate results) one per line with a
time stamp, readable in a log file, and other packages' messages from WARNING up.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

THIRD_PARTY = r"(torch|transformers|megatron|modelopt|trl|datasets|huggingface_hub|nemo_run|apex|accelerate|" \
              r"transformer_engine|pydantic|numpy|tqdm|uvicorn|fastapi|starlette)(\.|$)"


def quiet_third_party() -> None:
    """Hide warnings raised inside third-party packages in this process. Only warning filters change
    (pytest restores them after each test), never the environment; a bench script calls this at module
    level, so the ranks it spawns, which import it again, are quiet too."""
    for category in (UserWarning, DeprecationWarning, FutureWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)


def setup_logging() -> None:
    """INFO and up from nemo_paced, WARNING and up from everything else, to stderr, one line each. Off a
    terminal (a SLURM log) the Hugging Face libraries' progress bars are off too, in child processes also:
    a bar redrawn with carriage returns is one endless line in a file."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("nemo_paced").setLevel(logging.INFO)
