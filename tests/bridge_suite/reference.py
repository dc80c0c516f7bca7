"""A Paced step's loss and gradient norm, recomputed outside Megatron from the micro-batches a Bridge run read.

The teacher and student are the Hugging Face directories the run loaded, run by transformers in float64
on one process (no tensor or pipeline parallelism, no ModelOpt, no nemo_paced); the objective is written
out from its definition (PACED.md): L = sum_x w_x l_x / sum_x w_x over every sequence of the step with
response tokens, l_x the token mean of the per-token KL over its response tokens. The gradient norm is
the L2 norm of dL/d(student parameters), what Bridge logs before clipping. `nemo_paced_loss` recomputes
L from the same logits with nemo_paced.loss (the functions the megatron-core step calls), so a test can
tell a wrong loss module from a wrong step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Reference:
    loss: float  # L, weighted and self-normalised over the step
    unweighted: float  # mean of l_x over the sequences with response tokens ("kl" in Bridge's log)
    grad_norm: float
    nemo_paced_loss: float  # L from the same logits through nemo_paced.loss (fp32)
    weights: list[float]  # w_x of the sequences with response tokens


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _per_token_kl(student: torch.Tensor, teacher: torch.Tensor, direction: str) -> torch.Tensor:
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    if direction == "forward":  # KL(teacher || student)
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)  # KL(student || teacher)


def paced_step(teacher_dir: Path, student_dir: Path, batches: list[dict], direction: str) -> Reference:
    from nemo_paced.loss import paced_reduce, vocab_parallel_kl

    teacher, student = _model(teacher_dir), _model(student_dir)
    weighted, weight_sum, means, weights = 0.0, 0.0, [], []
    ours, our_weight = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    for batch in batches:
        tokens, positions = batch["tokens"].long(), batch["position_ids"].long()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=tokens, position_ids=positions).logits
        student_logits = student(input_ids=tokens, position_ids=positions).logits
        kl = _per_token_kl(student_logits, teacher_logits, direction)
        mask = batch["loss_mask"] != 0
        for row in range(tokens.shape[0]):
            if not mask[row].any():
                continue
            mean = kl[row][mask[row]].mean()
            w = float(batch["sample_weight"][row])
            weighted = weighted + w * mean
            weight_sum += w
            means.append(float(mean.detach()))
            weights.append(w)
        with torch.no_grad():
            per_token = vocab_parallel_kl(student_logits.float(), teacher_logits.float(), direction=direction)
            part, part_weight = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
            ours, our_weight = ours + part, our_weight + part_weight
    loss = weighted / weight_sum
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters() if p.grad is not None))
    return Reference(loss=float(loss.detach()), unweighted=sum(means) / len(means), grad_norm=float(grad_norm),
                     nemo_paced_loss=float(ours / our_weight), weights=weights)
