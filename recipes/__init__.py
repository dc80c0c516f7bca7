"""Training recipes by name: each is a function `fn(stage="fkl"|"rkl", files=StageFiles())` returning
a training config.

A Megatron Bridge `ConfigContainer` runs under Bridge (`nemo_paced.megatron.bridge.train`); a
`nemo_paced.train.local.LocalTrainConfig` runs on the single-machine trainer. Names resolve to
`module:function` import paths only when used, so listing them imports nothing, and any
`module:function` path works in place of a name.

`StageFiles` is how a launcher (the SLURM chain, `nemo-paced train --init ...`) tells any recipe
where a stage's inputs and outputs are; each recipe maps them onto its own config keys, so the
launchers need not know them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StageFiles:
    """Where one training stage reads and writes; None keeps the recipe's default."""

    init: str | None = None  # the student to start from: a Hugging Face directory
    teacher: str | None = None  # the teacher: a Hugging Face directory
    problems: str | None = None
    references: str | None = None  # teacher references (the fkl stage trains on them)
    passrates: str | None = None  # a saved pass-rate table (recipes that read one; Bridge asks the service)
    service: str | None = None  # the rollout service's URL or address file
    teacher_cache: str | None = None  # a frontier teacher's top-k cache (nemo-paced teacher-cache): fkl reads it
    teacher_service: str | None = None  # a frontier teacher service's URL or address file: rkl scores samples there
    out: str | None = None  # the stage's output; the final student lands in OUT/final (Hugging Face format)
    split: float | None = None  # share of the recipe's training steps spent in stage 1 (fkl)

    def __post_init__(self) -> None:
        if self.split is not None and not 0 < self.split < 1:
            raise ValueError(f"split must lie strictly between 0 and 1 (both stages train), got {self.split}")

    def stage_share(self, stage: str, total: int, default_split: float = 0.5) -> int:
        """This stage's part of `total` steps."""
        split = default_split if self.split is None else self.split
        first = round(total * split)
        steps = first if stage == "fkl" else total - first
        if steps < 1:
            raise ValueError(f"split {split} leaves stage {stage} none of the recipe's {total} steps")
        return steps


class UnknownRecipe(LookupError):
    """A recipe name or module:function path that does not resolve."""


@dataclass(frozen=True)
class Recipe:
    path: str  # module:function
    summary: str


RECIPES: dict[str, Recipe] = {
    "tiny_cpu": Recipe("recipes.tiny_cpu:tiny_cpu",
                       "tiny teacher and student on the chain task; trains on this machine's CPU in minutes"),
    "qwen3_8b_to_1p7b": Recipe("recipes.qwen3:qwen3_8b_to_1p7b_paced_8gpu_h100_bf16_config",
                               "the paper's pair, Qwen3-8B -> Qwen3-1.7B; Bridge, 1 node of 8 H100 (TP2, DP4)"),
    "qwen3_235b_a22b_to_8b": Recipe("recipes.qwen3:qwen3_235b_a22b_to_8b_paced_32gpu_h100_bf16_config",
                                    "frontier MoE teacher, Qwen3-235B-A22B -> Qwen3-8B; Bridge, 4 nodes of 8 H100 "
                                    "(TP4, PP8)"),
    "qwen2p5_math_7b_self": Recipe("recipes.qwen2p5_math:qwen2p5_math_7b_self_distill_8gpu_h100_bf16_config",
                                   "self-distillation of Qwen2.5-Math-7B-Instruct (stage rkl, --teacher "
                                   "self[:initial]); Bridge, 1 node of 8 H100 (TP2, DP4)"),
    "qwen3_235b_a22b_served_to_8b": Recipe(
        "recipes.frontier:qwen3_235b_a22b_served_to_8b_paced_8gpu_h100_bf16_config",
        "frontier teacher outside the job (vLLM on its own nodes) -> Qwen3-8B; Bridge, student only, 1 node of 8 "
        "H100 (TP2, DP4); fkl from --teacher-cache, rkl against --teacher-service"),
}


def resolve(name: str) -> Callable[..., Any]:
    """The recipe function for a registered name or a `module:function` path."""
    if name in RECIPES:
        path = RECIPES[name].path
    elif ":" in name:
        path = name
    else:
        raise UnknownRecipe(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (or give module:function)")
    module_name, _, function_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise UnknownRecipe(f"recipe {name!r}: no module {module_name!r}") from error
        raise
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UnknownRecipe(f"recipe {name!r}: {module_name} has no function {function_name!r}")
    return function
