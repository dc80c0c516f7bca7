"""Gradient signal-to-noise ratio per pass-rate bin: the paper's bell curve, measured on the demo task.

Problems are binned by their estimated pass rate (k successes out of K). In each bin, every chosen
problem's forward-KL gradient on its teacher reference is taken over ALL student parameters. With
n gradients g_i, mean m and S = sum |g_i - m|^2 / (n - 1) (unbiased for the trace of the gradient
covariance), the bias-corrected SNR is (|m|^2 - S/n) / S: |m|^2 alone overestimates |E g|^2 by
tr(Cov)/n, which gave the naive ratio |m|^2 / mean |g_i - m|^2 the expectation SNR n/(n-1) + 1/(n-1)
(a floor of 1/(n-1) even for pure noise). The corrected value can be negative when a bin holds no
detectable common direction.

Intervals: basic bootstrap over the bin's problems (resampled with replacement). A resample is an
i.i.d. draw from the empirical distribution, whose own SNR is the naive ratio of the sample (its
covariance has the 1/n normalisation), and the corrected estimator on resamples centres there, not
on the estimate; the basic interval pivots on that plug-in value, estimate - (replicate quantiles -
plug-in), which removes the shift (a percentile interval sat above the estimate by about 1/(n-1)).
The cosine is pivoted on itself: a resampled mean carries extra noise that pulls its cosine towards
0, and reflecting corrects that. Also per bin: the cosine between the bin's mean gradient and a
held-out gradient (the mean forward-KL gradient over test problems with teacher references), i.e.
whether what a bin teaches points where the evaluation improves. Everything is computed from the
Gram matrix of the bin's gradients, so the bootstrap costs n x n, not n x parameters.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from nemo_paced.passrates import PassRateTable
from nemo_paced.problems import Problem

BOOTSTRAP = 2000


def snr(gradients: np.ndarray) -> float:
    """Bias-corrected |E g|^2 / tr Cov(g) from the rows of `gradients` (at least two rows)."""
    return float(_snr_from_gram(gradients @ gradients.T, np.ones(len(gradients))))


def naive_snr(gradients: np.ndarray) -> float:
    """The uncorrected |mean|^2 / mean |g - mean|^2 (the estimator the demo used before; biased)."""
    mean = gradients.mean(axis=0)
    noise = float(np.mean(np.sum((gradients - mean) ** 2, axis=1)))
    return float(np.sum(mean**2)) / noise if noise > 0 else float("inf")


def _snr_from_gram(gram: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Corrected SNR of the multiset of rows given by `counts` (shape [..., n]) from the Gram matrix."""
    n = counts.sum(axis=-1)
    mean_sq = np.einsum("...i,ij,...j->...", counts, gram, counts) / n**2  # |m|^2
    scatter = (counts * np.diag(gram)).sum(axis=-1) - n * mean_sq  # sum |g_i - m|^2
    noise = scatter / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(noise > 0, (mean_sq - noise / n) / noise, np.inf)


def bin_statistics(gradients: np.ndarray, heldout: np.ndarray | None, seed: int = 0,
                   resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """SNR (corrected and naive) and cosine to `heldout`, each with a 95 % bootstrap interval."""
    n = len(gradients)
    gram = gradients @ gradients.T
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(float)
    estimate = snr(gradients)
    plug_in = naive_snr(gradients)  # the SNR of the empirical distribution the resamples are drawn from
    row = {"snr": estimate, "snr_ci95": _basic(estimate, plug_in, _snr_from_gram(gram, counts)),
           "snr_naive": plug_in, "grad_norm": float(np.sqrt(np.diag(gram)).mean())}
    if heldout is not None:
        along = gradients @ heldout  # g_i . h
        h_norm = float(np.linalg.norm(heldout))

        def cosine(c: np.ndarray) -> np.ndarray:
            mean_norm = np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", c, gram, c), 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                return (c @ along) / (mean_norm * h_norm)

        estimate = float(cosine(np.ones(n)))
        row["cosine_heldout"] = estimate
        low, high = _basic(estimate, estimate, cosine(counts))
        row["cosine_ci95"] = [max(-1.0, low), min(1.0, high)]
    return row


def _basic(estimate: float, plug_in: float, replicates: np.ndarray) -> list[float]:
    """Basic bootstrap 95 % interval: the spread of (replicate - plug_in) stands for that of
    (estimate - truth), so the interval is estimate - (quantiles - plug_in), reflected."""
    low, high = _interval(replicates)
    return [estimate - (high - plug_in), estimate - (low - plug_in)]


def _interval(values: np.ndarray) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))]


class GradientProbe:
    """Per-problem forward-KL gradients of one student (all parameters, flattened) against a teacher."""

    def __init__(self, student: str, teacher: str, seq_length: int = 64) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nemo_paced.batches import BatchBuilder

        self.model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        self.teacher.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.builder = BatchBuilder(AutoTokenizer.from_pretrained(student), seq_length=seq_length)

    @property
    def dimension(self) -> int:
        return sum(p.numel() for p in self.params)

    def gradient(self, problem: Problem, reference: str) -> np.ndarray:
        from nemo_paced.batches import Pair
        from nemo_paced.loss import paced_reduce, vocab_parallel_kl

        b = self.builder
        batch = b.micro_batch([Pair(problem.id, b.prompt_ids(problem.prompt), b.response_ids(reference))])
        logits = self.model(input_ids=batch["tokens"]).logits
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["tokens"]).logits
        per_token = vocab_parallel_kl(logits, teacher_logits, direction="forward")
        loss, _ = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(grads, self.params)]).double().numpy()


def gradient_snr_by_pass_rate(student: str, teacher: str, pool: Sequence[Problem], table: PassRateTable,
                              references: Mapping[str, str], heldout: Sequence[tuple[Problem, str]] = (),
                              per_bin: int = 64, k: int = 8, seed: int = 0) -> dict[str, Any]:
    """One row per bin j/K with at least three problems (pass rate, problems used and available,
    corrected SNR with interval, naive SNR, cosine to the held-out gradient with interval);
    `references` maps problem id -> teacher reference text, `heldout` is (problem, reference)."""
    probe = GradientProbe(student, teacher)
    held = (np.mean([probe.gradient(p, r) for p, r in heldout], axis=0) if heldout else None)
    bins: dict[int, list[Problem]] = {}
    for problem in pool:
        record = table.get(problem.id)
        if record is not None and problem.id in references:
            bins.setdefault(int(round(record.pass_rate * k)), []).append(problem)
    rng = random.Random(seed)
    rows = []
    for j in sorted(bins):
        chosen = rng.sample(bins[j], min(per_bin, len(bins[j])))
        if len(chosen) < 3:
            continue
        gradients = np.stack([probe.gradient(p, references[p.id]) for p in chosen])
        rows.append({"pass_rate": j / k, "problems": len(chosen), "available": len(bins[j]),
                     **bin_statistics(gradients, held, seed=seed + j)})
    return {"parameters": probe.dimension, "heldout_problems": len(heldout), "bins": rows}
