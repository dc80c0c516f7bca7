"""Progress that reads well both on a terminal and in a log file.

On a terminal a tqdm bar; anywhere else (a SLURM log, a pipe) a bar is one line thousands of
characters long, so progress becomes one log message every `every` seconds and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0, enabled: bool = True,
                 every: float = 30.0) -> None:
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.enabled = enabled
        self.started = self.last = time.monotonic()
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self.postfix = postfix or self.postfix
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
        elif self.enabled and (time.monotonic() - self.last >= self.every or self.n >= self.total):
            self._line()

    def set(self, n: int) -> None:
        """Jump to `n` done (for pollers that see totals, not increments)."""
        if n != self.n:
            self.update(n - self.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self) -> None:
        now = time.monotonic()
        self.last = now
        rate = (self.n - self.initial) / max(now - self.started, 1e-9)
        left = f", {(self.total - self.n) / rate:.0f} s left" if 0 < rate and self.n < self.total else ""
        extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
        log.info("%s: %d/%d %ss (%.0f%%)%s%s", self.desc, self.n, self.total, self.unit,
                 100.0 * self.n / max(self.total, 1), extra, left)
