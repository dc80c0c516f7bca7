"""The Paced data stream as the training loop reads it: a step's micro-batches read ahead of the schedule.

Reading a micro-batch can run collectives among the ranks that read data: the sampler agrees on
pass-rate table refreshes, and on-policy samples are shared within a data-parallel replica. Under
pipeline parallelism those groups span the first and the last stage, and inside the schedule the
two wait on each other's activations, so a collective in the forward step would deadlock. Hence
`StepBuffer.fill` reads the whole step on every reading rank before the schedule starts (Bridge's
`on_train_step_start`), and the forward step only takes batches out of the buffer.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import numpy as np
import torch


class StepBuffer:
    """Iterator over the micro-batches `fill` read for the current step."""

    def __init__(self, source: Iterator[dict[str, Any]]):
        self.source = source
        self._batches: deque[dict[str, Any]] = deque()

    def fill(self, n: int) -> None:
        if self._batches:
            raise RuntimeError(f"{len(self._batches)} micro-batches of the previous step were not used; "
                               "the number of micro-batches per step must match the schedule's")
        self._batches.extend(next(self.source) for _ in range(n))

    def __iter__(self) -> "StepBuffer":
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._batches:
            raise RuntimeError("the step's micro-batches were not read ahead; fill the StepBuffer before the "
                               "schedule runs (nemo_paced.megatron.bridge.train does, in PacedCallback)")
        return self._batches.popleft()


class WithPassRates:
    """Adds each sequence's pass rate (-1 if never estimated) to the micro-batches, for the per-bin KL
    report. `client` is a `RolloutClient`; its copy of the table is refreshed every `refresh_batches`."""

    def __init__(self, source: Iterator[dict[str, Any]], client: Any, refresh_batches: int):
        self.source, self.client, self.refresh_batches = source, client, refresh_batches
        self._count = 0

    def __iter__(self) -> "WithPassRates":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.source)
        if self._count % self.refresh_batches == 0:
            self.client.refresh_table()
        self._count += 1
        rates = self.client.table.pass_rates(batch["problem_ids"])
        batch["pass_rate"] = torch.from_numpy(np.nan_to_num(rates, nan=-1.0).astype(np.float32))
        return batch
