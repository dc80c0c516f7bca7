"""Megatron Bridge glue for a frontier teacher outside the training job: the job builds the student
alone (a plain GPT provider, no `DistillationProvider`, no teacher weights) and the teacher's top-k
arrives with the data.

- fkl: the teacher references, each row with its teacher cache rows (`nemo-paced teacher-cache`,
  `CachedReferenceBatches`). The cache is checked when the data is built: its tokenizer fingerprint
  must be the student's and its vocabulary no larger; problems it skipped at weight 0 (or never saw)
  are not trained on until the cache is extended.
- rkl: the student's on-policy samples, scored by the teacher service (`nemo-paced serve-teacher`,
  `ServedTeacher`) on the sampling thread of each data-parallel replica's first reader, shared with
  its model-parallel peers, so scoring overlaps training and each sample is scored once.

`forward_step()` gives `TopKTeacherStep`: `topk_kl` over the student's vocabulary-parallel logits
(forward in fkl, reverse in rkl; `tail` bucket by default), or with `rkl_estimator="sampled"` the
sampled-token estimator of the reverse KL. Weighting and global-batch normalisation are the Paced
step's, as with a teacher in the job.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_paced.batches import BatchBuilder
from nemo_paced.megatron.bridge import PacedDataset
from nemo_paced.megatron.criterion import Stage, parse_stage
from nemo_paced.megatron.step import TopKTeacherStep
from nemo_paced.teacher.served import ESTIMATORS

TAILS = ("bucket", "renormalize")


@dataclass(kw_only=True)
class TopKTeacherDataset(PacedDataset):
    """`PacedDataset` whose micro-batches carry a served or cached teacher's top-k rows.

    `teacher_cache` (fkl) and `teacher_service` (rkl: URL or address file) say where the teacher is;
    `teacher_k` is the top-k asked of the service (the cache has its own k); `rkl_estimator` is "topk"
    (default: the exact reverse KL on the k+1 outcomes of the teacher's top-k and the tail, no
    sampling noise from the estimator) or "sampled" (log q(y) - log p(y) at the sampled token:
    unbiased for the full-vocabulary reverse KL's gradient but noisier, and it needs only k = 1);
    `temperature` divides the student's logits only (cached and served log-probs are the teacher's at
    temperature 1).
    """

    teacher_cache: str | None = None
    teacher_service: str | None = None
    teacher_k: int = 64
    rkl_estimator: str = "topk"
    tail: str = "bucket"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse bad settings, also those set by overrides after construction (`forward_step` runs this first)."""
        if self.rkl_estimator not in ESTIMATORS:
            raise ValueError(f"dataset.rkl_estimator must be one of {', '.join(ESTIMATORS)}, "
                             f"got {self.rkl_estimator!r}")
        if self.tail not in TAILS:
            raise ValueError(f"dataset.tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if not self.temperature > 0:
            raise ValueError(f"dataset.temperature must be > 0, got {self.temperature!r}")

    @property
    def fkl(self) -> bool:
        return parse_stage(self.stage) is Stage.FKL

    def _student_vocab(self) -> int:
        """The student checkpoint's vocabulary rows: the range of ids its logits cover."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.student).vocab_size

    def reference_collate(self, problems: list, builder: BatchBuilder):
        from nemo_paced.teacher.cache import CachedReferenceBatches, TeacherCache
        from nemo_paced.teacher.engines import tokenizer_fingerprint

        if not self.teacher_cache:
            raise ValueError("the fkl stage without the teacher in the job reads the teacher's top-k cache: set "
                             "dataset.teacher_cache (nemo-paced train --teacher-cache DIR; make it with "
                             "nemo-paced teacher-cache)")
        vocab = self._student_vocab()
        cache = TeacherCache(self.teacher_cache, tokenizer_fingerprint=tokenizer_fingerprint(builder.tokenizer),
                             vocab_size=vocab)
        return CachedReferenceBatches(super().reference_collate(problems, builder), cache, vocab)

    def served_teacher(self, builder: BatchBuilder):
        from nemo_paced.teacher.served import ServedTeacher

        if not self.teacher_service:
            raise ValueError("the rkl stage without the teacher in the job scores the student's samples at the "
                             "teacher service: set dataset.teacher_service (nemo-paced train --teacher-service "
                             "ADDR; start it with nemo-paced serve-teacher)")
        return ServedTeacher.connect(self.teacher_service, builder.tokenizer, self._student_vocab(),
                                     k=self.teacher_k, estimator=self.rkl_estimator)

    def forward_step(self) -> TopKTeacherStep:
        self.check()
        sampled = not self.fkl and self.rkl_estimator == "sampled"
        return TopKTeacherStep(direction="forward" if self.fkl else "reverse",
                               estimator="sampled" if sampled else "topk", temperature=self.temperature,
                               tail=self.tail)
