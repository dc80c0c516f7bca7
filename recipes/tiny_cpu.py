"""The single-machine recipe: the demo's tiny teacher and student, one PACED stage at a time.

`nemo-paced demo --prepare-only --out runs/tiny` writes the models and problem files this recipe
reads by default; the rollout service (address file `runs/tiny/rollouts/address.json`) holds the
pass rates and the teacher references come from `nemo-paced make-references`. Stage fkl trains the
prepared student with forward KL; stage rkl continues from stage fkl's final model with reverse KL.
The two stages share TOTAL_STEPS (half each unless `files.split` says otherwise). Override any
field, e.g. `nemo-paced train --recipe tiny_cpu --stage fkl schedule.total_steps=50`.
"""

from __future__ import annotations

from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.train.local import LocalTrainConfig
from nemo_paced.weighting import WeightConfig
from recipes import StageFiles

WORK = "runs/tiny"
TOTAL_STEPS = 300


def tiny_cpu(stage: str = "fkl", files: StageFiles = StageFiles(), work: str = WORK) -> LocalTrainConfig:
    from nemo_paced.demo.experiment import DemoConfig

    if stage not in ("fkl", "rkl"):
        raise ValueError(f"stage must be fkl or rkl, got {stage!r}")
    demo = DemoConfig()
    return LocalTrainConfig(
        student=files.init or (f"{work}/student" if stage == "fkl" else f"{work}/fkl/final"),
        teacher=files.teacher or f"{work}/teacher",
        problems=files.problems or f"{work}/problems.jsonl",
        references=files.references or f"{work}/references.jsonl",
        passrates=files.passrates or f"{work}/rollouts/passrates.jsonl",
        rollout=files.service or f"{work}/rollouts/address.json",
        out_dir=files.out or f"{work}/{stage}",
        schedule=TwoStageSchedule(files.stage_share(stage, TOTAL_STEPS), fkl_fraction=1.0 if stage == "fkl" else 0.0,
                                  refresh_every=demo.refresh_every),
        weighting=WeightConfig(mode="loss"),
        batch_size=demo.batch_size,
        lr=demo.lr,
        rkl_sync_every=demo.rkl_sync_every,
        seq_length=demo.task.prompt_width + demo.task.answer_length(demo.task.max_level) + 1,
        eval_every=demo.eval_every,
        progress=True,
    )
