"""Megatron Bridge recipe for the paper's self-distillation model: Qwen2.5-Math-7B-Instruct distils
itself with reverse KL on its own samples, on one node of 8 H100 (80 GB).

The self-teacher is the student conditioned on the problem's reference solution or answer
(`nemo_paced.self_teacher`); the student sees only the question, and both score the same response
tokens, drawn by the rollout service from the student. There is one model in the job: a Bridge
provider for the student alone (no ModelOpt distillation model), which `nemo_paced.megatron.bridge.train`
wraps in `SelfDistillationModel`, and the `SelfDistillDataset` adds each micro-batch's teacher rows.
Only the rkl stage exists. `nemo-paced train --recipe qwen2p5_math_7b_self --stage rkl --teacher
self[:current|:initial]` picks the teacher's weights (`dataset.self_teacher.*` sets the template,
the context fields and what to do with problems that have none). Optimiser settings are those of
the distillation recipes (`recipes.bridge_base.paced_container`).

Layout, 1 node: TP=2 (the model has 4 key/value heads, so TP <= 4; TP=2 keeps the all-reduces inside
NVLink pairs), PP=1 (the model fits without it; with PP the two passes' hidden states travel between
stages together and teacher rows get the student's seq_length), DP=4, sequence parallel. Qwen2.5-Math's context is 4096 positions:
student rows hold prompt + response in seq_length 3072 and teacher rows (prompt with the solution +
the same response) in 4096; response tokens past that are left out of the loss and counted.
Per GPU (7.6 B parameters, 3.8 B per TP shard):
- `current` (default): bf16 weights 7.6 GB, fp32 gradient buffer 15.2 GB, fp32 main weights and
  Adam moments over DP=4 11.4 GB, about 34 GB before activations; the teacher pass adds only its
  activations (no_grad, none kept) and its logits shard, 4096 x 76032 fp32 = 1.2 GB.
- `initial`: as `current` plus a frozen bf16 copy of the starting weights, 7.6 GB (no gradient, no
  optimizer state): about 42 GB before activations.
"""

from __future__ import annotations

from recipes import StageFiles
from recipes.bridge_base import Layout, hf_provider, paced_container

SELF_LAYOUT = Layout(tensor=2)


def qwen2p5_math_7b_self_distill_8gpu_h100_bf16_config(stage: str = "rkl", files: StageFiles = StageFiles(), *,
                                                       seq_length: int = 3072, teacher_seq_length: int = 4096,
                                                       global_batch_size: int = 128, train_iters: int = 1000,
                                                       lr: float = 1e-6):
    """Qwen2.5-Math-7B-Instruct self-distillation (reverse KL, stage rkl), 1 node of 8 H100 (TP2, DP4).

    `files.teacher` is `self`, `self:current` or `self:initial` (None: current); the whole
    `train_iters` is the rkl stage's (`files.split` does not apply: there is no fkl stage).
    """
    # first, so a machine without Bridge gets nemo_paced's clear ImportError
    from nemo_paced.megatron.bridge import SelfDistillDataset

    from nemo_paced.self_teacher import SelfTeacherConfig, parse_teacher

    name = "qwen2p5_math_7b_self"
    if stage != "rkl":
        raise ValueError(f"recipe {name!r} self-distils with reverse KL on the student's own samples: stage rkl, "
                         f"got {stage!r}")
    weights = parse_teacher(files.teacher or "self")
    if weights is None:
        raise ValueError(f"recipe {name!r} self-distils: --teacher self, self:current or self:initial, "
                         f"got {files.teacher!r}")
    run_dir = f"runs/paced/{name}"
    init = files.init or "Qwen/Qwen2.5-Math-7B-Instruct"
    out = files.out or f"{run_dir}/rkl"
    model = hf_provider(init, SELF_LAYOUT, None, seq_length)
    model.calculate_per_token_loss = True  # the Paced step normalises by the step's weight sum itself
    dataset = SelfDistillDataset(problems=files.problems or "data/problems.jsonl",
                                 service=files.service or f"{run_dir}/rollouts/address.json", student=init,
                                 seq_length=seq_length, teacher_seq_length=teacher_seq_length,
                                 self_teacher=SelfTeacherConfig(weights=weights), export_dir=f"{out}/student_hf",
                                 final_dir=f"{out}/final", num_workers=0, persistent_workers=False, pin_memory=False)
    return paced_container(model, init, dataset, out=out, train_iters=train_iters,
                           global_batch_size=global_batch_size, lr=lr)
