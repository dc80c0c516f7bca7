"""The frozen teacher beside the student: compatibility checks, ModelOpt conversion, freeze checks.

Teacher and student run in the same process on the same ranks, with the same TP/PP layout, so the
Paced KL can pair their vocabulary shards token by token. That only makes sense when both use the
same tokenizer and the same (padded) vocabulary size, which is checked here before any training.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_paced.megatron.criterion import Stage, paced_criterion

# Settings that must agree between student and teacher (Bridge's DistillationProvider checks the same).
SHARED_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "pipeline_dtype")


class TeacherMismatchError(ValueError):
    """Teacher and student cannot be distilled together; the message names the setting that differs."""


def check_layout(student_config, teacher_config) -> None:
    for name in SHARED_LAYOUT:
        s, t = getattr(student_config, name, None), getattr(teacher_config, name, None)
        if s != t:
            raise TeacherMismatchError(f"student and teacher must share {name}: student={s!r}, teacher={t!r}")
    if getattr(student_config, "virtual_pipeline_model_parallel_size", None):
        raise TeacherMismatchError("virtual pipeline parallelism is not supported by ModelOpt distillation; "
                                   "set virtual_pipeline_model_parallel_size=None")


def check_vocab(student_vocab_size: int, teacher_vocab_size: int) -> None:
    if student_vocab_size != teacher_vocab_size:
        raise TeacherMismatchError(
            f"student and teacher vocabulary sizes differ: student={student_vocab_size}, "
            f"teacher={teacher_vocab_size}; the KL pairs logits index by index, so both must use the "
            "same tokenizer and the same padded vocabulary size")


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Hugging Face tokenizers must map every string to the same ids, special tokens included."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = sorted(set(student_vocab) - set(teacher_vocab))[:5]
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:5]
        moved = sorted(k for k in set(student_vocab) & set(teacher_vocab) if student_vocab[k] != teacher_vocab[k])[:5]
        raise TeacherMismatchError(
            f"student and teacher tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} tokens); "
            f"only in student: {only_student}, only in teacher: {only_teacher}, different ids: {moved}")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        s, t = getattr(student_tokenizer, name, None), getattr(teacher_tokenizer, name, None)
        if s != t:
            raise TeacherMismatchError(f"student and teacher tokenizers differ in {name}: {s!r} vs {t!r}")


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the teacher is never trained and holds no optimizer state."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def check_frozen(distill_model) -> None:
    """Raise if any teacher parameter could be or was trained."""
    for name, param in distill_model.teacher_model.named_parameters():
        if param.requires_grad or param.grad is not None or getattr(param, "main_grad", None) is not None:
            raise RuntimeError(f"teacher parameter {name} is trainable or holds a gradient")


def distillation_model(student: torch.nn.Module, teacher: torch.nn.Module, stage: Stage | str,
                       temperature: float = 1.0, chunk_size: int | None = None):
    """Wrap megatron-core GPT student and teacher into ModelOpt's distillation model with the Paced KL.

    This is what Bridge's `DistillationProvider` does in its convert hook; on this path the models
    come from megatron-core directly (tests, the GPU smoke check).
    """
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins import megatron as mtd_mcore

    check_layout(student.config, teacher.config)
    check_vocab(student.vocab_size, teacher.vocab_size)
    freeze(teacher)
    config = mtd_mcore.DistillationConfig(
        criterion=paced_criterion(student.config, stage, temperature, chunk_size), skip_lm_loss=True)
    config = mtd_mcore.setup_distillation_config(config, student.config, teacher.config)
    model = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterion": config.criterion,
                                                    "loss_balancer": config.loss_balancer})])
    mtd_mcore.adjust_distillation_model_for_mcore(model, config)
    return model
