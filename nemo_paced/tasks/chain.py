"""Chained modular arithmetic: a verifiable task whose difficulty is the number of steps.

A level-L problem applies L operations (+ or -, modulo 10^digits) to L+1 operands and asks for
every running result, so the answer is a worked solution of L steps. Each step is the same small
skill; what grows with L is the need to get all L steps right in sequence, the multi-step regime
the paper's argument is about.

The layout keeps every step's inputs at a fixed distance from where its result is written:
numbers are least-significant digit first (carries flow in the direction of generation), prompts
are padded with '.' to one width, and a prompt step (operator + number) is as long as an answer
step (number + ','). A small model then learns the step once rather than once per position.

Example (digits=1, max_level=3): 4 + 7 - 5 is written "4+7-5..=" with the answer "1,6".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nemo_paced.problems import Problem, content_id

ALPHABET = "0123456789+-.=,"


@dataclass(frozen=True)
class ChainTask:
    max_level: int = 6
    digits: int = 2
    ops: str = "+-"

    def __post_init__(self) -> None:
        if self.max_level < 1 or self.digits < 1:
            raise ValueError(f"need max_level >= 1 and digits >= 1, got {self.max_level}, {self.digits}")
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"ops must be a non-empty subset of '+-', got {self.ops!r}")

    @property
    def levels(self) -> range:
        return range(1, self.max_level + 1)

    @property
    def prompt_width(self) -> int:
        """Characters in every prompt, including the final '='."""
        return (self.max_level + 1) * self.digits + self.max_level + 1

    def level_of(self, prompt: str) -> int:
        return sum(prompt.count(op) for op in "+-")

    def answer_length(self, level: int) -> int:
        return level * (self.digits + 1) - 1

    def _number(self, value: int) -> str:
        return str(value).zfill(self.digits)[::-1]

    def make(self, operands: list[int], ops: str) -> Problem:
        """The problem for explicit operands and operators."""
        level = len(ops)
        if not 1 <= level <= self.max_level or len(operands) != level + 1:
            raise ValueError(f"need 1..{self.max_level} ops and one more operand, got {operands} {ops!r}")
        modulus = 10**self.digits
        text = self._number(operands[0])
        total, results = operands[0], []
        for op, operand in zip(ops, operands[1:]):
            total = (total + operand if op == "+" else total - operand) % modulus
            results.append(self._number(total))
            text += op + self._number(operand)
        prompt = text.ljust(self.prompt_width - 1, ".") + "="
        answer = ",".join(results)
        return Problem(f"L{level}-{content_id(prompt, answer)[:12]}", prompt, answer, {"level": level})

    def sample(self, level: int, rng: random.Random) -> Problem:
        modulus = 10**self.digits
        operands = [rng.randrange(modulus) for _ in range(level + 1)]
        return self.make(operands, "".join(rng.choice(self.ops) for _ in range(level)))

    def generate(self, level: int, count: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
        """`count` distinct problems of one level, none of whose prompts is in `exclude`."""
        if level not in self.levels:
            raise ValueError(f"level must lie in 1..{self.max_level}, got {level}")
        distinct = (10**self.digits) ** (level + 1) * len(self.ops) ** level
        available = distinct - sum(1 for prompt in exclude if self.level_of(prompt) == level)
        if count > available:
            raise ValueError(f"level {level} has {available} distinct problems left; asked for {count}")
        rng = random.Random(f"chain-{seed}-{level}")
        seen, out = set(exclude), []
        while len(out) < count:
            problem = self.sample(level, rng)
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                out.append(problem)
        return out

    def mixture(self, count: int, level_weights: dict[int, float], rng: random.Random) -> list[Problem]:
        """Fresh problems with levels drawn from `level_weights` (used for pretraining)."""
        levels = list(level_weights)
        chosen = rng.choices(levels, weights=[level_weights[k] for k in levels], k=count)
        return [self.sample(level, rng) for level in chosen]


@dataclass(frozen=True)
class TaskSplits:
    """A training pool, a held-out test set per level, and an easy retained-skills set (forgetting)."""

    pool: list[Problem]
    test: dict[int, list[Problem]]
    retained: list[Problem]


def make_splits(task: ChainTask, pool_per_level: int, test_per_level: int, retained_size: int,
                seed: int = 0) -> TaskSplits:
    """Disjoint splits: the retained set is level 1, held out from the test and pool problems."""
    used: set[str] = set()
    test: dict[int, list[Problem]] = {}
    for level in task.levels:
        test[level] = task.generate(level, test_per_level, seed=seed * 1000 + 1, exclude=used)
        used.update(p.prompt for p in test[level])
    retained = task.generate(1, retained_size, seed=seed * 1000 + 2, exclude=used)
    used.update(p.prompt for p in retained)
    pool = [p for level in task.levels for p in task.generate(level, pool_per_level, seed=seed * 1000 + 3, exclude=used)]
    return TaskSplits(pool, test, retained)
