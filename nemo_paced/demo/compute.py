"""Compute accounting for a demo run: what each method really paid, not only the tokens it trained on.

Tokens, per run:
  training   prompt + response tokens of every trained sequence (forward and backward of the student)
  teacher    the teacher's forward pass over the same sequences (both KL directions score them)
  estimation student samples drawn to estimate pass rates (prompt + generated tokens), from the
             shared starting estimate (charged to every method that uses pass rates) and the run's
             refreshes; the estimate after training is a diagnostic and is not charged
  on-policy  the reverse-KL stage's own samples (prompt + generated tokens)
Evaluation is not charged (every method is evaluated the same way).

FLOPs, the usual dense-transformer estimate that ignores attention's sequence-length term (the demo's
sequences are under 20 tokens): 6 N_student per training token (forward + backward), 2 N_teacher per
teacher token, 2 N_student per rollout token (forward only, prompt and generated alike, with a KV
cache). N counts every parameter, embeddings included.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

FORMULA = ("FLOPs = 6 N_student T_train + 2 N_teacher T_teacher + 2 N_student (T_estimation + T_on-policy); "
           "N = all parameters, T = prompt + response tokens; attention's sequence term ignored")


def parameter_count(model_dir: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def run_compute(steps: Sequence[Mapping[str, Any]], prompt_tokens: int, estimation: Mapping[str, int],
                onpolicy: Mapping[str, int], n_student: int, n_teacher: int) -> dict[str, Any]:
    """Token counts and FLOPs of one run. `steps` are the trainer's per-step metrics (`kept`
    sequences, `tokens` = their response tokens); every sequence's prompt is `prompt_tokens` long
    (the demo's prompts have a fixed width); `estimation`/`onpolicy` are rollout totals
    {samples, prompt_tokens, generated_tokens}."""
    sequences = sum(int(s["kept"]) for s in steps)
    response = sum(int(s["tokens"]) for s in steps)
    training = response + sequences * prompt_tokens
    estimation_tokens = int(estimation["prompt_tokens"]) + int(estimation["generated_tokens"])
    onpolicy_tokens = int(onpolicy["prompt_tokens"]) + int(onpolicy["generated_tokens"])
    flops = {"student_training": 6.0 * n_student * training, "teacher": 2.0 * n_teacher * training,
             "estimation": 2.0 * n_student * estimation_tokens, "onpolicy": 2.0 * n_student * onpolicy_tokens}
    return {"training_sequences": sequences, "training_response_tokens": response, "training_tokens": training,
            "teacher_tokens": training, "estimation_samples": int(estimation["samples"]),
            "estimation_tokens": estimation_tokens, "onpolicy_samples": int(onpolicy["samples"]),
            "onpolicy_tokens": onpolicy_tokens, "flops": flops, "total_flops": sum(flops.values())}
