"""Self-distillation in megatron-core: the student scores its own samples again with privileged context.

`SelfDistillationModel` wraps a megatron-core GPT student. Each forward runs two passes over the same
TP/PP layout: the teacher pass (the student's weights now, `current`, or a frozen copy of the
starting weights, `initial`) on the teacher rows under `torch.no_grad()` in eval mode, so it keeps
no activations and gives no gradient; then the student pass on the student rows. Under pipeline
parallelism both passes' hidden states travel between stages in one tensor, concatenated on the
hidden dimension (as ModelOpt does for a separate teacher), so teacher rows must have the student's
sequence length; `tensor_shapes_adjust_fn` tells the schedule about the doubled width. On the last
stage the teacher's vocabulary shard is kept for the loss and the student's logits are returned.

`SelfDistillForwardStep` is `PacedForwardStep` with the loss taken from those logits: the teacher's
are gathered at `teacher_index` (`nemo_paced.self_teacher.align`), then the exact reverse KL
KL(student || self-teacher) over the full vocabulary (`vocab_parallel_kl` across the TP group),
weighted and normalised over the global batch exactly as for a separate teacher.

Memory: `current` adds no weights, only the teacher pass's transient activations and its logits
shard on the last stage; `initial` adds one more copy of the model's weights (no gradients, no
optimizer state).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from nemo_paced.loss import vocab_parallel_kl
from nemo_paced.megatron.step import PacedForwardStep
from nemo_paced.megatron.teacher import freeze
from nemo_paced.self_teacher import gather_aligned

TEACHER_KEYS = ("teacher_tokens", "teacher_position_ids", "teacher_index")


def initial_copy(student: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A frozen copy of the student's weights now, in a second model from `build` (same config and
    layout; megatron modules hold process groups, which cannot be deep-copied)."""
    copy = build()
    copy.load_state_dict(student.state_dict(), strict=True)
    return freeze(copy)


class SelfDistillationModel(MegatronModule):
    """A GPT student and its self-teacher: itself (`initial=None`, weights "current") or `initial`,
    a frozen copy of its starting weights (`initial_copy`)."""

    def __init__(self, student: torch.nn.Module, initial: torch.nn.Module | None = None):
        if parallel_state.get_virtual_pipeline_model_parallel_world_size():
            raise ValueError("virtual pipeline parallelism is not supported by self-distillation")
        super().__init__(config=student.config)
        # Held as `module`, so megatron-core's attribute lookups (pre_process, shared embeddings in
        # finalize_model_grads) reach the student through the wrapper as through DDP.
        self.module = student
        self.model_type = student.model_type
        if initial is not None and any(p.requires_grad for p in initial.parameters()):
            raise ValueError("the initial self-teacher must be frozen (nemo_paced.megatron.self_teacher.initial_copy)")
        self.initial = initial
        self.weights = "current" if initial is None else "initial"
        self.teacher_logits: torch.Tensor | None = None
        self._inputs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    @property
    def student(self) -> torch.nn.Module:
        return self.module

    @property
    def scorer(self) -> torch.nn.Module:
        return self.initial if self.initial is not None else self.student

    def check_frozen(self) -> None:
        """Raise if a parameter of the `initial` copy could be or was trained (`current` has none of its own)."""
        for name, param in (self.initial.named_parameters() if self.initial is not None else ()):
            if param.requires_grad or param.grad is not None or getattr(param, "main_grad", None) is not None:
                raise RuntimeError(f"initial self-teacher parameter {name} is trainable or holds a gradient")

    def set_input_tensor(self, input_tensor: Any) -> None:
        """The previous stage's [student | teacher] hidden states, split for the two passes."""
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if tensor is None:
            self._inputs = (None, None)
            return
        half = tensor.shape[-1] // 2
        self._inputs = (tensor[..., :half], tensor[..., half:])

    def forward(self, tokens, position_ids, attention_mask=None, labels=None, *, teacher_tokens=None,
                teacher_position_ids=None):
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        if first and teacher_tokens is None:
            raise KeyError("self-distillation needs teacher_tokens and teacher_position_ids in the batch "
                           "(nemo_paced.self_teacher.SelfTeacher.add_teacher_rows)")
        pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        if first and pipelined and teacher_tokens.shape[1] != tokens.shape[1]:
            raise ValueError(f"under pipeline parallelism teacher rows need the student's sequence length "
                             f"{tokens.shape[1]}, got {teacher_tokens.shape[1]} (SelfTeacher teacher_seq_length)")
        student_in, teacher_in = self._inputs
        scorer = self.scorer
        with torch.no_grad():
            if not first:
                scorer.set_input_tensor(teacher_in)
            training = scorer.training
            scorer.eval()
            teacher_out = scorer(teacher_tokens, teacher_position_ids, None)
            scorer.train(training)
        if not first:
            self.student.set_input_tensor(student_in)
        student_out = self.student(tokens, position_ids, attention_mask)
        if not last:
            return torch.cat([student_out, teacher_out], dim=-1)
        self.teacher_logits = teacher_out
        return student_out


def tensor_shapes_adjust_fn(model: Any):
    """For megatron-core's pipeline schedule: stages exchange [student | teacher] hidden states."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None

    def adjust(recv_shapes, send_shapes):
        double = lambda shapes: [(*s[:-1], 2 * s[-1]) for s in shapes]  # noqa: E731
        return double(recv_shapes), double(send_shapes)

    return adjust


class SelfDistillForwardStep(PacedForwardStep):
    """`PacedForwardStep` for a `SelfDistillationModel`: reverse KL to the self-teacher's aligned logits."""

    def __init__(self, *args, temperature: float = 1.0, chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature, self.chunk_size = float(temperature), chunk_size

    def _forward(self, model, batch: dict[str, Any]):
        if parallel_state.is_pipeline_first_stage():
            missing = [k for k in TEACHER_KEYS if batch.get(k) is None]
            if missing:
                raise KeyError(f"micro-batch lacks {missing}; self-distillation needs the teacher rows "
                               "(nemo_paced.self_teacher.SelfTeacher.add_teacher_rows)")
        return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                     teacher_tokens=batch.get("teacher_tokens"), teacher_position_ids=batch.get("teacher_position_ids"))

    def _per_token(self, model, batch: dict[str, Any], output_tensor: torch.Tensor) -> torch.Tensor:
        inner = model
        while not isinstance(inner, SelfDistillationModel):
            inner = inner.module
        teacher = gather_aligned(inner.teacher_logits, batch["teacher_index"])
        inner.teacher_logits = None
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return vocab_parallel_kl(output_tensor, teacher, direction="reverse", temperature=self.temperature,
                                 tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
                                 chunk_size=self.chunk_size)
