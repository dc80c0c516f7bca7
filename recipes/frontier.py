"""Megatron Bridge recipes for a frontier teacher that never enters the training job.

The job builds the student alone (a plain GPT provider from its Hugging Face checkpoint: no
`DistillationProvider`, no teacher weights, no teacher forward). The teacher runs elsewhere, on its
own nodes, through two files the launcher passes (`nemo-paced train --teacher-cache DIR
--teacher-service ADDR`, `recipes.StageFiles`):

- stage fkl (forward KL on the teacher's references) reads the teacher's top-k on every reference
  from the cache `nemo-paced teacher-cache` wrote (default `runs/paced/NAME/teacher-cache`);
- stage rkl (reverse KL on the student's own samples) has each micro-batch's samples scored by the
  teacher service `nemo-paced serve-teacher` (e.g. `--engine vllm`; default address file
  `runs/paced/NAME/teacher.addr`), k = 64 per token by default (`dataset.teacher_k`).

The loss is `topk_kl` with the bucket tail: the exact KL between the two distributions on the k
teacher ids plus one outcome for the rest of the vocabulary, forward in fkl, reverse in rkl. Reverse
KL's default is this top-k estimate rather than the sampled-token estimator (`dataset.rkl_estimator=
sampled`, log q(y) - log p(y) at the sampled token): it is deterministic given the samples and uses
the whole top-k the service returns anyway, where the sampled estimator, though unbiased for the
full-vocabulary gradient, adds the variance of one token per position. Cached and served log-probs
are the teacher's at temperature 1 (normalised over its full vocabulary; fp16 in the cache by
default); `dataset.temperature` divides the student's logits only. Teacher and student must share
the tokenizer: the cache and the service are refused (by tokenizer fingerprint) otherwise, so a
DeepSeek-V3 or Kimi-K2 teacher, whose vocabularies differ from Qwen3's, cannot be distilled into a
Qwen3 student by token-level KL; a Qwen-tokenizer frontier model can.

Layout, Qwen3-8B student on 1 node of 8 H100 (80 GB): TP=2, PP=1, DP=4, sequence parallel. Per GPU:
bf16 weights 8.2 GB, fp32 main gradients 16.4 GB, fp32 master weights and Adam moments 12 B/param
over TP x DP = 8 ranks, 12.3 GB; activations of a 10240-token sequence about 0.7 GB per layer at TP=2
with sequence parallelism, 26 GB for 36 layers; the logit shard 10240 x 75968 in bf16 1.6 GB. About
65 GB in all. TP=1 (DP=8) would double weights, gradients and activations per GPU (about 115 GB);
TP=4 fits easily but halves the data parallelism for no gain. With the teacher in the job the same
student needs 4 nodes (recipes/qwen3.py, qwen3_235b_a22b_to_8b); here the teacher's nodes serve it
(vLLM, e.g. Qwen3-235B-A22B at TP=8 on one node in FP8) and the cache is made once before stage fkl.
Everything else (optimiser, sequence length, checkpoints, stop signals, refresh exports) is the
shared `recipes.bridge_base.paced_container`.
"""

from __future__ import annotations

from recipes import StageFiles
from recipes.bridge_base import Layout, hf_provider, paced_container

STUDENT_LAYOUT = Layout(tensor=2)


def topk_teacher_config(student_hf: str, stage: str, layout: Layout, *, name: str, files: StageFiles = StageFiles(),
                        seq_length: int = 10240, global_batch_size: int = 128, train_iters: int = 2000,
                        lr: float = 1e-6, teacher_k: int = 64, rkl_estimator: str = "topk",
                        temperature: float = 1.0):
    """The student-only builder: a Bridge ConfigContainer for `stage` whose teacher is the cache (fkl)
    or the service (rkl). `train_iters` spans both stages (`files.split` of it in fkl, half by default);
    the rkl stage starts from the fkl stage's final export. `files.teacher` is not read: the teacher's
    weights never load here."""
    # first, so a machine without Bridge gets nemo_paced's clear ImportError
    from nemo_paced.megatron.bridge_frontier import TopKTeacherDataset

    from nemo_paced.megatron.criterion import Stage, parse_stage

    stage = parse_stage(stage).value
    run_dir = f"runs/paced/{name}"
    init = files.init or (student_hf if stage == Stage.FKL.value else f"{run_dir}/{Stage.FKL.value}/final")
    out = files.out or f"{run_dir}/{stage}"
    student = hf_provider(init, layout, layout.student_stage_layers, seq_length)
    student.calculate_per_token_loss = True  # the Paced step normalises by the step's weight sum itself
    dataset = TopKTeacherDataset(
        problems=files.problems or "data/problems.jsonl", service=files.service or f"{run_dir}/rollouts/address.json",
        stage=stage, references=files.references or f"{run_dir}/references.jsonl", student=init,
        seq_length=seq_length, export_dir=f"{out}/student_hf", final_dir=f"{out}/final", num_workers=0,
        persistent_workers=False, pin_memory=False, teacher_cache=files.teacher_cache or f"{run_dir}/teacher-cache",
        teacher_service=files.teacher_service or f"{run_dir}/teacher.addr", teacher_k=teacher_k,
        rkl_estimator=rkl_estimator, temperature=temperature)
    return paced_container(student, init, dataset, out=out, train_iters=files.stage_share(stage, train_iters),
                           global_batch_size=global_batch_size, lr=lr)


def qwen3_235b_a22b_served_to_8b_paced_8gpu_h100_bf16_config(stage: str = "fkl", files: StageFiles = StageFiles()):
    """Frontier teacher outside the job (Qwen3-235B-A22B served by vLLM on its own nodes) -> Qwen3-8B
    student, 1 node of 8 H100 (TP2, DP4)."""
    return topk_teacher_config("Qwen/Qwen3-8B", stage, STUDENT_LAYOUT, name="qwen3_235b_a22b_served_to_8b",
                               files=files)
