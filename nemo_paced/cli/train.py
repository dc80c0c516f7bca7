"""`nemo-paced train`: build a recipe's config for one stage, apply overrides, and train."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

STAGES = ("fkl", "rkl")


def _epilog() -> str:
    from recipes import RECIPES

    width = max(len(name) for name in RECIPES)
    lines = [f"  {name:<{width}}  {recipe.summary}" for name, recipe in RECIPES.items()]
    return "\n".join([
        "recipes:", *lines, "",
        "stages: fkl = forward KL on teacher references (stage 1); rkl = reverse KL on the student's own",
        "samples (stage 2). Run fkl, then rkl from its checkpoint.", "",
        "Bridge recipes run under torchrun or srun, one process per GPU, e.g.",
        "  torchrun --nproc-per-node 8 -m nemo_paced train --recipe qwen3_8b_to_1p7b --stage fkl \\",
        "      dataset.problems=/data/dapo17k.jsonl train.train_iters=2000",
    ])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train one stage of a recipe (Megatron Bridge or the single-machine trainer)",
        description="Build the recipe's config for the stage, apply KEY=VALUE overrides (Hydra style: "
                    "nested keys with dots, values as numbers, true/false, null, lists or text) and train.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, metavar="NAME",
                        help="a recipe name from the list below, or module:function")
    parser.add_argument("--stage", required=True, choices=STAGES, help="fkl (stage 1) or rkl (stage 2)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the final config (after overrides) and exit without training")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the recipe's config, e.g. train.train_iters=100")
    parser.set_defaults(handler=main)


def build(recipe: str, stage: str, overrides: list[str]) -> Any:
    from nemo_paced.overrides import apply_overrides
    from recipes import resolve

    return apply_overrides(resolve(recipe)(stage=stage), overrides)


# Exit status of a stage stopped early with its checkpoint saved. SIGUSR1 is the launchers' "save now,
# you will be requeued" warning (launch/jobs/train.sbatch requeues itself), so it exits 0. Any other
# signal (SIGTERM: time limit, scancel, preemption without warning) exits with EX_TEMPFAIL, so SLURM's
# afterok dependents never start on an unfinished stage.
EXIT_PREEMPTED = 75


def run(config: Any) -> int:
    """Dispatch by config type: the local trainer's config, else a Bridge ConfigContainer."""
    from nemo_paced.train.local import LocalTrainConfig, train

    if isinstance(config, LocalTrainConfig):
        result = train(config)
        finished_or_requeued = result["status"] == "done" or result.get("signal") == signal.SIGUSR1
        return 0 if finished_or_requeued else EXIT_PREEMPTED
    from nemo_paced.megatron.bridge import train as bridge_train

    bridge_train(config)
    return 0


def main(args: argparse.Namespace) -> int:
    from nemo_paced.overrides import OverrideError

    try:
        config = build(args.recipe, args.stage, args.overrides)
    except (OverrideError, LookupError) as error:
        print(f"nemo-paced train: error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config)
        return 0
    return run(config)
