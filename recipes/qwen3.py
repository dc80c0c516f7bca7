"""Megatron Bridge recipes for PACED distillation of Qwen3 students, on H100 (80 GB) nodes of 8 GPUs.

Each public function returns a Bridge `ConfigContainer` for one stage (`fkl`, then `rkl`), built by
the one shared `paced_distillation_config`. Teacher and student load from Hugging Face with Bridge's
`AutoBridge` and run on the same ranks with the same TP/PP layout (ModelOpt's requirement); the
teacher is frozen and holds no optimizer state. Optimiser settings follow the paper's
(lr 1e-6 constant, weight decay 0.1, gradient clipping 1.0, 128 sequences per step); prompt 2048 +
response 8192 tokens fit in seq_length 10240. `nemo-paced train`'s file options say where the stage's
files are (`recipes.StageFiles`), and everything else can be changed with `key=value` overrides,
e.g. `train.global_batch_size=256`.

Layouts (why these numbers):
- Qwen3-8B -> Qwen3-1.7B, 1 node: TP=2 (both have 8 KV heads), PP=1, DP=4, sequence parallel.
  Per GPU: teacher 8 GB of bf16 weights, student weights + Adam state about 7 GB with the
  distributed optimizer over DP=4, fp32 logit shards of 10240 x 75968 about 3 GB per model.
- Qwen3-235B-A22B -> Qwen3-8B, 4 nodes: TP=4 (the teacher has 4 KV heads, so TP <= 4), PP=8,
  experts sharded by tensor parallelism (expert TP=4, no expert parallelism: Bridge initialises the
  parallel groups from the student, and a dense student cannot declare expert parallelism). Per
  GPU: teacher about 7.4 B parameters, 15 GB in bf16; student 8B / 32 = 0.25 B parameters with
  Adam state, 4.5 GB. Layers per pipeline stage: teacher 94 = 11 + 6 x 12 + 11, student
  36 = 3 + 6 x 5 + 3 (the first and last stages also hold embeddings and the output layer).
  128 micro-batches per step keep the pipeline bubble near 7 / 128.
Context parallelism stays 1: the Paced step needs whole sequences for its per-sequence token mean.
"""

from __future__ import annotations

from recipes import StageFiles
from recipes.bridge_base import Layout, hf_provider, paced_container


def paced_distillation_config(student_hf: str, teacher_hf: str, stage: str, layout: Layout, *, name: str,
                              files: StageFiles = StageFiles(), seq_length: int = 10240,
                              global_batch_size: int = 128, train_iters: int = 2000, lr: float = 1e-6,
                              temperature: float = 1.0):
    """The shared builder: a Bridge ConfigContainer distilling the teacher into the student for `stage`.

    `train_iters` spans both stages (`files.split` of it in fkl, half by default). Both stages start
    from Hugging Face weights: the fkl stage from `student_hf`, the rkl stage from the fkl stage's
    final export (`OUT/final`), so the SLURM chain and two hand-run commands work alike.
    """
    # first, so a machine without Bridge gets nemo_paced's clear ImportError
    from nemo_paced.megatron.bridge import PacedDataset, paced_distillation_provider

    from transformers import AutoTokenizer

    from nemo_paced.megatron.criterion import Stage, parse_stage
    from nemo_paced.self_teacher import parse_teacher

    if files.teacher is not None and parse_teacher(files.teacher) is not None:
        raise ValueError(f"recipe {name!r} distils a separate teacher; for self-distillation ({files.teacher}) "
                         "use the qwen2p5_math_7b_self recipe")
    stage = parse_stage(stage).value
    run_dir = f"runs/paced/{name}"
    init = files.init or (student_hf if stage == Stage.FKL.value else f"{run_dir}/{Stage.FKL.value}/final")
    teacher_hf = files.teacher or teacher_hf
    out = files.out or f"{run_dir}/{stage}"
    student = hf_provider(init, layout, layout.student_stage_layers, seq_length)
    teacher = hf_provider(teacher_hf, layout, layout.teacher_stage_layers, seq_length)
    model = paced_distillation_provider(student, teacher, stage, temperature, AutoTokenizer.from_pretrained(init),
                                        AutoTokenizer.from_pretrained(teacher_hf))
    dataset = PacedDataset(problems=files.problems or "data/problems.jsonl",
                           service=files.service or f"{run_dir}/rollouts/address.json", stage=stage,
                           references=files.references or f"{run_dir}/references.jsonl", student=init,
                           seq_length=seq_length, export_dir=f"{out}/student_hf", final_dir=f"{out}/final",
                           num_workers=0, persistent_workers=False, pin_memory=False)
    return paced_container(model, init, dataset, out=out, train_iters=files.stage_share(stage, train_iters),
                           global_batch_size=global_batch_size, lr=lr)


PAIR_LAYOUT = Layout(tensor=2)
FRONTIER_LAYOUT = Layout(tensor=4, pipeline=8, student_stage_layers=(3, 3), teacher_stage_layers=(11, 11))


def qwen3_8b_to_1p7b_paced_8gpu_h100_bf16_config(stage: str = "fkl", files: StageFiles = StageFiles()):
    """The paper's pair: Qwen3-8B teacher -> Qwen3-1.7B student, 1 node of 8 H100 (TP2, DP4)."""
    return paced_distillation_config("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", stage, PAIR_LAYOUT,
                                     name="qwen3_8b_to_1p7b", files=files)


def qwen3_235b_a22b_to_8b_paced_32gpu_h100_bf16_config(stage: str = "fkl", files: StageFiles = StageFiles()):
    """Frontier teacher: Qwen3-235B-A22B (MoE) -> Qwen3-8B student, 4 nodes of 8 H100 (TP4, PP8)."""
    return paced_distillation_config("Qwen/Qwen3-8B", "Qwen/Qwen3-235B-A22B", stage, FRONTIER_LAYOUT,
                                     name="qwen3_235b_a22b_to_8b", files=files)
