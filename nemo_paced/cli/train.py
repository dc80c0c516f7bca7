"""`nemo-paced train`: build a recipe's config for one stage, apply overrides, and train."""

from __future__ import annotations

import argparse
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
        "samples (stage 2). Run fkl, then rkl: by default it starts from fkl's final student (OUT/final).",
        "What each stage reads: fkl --init --teacher --problems --references and the service; rkl --init",
        "--teacher --problems and the service (no references). The starting pass rates are the service's",
        "table unless --passrates names a saved one. tiny_cpu: schedule.total_steps counts both stages and",
        "--split divides them; problems with meta.split=test are the evaluation benchmarks.", "",
        "The file options tell any recipe where the stage's inputs and outputs are (the SLURM chain passes",
        "all of them); each recipe maps them onto its own config, and overrides apply after.", "",
        "Self-distillation (reverse KL on the student's own samples, scored by the student conditioned on",
        "each problem's solution or answer; docs/self_distillation.md), e.g.",
        "  nemo-paced train --recipe tiny_cpu --stage rkl --teacher self --init runs/tiny/student",
        "on the local trainer, and under Megatron Bridge (qwen2p5_math_7b_self, stage rkl only)",
        "  torchrun --nproc-per-node 8 -m nemo_paced train --recipe qwen2p5_math_7b_self --stage rkl \\",
        "      --teacher self:initial --problems /data/math.jsonl --service runs/paced/rollouts/address.json", "",
        "Bridge recipes run under torchrun or srun, one process per GPU, e.g.",
        "  torchrun --nproc-per-node 8 -m nemo_paced train --recipe qwen3_8b_to_1p7b --stage fkl \\",
        "      --problems /data/dapo17k.jsonl --references runs/paced/references.jsonl train.train_iters=2000",
        "", "exit status: 0 the stage is done; 2 bad input (a missing file or directory, a bad override, a",
        "checkpoint of another stage in --out); 3 the rollout service could not be reached; 75 stopped by",
        "a signal with its checkpoint saved (run the same command to resume).",
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
    files = parser.add_argument_group("where the stage's files are (default: the recipe's own)")
    files.add_argument("--init", metavar="DIR", help="student to start from (Hugging Face directory)")
    files.add_argument("--teacher", metavar="DIR|self[:current|:initial]",
                       help="teacher (Hugging Face directory), or self-distillation: the student itself with "
                            "privileged context in its prompt, at its current weights (self, self:current) or "
                            "a frozen copy of its starting weights (self:initial); stage rkl only")
    files.add_argument("--problems", metavar="FILE", help="problem set")
    files.add_argument("--references", metavar="FILE", help="teacher references (make-references)")
    files.add_argument("--passrates", metavar="FILE", help="saved pass-rate table, for recipes that read one")
    files.add_argument("--service", metavar="ADDR", help="rollout service URL or address file")
    files.add_argument("--teacher-cache", metavar="DIR",
                       help="frontier teacher outside the job: its top-k cache (nemo-paced teacher-cache), "
                            "read by stage fkl instead of running the teacher")
    files.add_argument("--teacher-service", metavar="ADDR",
                       help="frontier teacher outside the job: the teacher service (nemo-paced serve-teacher) "
                            "URL or address file, which scores the student's samples in stage rkl")
    files.add_argument("--out", metavar="DIR", help="output directory; the final student goes to OUT/final")
    files.add_argument("--split", type=float, metavar="F",
                       help="share of the recipe's training steps spent in stage 1 (0 < F < 1; default 0.5)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the final config (after overrides) as indented JSON and exit without training")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the recipe's config, e.g. train.train_iters=100")
    parser.set_defaults(handler=main)


def build(recipe: str, stage: str, overrides: list[str], files: Any = None) -> Any:
    from nemo_paced.overrides import apply_overrides
    from nemo_paced.self_teacher import parse_teacher
    from recipes import StageFiles, resolve

    config = apply_overrides(resolve(recipe)(stage=stage, files=files or StageFiles()), overrides)
    teacher = (files or StageFiles()).teacher
    # the local trainer's config, or a Bridge config whose data source adds self-teacher rows (SelfDistillDataset)
    takes_self = hasattr(config, "self_teacher_weights") or hasattr(getattr(config, "dataset", None), "self_teacher")
    if teacher is not None and parse_teacher(teacher) is not None and not takes_self:
        raise ValueError(f"recipe {recipe!r} does not take a self-teacher ({teacher}); self-distillation runs on "
                         "recipes such as tiny_cpu and qwen2p5_math_7b_self")
    return config


# Exit status (EX_TEMPFAIL) of a stage stopped by a signal with its checkpoint saved, whichever the
# signal: SLURM's afterok dependents must never start on an unfinished stage, and NeMo-Run's batch
# template requeues a job only when it exits non-zero. launch/jobs/train.sbatch requeues itself on
# SIGUSR1 whatever the status.
EXIT_PREEMPTED = 75


def run(config: Any) -> int:
    """Dispatch by config type: the local trainer's config, else a Bridge ConfigContainer."""
    from nemo_paced.train.local import LocalTrainConfig, train

    if isinstance(config, LocalTrainConfig):
        return 0 if train(config)["status"] == "done" else EXIT_PREEMPTED
    from nemo_paced.megatron.bridge import train as bridge_train

    return 0 if bridge_train(config) else EXIT_PREEMPTED


def main(args: argparse.Namespace) -> int:
    from nemo_paced.overrides import OverrideError

    from recipes import StageFiles

    try:
        files = StageFiles(init=args.init, teacher=args.teacher, problems=args.problems, references=args.references,
                           passrates=args.passrates, service=args.service, out=args.out, split=args.split,
                           teacher_cache=args.teacher_cache, teacher_service=args.teacher_service)
        config = build(args.recipe, args.stage, args.overrides, files)
    except (OverrideError, LookupError, ValueError, ImportError) as error:  # ImportError: Bridge on a CPU machine
        print(f"nemo-paced train: error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_json(config))
        return 0
    return run(config)


def config_json(config: Any) -> str:
    """A config (dataclasses all the way down, as both kinds of recipe build) as indented JSON; values
    JSON has no type for (dtypes, functions, enums) appear as their text."""
    import dataclasses
    import enum
    import json

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, enum.Enum):
            return plain(value.value)
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return json.dumps(plain(config), indent=2)
