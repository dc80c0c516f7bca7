"""The single-machine recipe: the demo's tiny teacher and student, one PACED stage at a time.

`nemo-paced demo --prepare-only --out runs/tiny` writes the models and problem files this recipe
reads; the rollout service (address file `runs/tiny/rollouts/address.json`) holds the pass rates
and the teacher references come from `nemo-paced make-references`. Stage fkl trains the prepared
student with forward KL; stage rkl continues from stage fkl's final model with reverse KL.
Override any field, e.g. `nemo-paced train --recipe tiny_cpu --stage fkl schedule.total_steps=50`.
"""

from __future__ import annotations

from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.train.local import LocalTrainConfig
from nemo_paced.weighting import WeightConfig

WORK = "runs/tiny"
STEPS_PER_STAGE = 150


def tiny_cpu(stage: str = "fkl", work: str = WORK) -> LocalTrainConfig:
    from nemo_paced.demo.experiment import DemoConfig

    if stage not in ("fkl", "rkl"):
        raise ValueError(f"stage must be fkl or rkl, got {stage!r}")
    demo = DemoConfig()
    return LocalTrainConfig(
        student=f"{work}/student" if stage == "fkl" else f"{work}/fkl/final",
        teacher=f"{work}/teacher",
        problems=f"{work}/problems.jsonl",
        references=f"{work}/references.jsonl",
        passrates=f"{work}/rollouts/passrates.jsonl",
        rollout=f"{work}/rollouts/address.json",
        out_dir=f"{work}/{stage}",
        schedule=TwoStageSchedule(STEPS_PER_STAGE, fkl_fraction=1.0 if stage == "fkl" else 0.0,
                                  refresh_every=demo.refresh_every),
        weighting=WeightConfig(mode="loss"),
        batch_size=demo.batch_size,
        lr=demo.lr,
        rkl_sync_every=demo.rkl_sync_every,
        seq_length=demo.task.prompt_width + demo.task.answer_length(demo.task.max_level) + 1,
        eval_every=demo.eval_every,
        progress=True,
    )
