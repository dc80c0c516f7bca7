"""The Paced data stream's state beside Megatron checkpoints, so a resumed job continues its draws.

Megatron saves the model, optimizer and step but nothing of an external data loader. The Bridge
callback therefore writes the stream's `state_dict()` (sampler position, RNG seed and the weights
in force) after every step to `SAVE_DIR/paced_sampler/iter_NNNNNNN.json`, named by the stream's own
position (the number of steps it has read), so whichever step Megatron checkpoints (at its interval,
on a signal, at the end) has its file, whatever the order of Bridge's hooks. A resumed job loads the
file of the step it resumes at. A checkpoint copied without its file resumes by `seek(step)`: the
same position and seed, with the newest pass-rate table in place of the one in force at the save.

Files are pruned as they are written: the newest `KEEP`, and the newest `KEEP` at multiples of the
checkpoint interval (the checkpoints a hard-killed job falls back to).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from nemo_paced.atomic import atomic_write_text

log = logging.getLogger(__name__)

SUBDIR = "paced_sampler"
KEEP = 3  # state files kept: the newest few, for the checkpoints Megatron may still resume from


class Resumable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def seek(self, step: int) -> None: ...


def state_path(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / SUBDIR / f"iter_{step:07d}.json"


def save_stream_state(checkpoint_dir: str | Path, state: dict[str, Any], interval: int | None = None) -> Path:
    """Write the state under its own step atomically, then prune (see the module docstring)."""
    path = state_path(checkpoint_dir, int(state["step"]))
    atomic_write_text(path, json.dumps(state))
    steps = sorted(int(p.stem.removeprefix("iter_")) for p in path.parent.glob("iter_*.json"))
    keep = set(steps[-KEEP:]) | set([s for s in steps if interval and s % interval == 0][-KEEP:])
    for step in set(steps) - keep:
        state_path(checkpoint_dir, step).unlink(missing_ok=True)
    return path


def restore_stream(stream: Resumable, checkpoint_dir: str | Path | None, step: int) -> str:
    """Put `stream` where a job resuming at `step` continues; returns "fresh", "exact" or "seek"."""
    if step == 0:
        return "fresh"
    path = state_path(checkpoint_dir, step) if checkpoint_dir else None
    if path is not None and path.exists():
        stream.load_state_dict(json.loads(path.read_text()))
        log.info("resumed the Paced data stream at step %d from %s", step, path)
        return "exact"
    stream.seek(step)
    log.warning("no Paced data-stream state for step %d (looked for %s); continuing the draws at step %d with the "
                "newest pass-rate table", step, path, step)
    return "seek"
