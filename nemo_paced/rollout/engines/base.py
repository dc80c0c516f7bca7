"""What every inference engine provides: n sampled completions per prompt, with token ids and
log-probs, and a way to swap in new weights without restarting the process around it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


MIN_TEMPERATURE = 0.01  # smallest positive temperature: logits / temperature must not overflow fp32
SEED_RANGE = (0, 2**63 - 1)  # seeds every engine accepts (torch.manual_seed, vLLM)


@dataclass(frozen=True)
class SamplingParams:
    """n samples per prompt. temperature 0 means greedy decoding, else it is at least MIN_TEMPERATURE;
    top_p 1 disables nucleus sampling. `seed` (in SEED_RANGE) makes a call reproducible on the same
    engine and batch (None: fresh randomness)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not (math.isfinite(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE)):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {self.seed}")


class CheckpointError(ValueError):
    """A checkpoint an engine refuses to load (unreadable, incomplete, or not the architecture being
    served); the message says why, naming the keys. The weights in use stay loaded."""


@dataclass(frozen=True)
class Sample:
    """One completion. `token_ids` are the generated tokens, including the end-of-sequence token when
    generation stopped on it (finish_reason "stop"; "length" when max_tokens ran out). `logprobs[i]`
    is log p(token_ids[i] | prompt, token_ids[:i]) under the model's own distribution (temperature 1,
    no top-p), computed in fp32: the quantity a reverse-KL loss needs. `text` excludes special tokens."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass(frozen=True)
class Generation:
    """The samples drawn for one prompt, and the prompt's token ids as the engine tokenised it."""

    prompt_token_ids: list[int]
    samples: list[Sample] = field(default_factory=list)


@runtime_checkable
class Engine(Protocol):
    """An inference engine. Not thread-safe: callers serialise `generate` and `load_weights`."""

    name: str
    checkpoint: str  # the weights currently loaded (a directory path)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        """params.n samples for each prompt, in prompt order; prompts are tokenised with the
        tokenizer's special tokens (its BOS, if it adds one)."""
        ...

    def load_weights(self, path: str) -> None:
        """Replace the model weights with those in checkpoint directory `path` (same architecture);
        raises CheckpointError, keeping the weights in use, for a checkpoint it cannot use."""
        ...

    @property
    def tokenizer(self):
        """The tokenizer prompts are encoded with (used to render chat templates)."""
        ...

    def close(self) -> None:
        """Release what outlives the object otherwise (vLLM's engine-core processes)."""
        ...


def create_engine(kind: str, model: str, **options) -> Engine:
    """Build an engine by name ('hf', 'vllm' or 'openai'); each imports its backend only when chosen."""
    if kind == "hf":
        from nemo_paced.rollout.engines.hf import HFEngine

        return HFEngine(model, **options)
    if kind == "vllm":
        from nemo_paced.rollout.engines.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    if kind == "openai":
        from nemo_paced.rollout.engines.openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    raise ValueError(f"engine must be 'hf', 'vllm' or 'openai', got {kind!r}")
