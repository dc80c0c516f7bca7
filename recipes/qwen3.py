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

from dataclasses import dataclass

from recipes import StageFiles


@dataclass(frozen=True)
class Layout:
    """Parallel layout shared by teacher and student; `*_stage_layers` = (first, last) pipeline stage
    layer counts for models whose layers do not split evenly (None: even split)."""

    tensor: int
    pipeline: int = 1
    sequence_parallel: bool = True
    student_stage_layers: tuple[int, int] | None = None
    teacher_stage_layers: tuple[int, int] | None = None

    def apply(self, provider, stage_layers: tuple[int, int] | None) -> None:
        provider.tensor_model_parallel_size = self.tensor
        provider.pipeline_model_parallel_size = self.pipeline
        provider.virtual_pipeline_model_parallel_size = None
        provider.context_parallel_size = 1
        provider.sequence_parallel = self.sequence_parallel and self.tensor > 1
        if getattr(provider, "num_moe_experts", None):
            provider.expert_model_parallel_size = 1
            provider.expert_tensor_parallel_size = self.tensor
        if stage_layers is not None:
            provider.num_layers_in_first_pipeline_stage, provider.num_layers_in_last_pipeline_stage = stage_layers


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

    import torch
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _pretrain_common
    from transformers import AutoTokenizer

    from nemo_paced.megatron.criterion import Stage, parse_stage

    stage = parse_stage(stage).value
    run_dir = f"runs/paced/{name}"
    init = files.init or (student_hf if stage == Stage.FKL.value else f"{run_dir}/{Stage.FKL.value}/final")
    teacher_hf = files.teacher or teacher_hf
    out = files.out or f"{run_dir}/{stage}"
    # Bridge's defaults for the other sections (those of its Qwen3 recipes: distributed optimizer, overlapped
    # gradient reduce and parameter gather, ...); model and data replaced. Not `qwen3_1p7b_pretrain_config()`:
    # it reads Qwen/Qwen3-1.7B's config from the Hugging Face hub, which fails offline whatever --init says.
    config = _pretrain_common()
    student = AutoBridge.from_hf_pretrained(init).to_megatron_provider(load_weights=True)
    teacher = AutoBridge.from_hf_pretrained(teacher_hf).to_megatron_provider(load_weights=True)
    for provider, stage_layers in ((student, layout.student_stage_layers), (teacher, layout.teacher_stage_layers)):
        layout.apply(provider, stage_layers)
        provider.seq_length = seq_length
        provider.pipeline_dtype = torch.bfloat16
        provider.should_pad_vocab = False  # the checkpoint's vocabulary exactly: no dummy logits in the KL
    config.model = paced_distillation_provider(student, teacher, stage, temperature,
                                               AutoTokenizer.from_pretrained(init),
                                               AutoTokenizer.from_pretrained(teacher_hf))
    config.tokenizer.tokenizer_model = init
    # The base recipe derives the vocabulary from the tokenizer (padded to 128 x TP), for pretraining
    # from scratch: with a checkpoint it would drop rows (151808 < 151936 at TP=2) or add dummy logits
    # (152064 at TP=4). Keep the checkpoint's size, which Bridge then leaves unpadded.
    config.tokenizer.use_tokenizer_vocab_size = False
    config.dataset = PacedDataset(problems=files.problems or "data/problems.jsonl",
                                  service=files.service or f"{run_dir}/rollouts/address.json", stage=stage,
                                  references=files.references or f"{run_dir}/references.jsonl", student=init,
                                  seq_length=seq_length, export_dir=f"{out}/student_hf", final_dir=f"{out}/final",
                                  num_workers=0, persistent_workers=False, pin_memory=False)
    config.train.global_batch_size = global_batch_size
    config.train.micro_batch_size = 1
    config.train.train_iters = files.stage_share(stage, train_iters)
    config.validation.eval_iters = 0
    config.optimizer.lr = config.optimizer.min_lr = lr
    config.optimizer.weight_decay = 0.1
    config.optimizer.clip_grad = 1.0
    config.scheduler.lr_warmup_iters = 0
    config.scheduler.lr_decay_style = "constant"
    config.ddp.average_in_collective = False  # required by per-token loss accounting: gradients are summed
    # A requeued job resumes from its own checkpoints: Bridge loads from `load` only (the base recipe
    # points it at nemo_experiments/ under the working directory), and the data stream's state lies there.
    config.checkpoint.save = config.checkpoint.load = f"{out}/checkpoints"
    # Stop with a checkpoint on SIGTERM; PacedCallback routes SIGUSR1 (train.sbatch's requeue warning)
    # to the same handler, and `nemo-paced train` then exits 75.
    config.train.exit_signal_handler = True
    return config


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
