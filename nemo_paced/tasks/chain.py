"""Running means: a verifiable task whose difficulty is the number of steps.

A level-L problem lists L+1 digits d_0..d_L and asks for every running mean r_i = floor((r_{i-1} +
d_i) / 2), starting from r_0 = d_0, so the answer is a worked solution of L steps. Each step is the
same small skill; what grows with L is the need to get all L steps right in sequence, the
multi-step regime the paper's argument is about. (The floor mean, unlike a sum modulo 10, depends
visibly on each input alone, so tiny models learn it in seconds instead of after a long plateau.)

Layout: the digits, padded with '.' to one width, then '='; the answer is the L results with no
separators. Step i then always reads its digit from the same distance behind where it writes.

Example (max_level=3): 4, 7, 5 is the prompt "475.=" with the answer "55": floor((4 + 7) / 2) = 5,
then floor((5 + 5) / 2) = 5.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nemo_paced.problems import Problem, content_id

ALPHABET = "0123456789.="


@dataclass(frozen=True)
class ChainTask:
    max_level: int = 6

    def __post_init__(self) -> None:
        if self.max_level < 1:
            raise ValueError(f"max_level must be >= 1, got {self.max_level}")

    @property
    def levels(self) -> range:
        return range(1, self.max_level + 1)

    @property
    def prompt_width(self) -> int:
        """Characters in every prompt, including the final '='."""
        return self.max_level + 2

    def level_of(self, prompt: str) -> int:
        return len(prompt.rstrip("=").rstrip(".")) - 1

    def answer_length(self, level: int) -> int:
        return level

    def make(self, digits: list[int]) -> Problem:
        """The problem for explicit digits (2 to max_level + 1 of them)."""
        level = len(digits) - 1
        if not 1 <= level <= self.max_level or not all(0 <= d <= 9 for d in digits):
            raise ValueError(f"need 2..{self.max_level + 1} digits in 0..9, got {digits}")
        mean, results = digits[0], []
        for digit in digits[1:]:
            mean = (mean + digit) // 2
            results.append(str(mean))
        prompt = "".join(map(str, digits)).ljust(self.prompt_width - 1, ".") + "="
        answer = "".join(results)
        return Problem(f"L{level}-{content_id(prompt, answer)[:12]}", prompt, answer, {"level": level})

    def sample(self, level: int, rng: random.Random) -> Problem:
        return self.make([rng.randrange(10) for _ in range(level + 1)])

    def available(self, level: int, exclude: set[str] = frozenset()) -> int:
        """Distinct problems of `level` whose prompts are not in `exclude`."""
        if level not in self.levels:
            raise ValueError(f"level must lie in 1..{self.max_level}, got {level}")
        return 10 ** (level + 1) - sum(1 for prompt in exclude if self.level_of(prompt) == level)

    def generate(self, level: int, count: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
        """`count` distinct problems of one level, none of whose prompts is in `exclude`."""
        available = self.available(level, exclude)
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
    """Disjoint splits; the retained set is levels 1 and 2 (half each), the skills the student has.
    Level 1 has only 100 distinct problems: its pool share is what the test and retained sets leave."""
    used: set[str] = set()
    test: dict[int, list[Problem]] = {}
    for level in task.levels:
        test[level] = task.generate(level, test_per_level, seed=seed * 1000 + 1, exclude=used)
        used.update(p.prompt for p in test[level])
    easy = [level for level in (1, 2) if level in task.levels]
    retained = []
    for i, level in enumerate(easy):
        share = retained_size // len(easy) + (i < retained_size % len(easy))
        retained += task.generate(level, share, seed=seed * 1000 + 2, exclude=used)
    used.update(p.prompt for p in retained)
    pool = [p for level in task.levels
            for p in task.generate(level, min(pool_per_level, task.available(level, used)), seed * 1000 + 3, used)]
    return TaskSplits(pool, test, retained)
