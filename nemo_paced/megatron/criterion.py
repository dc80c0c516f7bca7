"""The Paced KL as a ModelOpt distillation criterion on vocabulary-parallel logits.

ModelOpt's `DistillationModel` captures the `output_layer` outputs of student and teacher, each a
`[s, b, V/TP]` shard, and hands them to every criterion in its config. This criterion turns them
into the per-token KL of the chosen direction with `nemo_paced.loss.vocab_parallel_kl`, which
normalises over the whole vocabulary across the TP group. The result is the full KL, identical on
every TP rank, so it is returned with `tp_reduce=False` (a reducer must not sum it over TP again).
"""

from __future__ import annotations

from enum import Enum

import torch
from megatron.core import parallel_state
from modelopt.torch.distill.plugins.megatron import BaseLoss

from nemo_paced.loss import vocab_parallel_kl

LOGIT_LAYERS = ("output_layer", "output_layer")


class Stage(str, Enum):
    """fkl: forward KL(teacher || student) on teacher references (stage 1).
    rkl: reverse KL(student || teacher) on the student's own samples (stage 2)."""

    FKL = "fkl"
    RKL = "rkl"

    @property
    def direction(self) -> str:
        return "forward" if self is Stage.FKL else "reverse"


def parse_stage(value: "Stage | str") -> Stage:
    try:
        return Stage(value)
    except ValueError:
        raise ValueError(f"stage must be one of fkl, rkl; got {value!r}") from None


class PacedLogitsKL(BaseLoss):
    """Per-token KL between captured student and teacher logit shards, `[b, s]`, full (not partial).

    The class name contains "Logits" because ModelOpt's default loss balancer finds the logits
    loss by that substring.
    """

    def __init__(self, model_config, stage: Stage | str = Stage.FKL, temperature: float = 1.0,
                 chunk_size: int | None = None):
        super().__init__(model_config)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.stage = parse_stage(stage)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size

    def forward(self, predictions, targets):
        student, teacher = self.pre_forward(predictions, targets)  # teacher is detached here
        sharded = self._config.tensor_model_parallel_size > 1
        tp_group = parallel_state.get_tensor_model_parallel_group() if sharded else None
        per_token = vocab_parallel_kl(student, teacher, direction=self.stage.direction,
                                      temperature=self.temperature, tp_group=tp_group, chunk_size=self.chunk_size)
        return self.post_forward(per_token, tp_reduce=False, is_sequence_parallel=False)


def paced_criterion(student_config, stage: Stage | str, temperature: float = 1.0,
                    chunk_size: int | None = None) -> dict[tuple[str, str], torch.nn.Module]:
    """The criterion mapping for ModelOpt: the Paced KL on the last pipeline stage, nothing elsewhere.

    Earlier stages have no `output_layer`, and ModelOpt requires their criterion to be empty.
    """
    if not parallel_state.is_pipeline_last_stage():
        return {}
    return {LOGIT_LAYERS: PacedLogitsKL(student_config, stage, temperature, chunk_size)}
