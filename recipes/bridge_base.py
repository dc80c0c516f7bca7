"""What every Megatron Bridge recipe of nemo-paced shares: the parallel layout, Hugging Face models as
Bridge providers, and the training settings of a Paced stage around a model and a data source.

Used by `recipes.qwen3` (teacher -> student distillation) and `recipes.qwen2p5_math` (self-distillation).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def hf_provider(path: str, layout: Layout, stage_layers: tuple[int, int] | None, seq_length: int):
    """A Bridge GPT provider for the Hugging Face model at `path` (its weights loaded when the model is
    built), laid out by `layout`, in bf16, with the checkpoint's vocabulary exactly (no dummy logits in the KL)."""
    import torch
    from megatron.bridge import AutoBridge

    provider = AutoBridge.from_hf_pretrained(path).to_megatron_provider(load_weights=True)
    layout.apply(provider, stage_layers)
    provider.seq_length = seq_length
    provider.pipeline_dtype = torch.bfloat16
    provider.should_pad_vocab = False
    return provider


def paced_container(model, init: str, dataset, *, out: str, train_iters: int, global_batch_size: int, lr: float):
    """A Bridge ConfigContainer training `model` (its provider) on `dataset` (a `PacedDataset`) with the
    paper's optimiser settings; checkpoints in `out/checkpoints`, which a requeued job resumes from."""
    from megatron.bridge.recipes.common import _pretrain_common

    # Bridge's defaults for the other sections (those of its Qwen recipes: distributed optimizer, overlapped
    # gradient reduce and parameter gather, ...); model and data replaced. Not a `qwen*_pretrain_config()`:
    # those read the model's config from the Hugging Face hub, which fails offline whatever --init says.
    config = _pretrain_common()
    config.model = model
    config.tokenizer.tokenizer_model = init
    # The base recipe derives the vocabulary from the tokenizer (padded to 128 x TP), for pretraining
    # from scratch: with a checkpoint it would drop rows (151808 < 151936 at TP=2) or add dummy logits
    # (152064 at TP=4). Keep the checkpoint's size, which Bridge then leaves unpadded.
    config.tokenizer.use_tokenizer_vocab_size = False
    config.dataset = dataset
    config.train.global_batch_size = global_batch_size
    config.train.micro_batch_size = 1
    config.train.train_iters = train_iters
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
