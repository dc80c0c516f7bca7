"""The one sampling-and-verification path: render prompts, sample, grade.

Pass-rate estimation (K samples per problem), on-policy sampling for reverse KL and evaluation all
call `rollout`; they differ only in how many samples they draw and what they do with the scores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from nemo_paced.passrates import Outcome
from nemo_paced.problems import Problem, render_prompt
from nemo_paced.rollout.engines.base import Engine, SamplingParams
from nemo_paced.rollout.verifiers import Verifier, score

log = logging.getLogger(__name__)
UNKNOWN_SHARE = 0.2  # more unknown prompt tokens than this: the template does not fit the tokenizer
_warned: set[str] = set()


@dataclass(frozen=True)
class ScoredSample:
    """A completion with its verifier score; fields as in `engines.base.Sample`."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    score: int


@dataclass(frozen=True)
class ProblemRollouts:
    """All samples drawn for one problem in one call, and the weights (checkpoint) that drew them."""

    problem_id: str
    prompt: str
    prompt_token_ids: list[int]
    samples: list[ScoredSample]
    checkpoint: str

    @property
    def successes(self) -> int:
        return sum(s.score for s in self.samples)

    @property
    def trials(self) -> int:
        return len(self.samples)

    def outcome(self) -> Outcome:
        return Outcome(self.problem_id, self.successes, self.trials)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ProblemRollouts":
        return cls(**{**row, "samples": [ScoredSample(**s) for s in row["samples"]]})


def rollout(engine: Engine, problems: Sequence[Problem], verifier: Verifier, params: SamplingParams,
            template: str = "plain") -> list[ProblemRollouts]:
    """params.n graded samples for each problem, in order; the caller owns the engine for the call."""
    prompts = [render_prompt(p, template, engine.tokenizer) for p in problems]
    if template == "chat":
        prompts = [_without_added_prefix(p, engine.tokenizer) for p in prompts]
    if len(_warned) < 2:  # before generating: a prompt past the context may crash the engine
        check_prompts(engine, engine.tokenizer(prompts)["input_ids"], params, template)
    generations = engine.generate(prompts, params)
    return [ProblemRollouts(problem.id, prompt, generation.prompt_token_ids,
                            [ScoredSample(s.text, s.token_ids, s.logprobs, s.finish_reason,
                                          score(verifier, s.text, problem.answer)) for s in generation.samples],
                            engine.checkpoint)
            for problem, prompt, generation in zip(problems, prompts, generations)]


def check_prompts(engine: Engine, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                  template: str) -> list[str]:
    """Warn (once per process and kind) about prompts the model cannot answer: mostly unknown tokens,
    or longer, with the response, than its context. Every sample of such a prompt fails, so pass
    rates, references and accuracy come out 0 without any error. Returns the warnings issued now."""
    issued = []
    unk = getattr(engine.tokenizer, "unk_token_id", None)
    total = sum(len(ids) for ids in prompt_token_ids)
    if unk is not None and total and sum(ids.count(unk) for ids in prompt_token_ids) > UNKNOWN_SHARE * total:
        share = sum(ids.count(unk) for ids in prompt_token_ids) / total
        issued.append(("unknown", f"{share:.0%} of the prompt tokens are unknown to the model's tokenizer "
                                  f"(template {template!r}): try --template raw, or a tokenizer that knows the text"))
    context = context_length(engine)
    longest = max((len(ids) for ids in prompt_token_ids), default=0)
    if context is not None and longest + params.max_tokens > context:
        issued.append(("context", f"prompts of up to {longest} tokens (template {template!r}) plus --max-tokens "
                                  f"{params.max_tokens} exceed the model's context of {context} tokens: "
                                  f"responses are cut short or fail; lower --max-tokens or shorten the template"))
    fresh = [message for kind, message in issued if kind not in _warned]
    for kind, message in issued:
        if kind not in _warned:
            _warned.add(kind)
            log.warning(message)
    return fresh


def context_length(engine: Engine) -> int | None:
    """The model's context in tokens, where the engine exposes it (hf: the model's config)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    value = getattr(engine, "max_model_len", None)
    return value if isinstance(value, int) else None


def _without_added_prefix(prompt: str, tokenizer) -> str:
    """A rendered chat template starts with the BOS that the engine's tokenizer adds again: drop the
    text of what tokenising adds in front, so the model sees that token once."""
    added = tokenizer("")["input_ids"]
    prefix = tokenizer.decode(added) if added else ""
    return prompt[len(prefix):] if prefix and prompt.startswith(prefix) else prompt


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
