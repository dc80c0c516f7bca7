"""Gradient signal-to-noise ratio per pass-rate bin: the paper's bell curve, measured on the demo task.

Problems are binned by their estimated pass rate (k successes out of K). In each bin, every
problem's forward-KL gradient on its teacher reference is taken with respect to the output layer
(a cheap projection of the full gradient), and SNR = |mean g|^2 / mean |g - mean g|^2: how much the
problems of that bin agree on a direction compared with how much they scatter.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nemo_paced.passrates import PassRateTable
from nemo_paced.problems import Problem


def snr(gradients: np.ndarray) -> float:
    """|mean|^2 / mean |g - mean|^2 over the rows of `gradients` (inf when they all agree exactly)."""
    mean = gradients.mean(axis=0)
    noise = float(np.mean(np.sum((gradients - mean) ** 2, axis=1)))
    signal = float(np.sum(mean**2))
    return signal / noise if noise > 0 else float("inf")


def gradient_snr_by_pass_rate(student: str, teacher: str, pool: Sequence[Problem], table: PassRateTable,
                              references: str | Path, per_bin: int = 32, k: int = 8,
                              seed: int = 0) -> list[dict[str, Any]]:
    """One row per bin j/K with at least two problems: pass rate, problems used, SNR, mean |g|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_paced.batches import BatchBuilder, Pair
    from nemo_paced.loss import paced_reduce, vocab_parallel_kl
    from nemo_paced.references import load_references

    refs = load_references(references)
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    head = model.get_output_embeddings().weight
    model.requires_grad_(False)
    head.requires_grad_(True)
    builder = BatchBuilder(tokenizer, seq_length=64)
    bins: dict[int, list[Problem]] = {}
    for problem in pool:
        record = table.get(problem.id)
        if record is not None and problem.id in refs:
            bins.setdefault(int(round(record.pass_rate * k)), []).append(problem)
    rng = random.Random(seed)
    rows = []
    for j in sorted(bins):
        chosen = rng.sample(bins[j], min(per_bin, len(bins[j])))
        if len(chosen) < 2:
            continue
        gradients = []
        for problem in chosen:
            batch = builder.micro_batch([Pair(problem.id, builder.prompt_ids(problem.prompt),
                                              builder.response_ids(refs[problem.id][0].text))])
            logits = model(input_ids=batch["tokens"]).logits
            with torch.no_grad():
                teacher_logits = teacher_model(input_ids=batch["tokens"]).logits
            per_token = vocab_parallel_kl(logits, teacher_logits, direction="forward")
            loss, _ = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
            (grad,) = torch.autograd.grad(loss, head)
            gradients.append(grad.flatten().double().numpy())
        g = np.stack(gradients)
        rows.append({"pass_rate": j / k, "problems": len(chosen), "available": len(bins[j]), "snr": snr(g),
                     "grad_norm": float(np.linalg.norm(g, axis=1).mean())})
    return rows
