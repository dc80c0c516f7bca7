"""The two-stage PACED schedule: forward KL on teacher references, then reverse KL on student samples.

Steps [0, switch) are stage 1 (fkl) and [switch, total) stage 2 (rkl); `fkl_fraction = 1` is
forward KL alone. Pass rates go stale as the student learns, so they are re-estimated at the
switch (the stage-2 student is a different model from the one the stage-1 weights came from) and,
optionally, every `refresh_every` steps within a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StageName = Literal["fkl", "rkl"]


@dataclass(frozen=True)
class TwoStageSchedule:
    total_steps: int
    fkl_fraction: float = 0.5
    reestimate_at_switch: bool = True
    refresh_every: int = 0  # 0: no re-estimation inside a stage

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.fkl_fraction <= 1:
            raise ValueError(f"fkl_fraction must lie in [0, 1], got {self.fkl_fraction}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0 = never), got {self.refresh_every}")

    @property
    def switch_step(self) -> int:
        """First reverse-KL step (== total_steps when there is no reverse-KL stage)."""
        return round(self.total_steps * self.fkl_fraction)

    @property
    def has_rkl(self) -> bool:
        return self.switch_step < self.total_steps

    def stage(self, step: int) -> StageName:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the schedule's 0..{self.total_steps - 1}")
        return "fkl" if step < self.switch_step else "rkl"

    def reestimate_before(self, step: int) -> bool:
        """Whether pass rates are re-estimated before training step `step` (not before step 0:
        the initial estimate is the caller's)."""
        if step <= 0 or step >= self.total_steps:
            return False
        if step == self.switch_step:
            return self.reestimate_at_switch
        since_stage_start = step - (self.switch_step if step > self.switch_step else 0)
        return self.refresh_every > 0 and since_stage_start % self.refresh_every == 0
