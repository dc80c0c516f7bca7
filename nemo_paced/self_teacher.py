"""The privileged-context self-teacher for on-policy self-distillation with reverse KL.

The teacher is the student model itself, conditioned on context the student does not see: the
problem's reference solution or its ground-truth answer, placed into the teacher's question by a
template. Both score the same response tokens (the student's own on-policy sample), so the two
inputs differ only in their prompts:

    student row   [student prompt (Ls ids)] [response] [pad]
    teacher row   [teacher prompt (Lt ids)] [response] [pad]

Position t of the student row predicts the same response token as position t + (Lt - Ls) of the
teacher row. `teacher_index[b, t]` holds that position, so gathering the teacher's logits along the
sequence with it lines them up with the student's; response tokens the teacher row has no room for
are taken out of `loss_mask` (and counted), so the loss covers exactly the tokens both score.

Teacher weights: "current" (the student's weights at this step, logits computed under no_grad: no
gradient through the teacher pass and no activations kept for it) or "initial" (a frozen copy of
the starting model: one more copy of the weights in memory, and a fixed target).

Problems without privileged context (none of the `context` fields present and non-empty) are an
error naming them (`missing="error"`, the default) or are left out of training with a count
(`missing="exclude"`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nemo_paced.batches import Pair, encode_row
from nemo_paced.problems import Problem

log = logging.getLogger(__name__)

# {question} is the problem as stored, {context} the privileged context; the result replaces the
# question and is rendered by the stage's prompt template (raw, plain, chat) like the student's.
DEFAULT_TEMPLATE = ("{question}\n\nHere is a reference solution to this problem:\n{context}\n\n"
                    "Read it, then solve the problem yourself from the beginning.")
TEACHER_WEIGHTS = ("current", "initial")
MISSING_POLICIES = ("error", "exclude")
SELF = "self"


class MissingContext(ValueError):
    """A problem has none of the privileged-context fields (and missing="error")."""


@dataclass(frozen=True)
class SelfTeacherConfig:
    """How the self-teacher's prompt is built and which weights score it."""

    weights: str = "current"  # current: the student's weights now, no grad; initial: a frozen starting copy
    template: str = DEFAULT_TEMPLATE
    context: tuple[str, ...] = ("solution", "answer")  # tried in order: "answer", or a key of the problem's meta
    missing: str = "error"  # error | exclude

    def __post_init__(self) -> None:
        if self.weights not in TEACHER_WEIGHTS:
            raise ValueError(f"self-teacher weights must be one of {', '.join(TEACHER_WEIGHTS)}; got {self.weights!r}")
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {', '.join(MISSING_POLICIES)}; got {self.missing!r}")
        if not self.context:
            raise ValueError("context needs at least one field (answer, or a meta key such as solution)")
        for name in ("{question}", "{context}"):
            if name not in self.template:
                raise ValueError(f"the self-teacher template must contain {name}; got {self.template!r}")
        try:
            self.template.format(question="", context="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"the self-teacher template takes only {{question}} and {{context}}; "
                             f"{self.template!r} fails with {error!r}") from None


def parse_teacher(spec: str, default: str = "current") -> str | None:
    """`self` (-> `default`), `self:current` or `self:initial` -> the self-teacher's weights; anything
    else (a teacher model directory) -> None."""
    if spec != SELF and not spec.startswith(SELF + ":"):
        return None
    weights = spec.partition(":")[2] or default
    if weights not in TEACHER_WEIGHTS:
        raise ValueError(f"teacher {spec!r}: the self-teacher's weights are {' or '.join(TEACHER_WEIGHTS)} "
                         f"(self, self:current or self:initial)")
    return weights


def privileged_context(problem: Problem, fields: Sequence[str]) -> str | None:
    """The first of `fields` the problem has, non-empty: "answer", or a key of `problem.meta`."""
    for name in fields:
        value = problem.answer if name == "answer" else problem.meta.get(name)
        if value is not None and str(value).strip():
            return str(value)
    return None


def teacher_problem(problem: Problem, config: SelfTeacherConfig) -> Problem:
    """The problem as the self-teacher sees it: its question with the privileged context."""
    context = privileged_context(problem, config.context)
    if context is None:
        raise MissingContext(f"problem {problem.id!r} has no privileged context (none of "
                             f"{', '.join(config.context)}); add one, or set missing=exclude")
    return replace(problem, prompt=config.template.format(question=problem.prompt, context=context))


@dataclass(frozen=True)
class AlignedRows:
    """A student micro-batch's teacher rows and the alignment between them."""

    tokens: torch.Tensor  # [b, S_teacher]
    position_ids: torch.Tensor  # [b, S_teacher]
    index: torch.Tensor  # [b, S]: the teacher position scoring the student's position t (0 off the mask)
    loss_mask: torch.Tensor  # [b, S]: the student's mask where the teacher row also holds the token
    dropped: int  # response tokens the teacher row had no room for


def align(student_prompt_len: Sequence[int], teacher_prompt_ids: Sequence[Sequence[int]],
          response_ids: Sequence[Sequence[int]], student_mask: torch.Tensor, teacher_seq_length: int,
          pad_id: int) -> AlignedRows:
    """Teacher rows for one micro-batch, aligned on the response tokens of the student rows."""
    rows, index, mask, dropped = [], [], [], 0
    seq = student_mask.shape[1]
    for b, (ls, prompt, response) in enumerate(zip(student_prompt_len, teacher_prompt_ids, response_ids)):
        row = encode_row(prompt, response, teacher_seq_length, pad_id)
        shift = len(prompt) - ls
        positions = np.arange(seq) + shift
        inside = (positions >= 0) & (positions < teacher_seq_length)
        teacher_mask = np.zeros(seq, dtype=np.float32)
        teacher_mask[inside] = row.loss_mask[positions[inside]]
        student = student_mask[b].numpy()
        both = student * (teacher_mask > 0)
        dropped += int((student > 0).sum() - (both > 0).sum())
        rows.append(row.tokens)
        index.append(np.where(both > 0, positions, 0))
        mask.append(both)
    return AlignedRows(tokens=torch.from_numpy(np.stack(rows)),
                       position_ids=torch.arange(teacher_seq_length).expand(len(rows), teacher_seq_length).clone(),
                       index=torch.from_numpy(np.stack(index).astype(np.int64)),
                       loss_mask=torch.from_numpy(np.stack(mask).astype(np.float32)), dropped=dropped)


class SelfTeacher:
    """Teacher prompts for a problem set, and the teacher rows of student micro-batches.

    `render` turns a problem into the text the model is conditioned on (the stage's prompt
    template); `builder` is the stage's `BatchBuilder`. `teacher_seq_length` defaults to the
    student's seq_length plus the longest extra prompt, so no response token is lost; pipeline
    parallel runs need it equal to the student's (activations of both pass between stages together).
    """

    def __init__(self, problems: Sequence[Problem], builder: Any, render: Callable[[Problem], str],
                 config: SelfTeacherConfig = SelfTeacherConfig(), teacher_seq_length: int | None = None) -> None:
        self.config, self.builder = config, builder
        self.prompts: dict[str, list[int]] = {}
        self.excluded: list[str] = []
        extra = 0
        for problem in problems:
            try:
                teacher = teacher_problem(problem, config)
            except MissingContext:
                if config.missing == "error":
                    raise
                self.excluded.append(problem.id)
                continue
            ids = builder.prompt_ids(render(teacher))
            self.prompts[problem.id] = ids
            extra = max(extra, len(ids) - len(builder.prompt_ids(render(problem))))
        if self.excluded:
            log.warning("self-teacher: %d of %d problems have no privileged context (%s) and are excluded, "
                        "e.g. %s", len(self.excluded), len(problems), ", ".join(config.context), self.excluded[:5])
        self.teacher_seq_length = teacher_seq_length or builder.seq_length + extra
        self.dropped_tokens = 0

    @property
    def problem_ids(self) -> list[str]:
        """The problems that can be trained on (those with privileged context), in input order."""
        return list(self.prompts)

    def add_teacher_rows(self, batch: dict[str, Any], pairs: Sequence[Pair]) -> dict[str, Any]:
        """`batch` (built from `pairs` by the builder) with `teacher_tokens`, `teacher_position_ids`,
        `teacher_index`, and its `loss_mask` narrowed to the tokens the teacher scores too."""
        try:
            prompts = [self.prompts[p.problem_id] for p in pairs]
        except KeyError as error:
            raise MissingContext(f"problem {error.args[0]!r} has no self-teacher prompt (no privileged context, "
                                 "or not in the problem set the self-teacher was built from)") from None
        rows = align([len(p.prompt_ids) for p in pairs], prompts, [p.response_ids for p in pairs],
                     batch["loss_mask"], self.teacher_seq_length, self.builder.pad_id)
        if rows.dropped:
            self.dropped_tokens += rows.dropped
            log.warning("self-teacher: %d response tokens do not fit the teacher's %d positions and are left out "
                        "of the loss (%d so far)", rows.dropped, self.teacher_seq_length, self.dropped_tokens)
        has_tokens = rows.loss_mask.sum(-1) > 0
        return {**batch, "loss_mask": rows.loss_mask, "sample_weight": batch["sample_weight"] * has_tokens,
                "teacher_tokens": rows.tokens, "teacher_position_ids": rows.position_ids,
                "teacher_index": rows.index}


def gather_aligned(teacher_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Teacher logits `[b, S_teacher, V]` at the positions `index` `[b, S]` -> `[b, S, V]`."""
    return torch.gather(teacher_logits, 1, index[..., None].expand(-1, -1, teacher_logits.shape[-1]))
