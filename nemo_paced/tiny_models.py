"""Tiny causal-LM teacher and student for the demo: built from a config, pretrained from scratch, cached.

The models are ordinary `transformers` Llama checkpoints, so the rollout service, the trainer and
the Megatron converters load them like any other model.
Pretraining is supervised on fresh problems; the student sees a curriculum tilted to short chains,
which leaves its competence frontier inside the task's level range. A trained model is stored under
a key hashed from everything that determines it, so a later run with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nemo_paced.atomic import atomic_write_json
from nemo_paced.problems import Problem
from nemo_paced.tasks import ALPHABET, ChainTask
from nemo_paced.tasks.tokenizer import char_tokenizer

CACHE_FORMAT = 1  # bump when the training code changes what a key produces
ROPE_THETA = 100.0  # sequences of ~20 tokens: the default base of 10000 barely turns over that length


@dataclass(frozen=True)
class TinyModelConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    level_weights: dict[int, float] = field(default_factory=lambda: {1: 1.0})
    seed: int = 0


def build_model(task: ChainTask, config: TinyModelConfig, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = char_tokenizer(ALPHABET)
    llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=4 * config.hidden,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        max_position_embeddings=task.prompt_width + task.answer_length(task.max_level) + 1, rope_theta=ROPE_THETA,
                        bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(llama), tokenizer


def answer_batch(problems: list[Problem], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) for prompt + answer + eos, loss on the answer and eos only."""
    rows, label_rows = [], []
    for problem in problems:
        prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label)
        mask[i, : len(row)] = 1
    return ids, mask, labels


def pretrain(model, tokenizer, task: ChainTask, config: PretrainConfig,
             progress: Callable[[int, float], None] | None = None) -> float:
    """Supervised training on fresh problems; returns the mean loss of the last 50 steps."""
    rng = random.Random(f"pretrain-{config.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / config.steps))))
    model.train()
    recent: list[float] = []
    for step in range(config.steps):
        ids, mask, labels = answer_batch(task.mixture(config.batch_size, config.level_weights, rng), tokenizer)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
        if progress is not None:
            progress(step + 1, loss.item())
    model.eval()
    return sum(recent) / len(recent)


def cache_key(task: ChainTask, model: TinyModelConfig, training: PretrainConfig) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "task": asdict(task), "model": asdict(model),
                       "pretrain": {**asdict(training), "level_weights": sorted(training.level_weights.items())},
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_pretrained(cache_dir: str | Path, name: str, task: ChainTask, model_config: TinyModelConfig,
                      training: PretrainConfig, progress: Callable[[int, float], None] | None = None) -> Path:
    """Directory of a pretrained model (weights + tokenizer), trained now unless already cached.

    The directory is assembled beside its final place and renamed into it, so an interrupted
    run leaves no half-written model under a valid key.
    """
    final = Path(cache_dir) / f"{name}-{cache_key(task, model_config, training)}"
    if (final / "pretrain.json").is_file():
        return final
    model, tokenizer = build_model(task, model_config, seed=training.seed)
    loss = pretrain(model, tokenizer, task, training, progress)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "pretrain.json", {"task": asdict(task), "model": asdict(model_config),
                                                      "pretrain": {**asdict(training), "level_weights": {
                                                          str(k): v for k, v in training.level_weights.items()}},
                                                      "final_loss": loss})
        if final.exists():  # a concurrent run finished first; keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
