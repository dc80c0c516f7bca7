"""The single-machine recipe: the demo's tiny teacher and student, one PACED stage at a time.

`nemo-paced demo --prepare-only --out runs/tiny` writes the models and problem files this recipe
reads by default; the rollout service (address file `runs/tiny/rollouts/address.json`, or
`files.service`) holds the pass rates, and the run starts from its table unless `files.passrates`
names a saved one. Teacher references (`nemo-paced make-references`) are read by stage fkl only.
Stage fkl trains the prepared student with forward KL; stage rkl continues from stage fkl's final
model with reverse KL. Both stages run on one schedule of `schedule.total_steps` steps (TOTAL_STEPS),
split by `files.split` (half each by default), so `--split 0.8 schedule.total_steps=50` trains 40
forward-KL steps, then 10 reverse-KL steps.
"""

from __future__ import annotations

from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.self_teacher import SelfTeacherConfig, parse_teacher
from nemo_paced.train.local import LocalTrainConfig
from nemo_paced.weighting import WeightConfig
from recipes import StageFiles

WORK = "runs/tiny"
# The chain task's self-teacher prompt (its alphabet has no words): the answer, "=", then the question.
CHAIN_SELF_TEMPLATE = "{context}={question}"
TOTAL_STEPS = 300


def tiny_cpu(stage: str = "fkl", files: StageFiles = StageFiles(), work: str = WORK) -> LocalTrainConfig:
    from nemo_paced.demo.experiment import DemoConfig

    if stage not in ("fkl", "rkl"):
        raise ValueError(f"stage must be fkl or rkl, got {stage!r}")
    demo = DemoConfig()
    self_distil = files.teacher is not None and parse_teacher(files.teacher) is not None
    if self_distil and stage != "rkl":
        raise ValueError(f"teacher {files.teacher!r}: self-distillation is stage rkl (reverse KL on own samples)")
    return LocalTrainConfig(
        student=files.init or (f"{work}/student" if stage == "fkl" or self_distil else f"{work}/fkl/final"),
        teacher=files.teacher or f"{work}/teacher",
        problems=files.problems or f"{work}/problems.jsonl",
        references=files.references or (f"{work}/references.jsonl" if stage == "fkl" else None),
        passrates=files.passrates,
        rollout=files.service or f"{work}/rollouts/address.json",
        teacher_cache=files.teacher_cache,
        teacher_service=files.teacher_service,
        out_dir=files.out or f"{work}/{stage}",
        schedule=TwoStageSchedule(TOTAL_STEPS, fkl_fraction=0.0 if self_distil else 0.5 if files.split is None
                                  else files.split,
                                  refresh_every=demo.refresh_every),
        stage=stage,
        weighting=WeightConfig(mode="loss"),
        batch_size=demo.batch_size,
        lr=demo.lr,
        rkl_sync_every=demo.rkl_sync_every,
        seq_length=demo.task.prompt_width + demo.task.answer_length(demo.task.max_level) + 1,
        eval_every=demo.eval_every,
        progress=True,
        self_teacher=SelfTeacherConfig(template=CHAIN_SELF_TEMPLATE, context=("answer",)),
    )
