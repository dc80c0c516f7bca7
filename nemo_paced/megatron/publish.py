"""Publishing a directory atomically: readers (the rollout service) see no directory or all of it.

An exporter writes into `partial` (a hidden name beside `final`), then `publish` flushes every file
to disk and renames the directory into place; a crash before the rename leaves only `partial`,
which `prepare` clears on the next attempt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def step_dirs(export_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(partial, final) directories of the export at `step`."""
    export_dir = Path(export_dir)
    return export_dir / f".step-{step:07d}.partial", export_dir / f"step-{step:07d}"


def prepare(partial: Path) -> None:
    """Remove what a crashed export left and make sure the parent exists."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)


def publish(partial: Path, final: Path) -> Path:
    """Make `partial` durable and rename it to `final` (same file system); `final` must not exist."""
    if final.exists():
        raise FileExistsError(f"{final} exists already; an export never replaces a published one")
    for path in sorted(partial.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    os.rename(partial, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
