"""Single-machine PACED distillation with Hugging Face models: the embedded default for one machine.

It drives the same pieces as the Megatron path: pass rates from the rollout service (over HTTP),
the `PacedSampler`, the Paced KL (`vocab_parallel_kl` + `paced_reduce`, normalised over the
batch), teacher references for stage 1 and the student's own samples for stage 2, on the
`TwoStageSchedule`. A step trains on `batch_size` drawn sequences, or, with `tokens_per_step`, on
the leading drawn sequences that hold that many response tokens, so runs that favour short or
long problems can be compared at equal token budgets. The student's weights are pushed to the
service whenever pass rates are re-estimated, on-policy samples are drawn, or the student is
evaluated, so the service always samples from the model being trained.

Pass-rate evidence: the run starts from a saved table (`passrates`) and afterwards takes only the
evidence the service produced during this run (records newer than the service's table version at
the start), so one service can serve several runs in turn.

With `stage` set, the run trains only that stage's steps of the schedule (`total_steps` counts both
stages, `fkl_fraction` splits them), so a chain of two runs shares one schedule. The stage is recorded
in checkpoints and results, and a checkpoint of another stage in `out_dir` is refused.

Checkpoints (`out_dir/checkpoint.pt`, written atomically every `checkpoint_every` steps and on
SIGTERM / SIGUSR1) hold the student, optimizer, schedule position, sampler state, pass-rate table
and history; `train` resumes from one when it exists. A signal ends the run at the next step
boundary with status "preempted" (SLURM sends SIGTERM, or SIGUSR1 with `--signal`, before the end).
A stage whose problems all have weight 0 ends early; the skipped steps are recorded in the history.
"""

from __future__ import annotations

import collections
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_paced.atomic import atomic_open, atomic_write_json
from nemo_paced.localpaths import require_dir, require_file
from nemo_paced.progress import Progress
from nemo_paced.schedule import StageName, TwoStageSchedule
from nemo_paced.self_teacher import SelfTeacherConfig, parse_teacher
from nemo_paced.weighting import WeightConfig, effective_sample_size, extreme_fraction, normalise

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


@dataclass(frozen=True)
class LocalTrainConfig:
    """One distillation run. Problems whose `meta.split` is "test" are evaluation benchmarks, grouped
    by `meta.benchmark`; every other problem is in the training pool."""

    student: str  # starting student (Hugging Face directory)
    teacher: str  # a Hugging Face directory, or self[:current|:initial] for self-distillation (reverse KL only)
    problems: str  # problem file: the training pool and the evaluation benchmarks
    references: str | None  # teacher references (`nemo-paced make-references`): forward-KL steps only
    passrates: str | None  # pass-rate table of the starting student on the pool; None: the service's table
    rollout: str  # rollout service URL or address file; it must serve the same problem file
    out_dir: str
    schedule: TwoStageSchedule = field(default_factory=lambda: TwoStageSchedule(total_steps=200))
    weighting: WeightConfig = field(default_factory=WeightConfig)
    batch_size: int = 64  # sequences drawn per step; with tokens_per_step, the most a step may use
    tokens_per_step: int = 0  # > 0: each step trains on the drawn sequences' first ~N response tokens
    lr: float = 1e-3
    warmup_steps: int = 10
    grad_clip: float = 1.0
    kl_temperature: float = 1.0
    seq_length: int = 64
    template: str = "raw"
    rkl_sync_every: int = 1  # push the student to the service every N reverse-KL steps
    eval_every: int = 0  # evaluate every N steps (0: only before and after)
    eval_samples: int = 8
    checkpoint_every: int = 50
    final_estimate: bool = True  # re-estimate pool pass rates after training (the "after" histogram)
    seed: int = 0
    progress: bool = True  # a bar on a terminal, else a log line every `progress_every` seconds
    progress_every: float = 30.0
    stage: StageName | None = None  # train only this stage's steps of the schedule (None: both)
    self_teacher: SelfTeacherConfig = field(default_factory=SelfTeacherConfig)  # with teacher="self[:weights]"
    # A frontier teacher outside the job (nemo_paced.teacher): forward KL from its top-k cache, reverse KL
    # on the student's samples scored by the teacher service; the teacher model is then never loaded.
    teacher_cache: str | None = None  # cache directory (nemo-paced teacher-cache): the forward-KL steps
    teacher_service: str | None = None  # teacher service URL or address file: the reverse-KL steps
    teacher_k: int = 64  # top-k the teacher service returns per token
    topk_tail: str = "bucket"  # topk_kl's tail: bucket (k+1 outcomes, exact KL on them) or renormalize
    # reverse KL against the service: "topk", the bucket reverse KL over the teacher's top-k (deterministic given
    # the samples, the default), or "sampled", the per-token estimator log q(y) - log p(y) on the sampled tokens
    # (unbiased for the full-vocabulary reverse KL's gradient, noisier; needs only the sampled token's log-prob)
    rkl_estimator: str = "topk"

    def __post_init__(self) -> None:
        if self.stage not in (None, "fkl", "rkl"):
            raise ValueError(f"stage must be fkl, rkl or null (both), got {self.stage!r}")
        if self.stage == "fkl" and self.schedule.switch_step == 0:
            raise ValueError("stage fkl has no steps: schedule.fkl_fraction is 0")
        if self.stage == "rkl" and not self.schedule.has_rkl:
            raise ValueError("stage rkl has no steps: schedule.fkl_fraction is 1")
        for name in ("batch_size", "seq_length", "rkl_sync_every", "eval_samples", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "kl_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eval_every", "warmup_steps", "tokens_per_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.topk_tail not in ("bucket", "renormalize"):
            raise ValueError(f"topk_tail must be bucket or renormalize, got {self.topk_tail!r}")
        if self.rkl_estimator not in ("topk", "sampled"):
            raise ValueError(f"rkl_estimator must be topk or sampled, got {self.rkl_estimator!r}")
        if self.teacher_k < 1:
            raise ValueError(f"teacher_k must be >= 1, got {self.teacher_k}")
        if self.self_teacher_weights is not None and (
                self.stage == "fkl" or (self.stage is None and self.schedule.switch_step > 0)):
            raise ValueError(f"teacher {self.teacher!r}: self-distillation trains reverse KL on the student's own "
                             "samples only; train stage rkl, or set schedule.fkl_fraction=0")

    @property
    def self_teacher_weights(self) -> str | None:
        """current / initial when the teacher is the student itself (teacher="self[:weights]"), else None."""
        return parse_teacher(self.teacher, default=self.self_teacher.weights)

    @property
    def loads_teacher_model(self) -> bool:
        """Whether a step of this run needs the teacher's weights in the job (no cache or service covers it)."""
        if self.self_teacher_weights is not None:
            return False
        first, end = stage_steps(self)
        fkl = first < min(end, self.schedule.switch_step)
        rkl = max(first, self.schedule.switch_step) < end
        return (fkl and self.teacher_cache is None) or (rkl and self.teacher_service is None)


class RunMismatch(ValueError):
    """`out_dir` holds another stage's checkpoint, or the run lacks a file its steps need."""


def train(config: LocalTrainConfig) -> dict[str, Any]:
    """Run (or resume) the distillation; returns the result also written to `out_dir/result.json`."""
    return _Run(config).run()


def stage_steps(config: LocalTrainConfig) -> tuple[int, int]:
    """[first, end) of the schedule's steps this run trains."""
    schedule = config.schedule
    first = schedule.switch_step if config.stage == "rkl" else 0
    end = schedule.switch_step if config.stage == "fkl" else schedule.total_steps
    return first, end


def stage_label(config: LocalTrainConfig) -> str:
    if config.stage is not None:
        return config.stage
    return "+".join(name for name, present in (("fkl", config.schedule.switch_step > 0),
                                                ("rkl", config.schedule.has_rkl)) if present)


def check_inputs(config: LocalTrainConfig) -> None:
    """Every file and directory the run reads, before any model loads: a missing one is named (and a
    mistyped model directory is never mistaken for a Hugging Face Hub name)."""
    c = config
    require_file(c.problems, "problems")
    first, end = stage_steps(c)
    if c.references is not None:
        require_file(c.references, "references")
    elif first < min(end, c.schedule.switch_step):
        raise RunMismatch("the forward-KL steps train on teacher references: give references "
                          "(nemo-paced make-references, then train --references FILE)")
    if c.passrates is not None:
        require_file(c.passrates, "pass-rate table", " (leave it unset to start from the rollout service's table)")
    if not c.rollout.startswith(("http://", "https://")):
        require_file(c.rollout, "rollout service address file", " (start nemo-paced serve-rollouts --address-file "
                                                                "FILE first, or give its URL)")
    hint = (" (stage rkl starts from stage fkl's final student: train --stage fkl first, or give --init DIR)"
            if c.stage == "rkl" else "")
    require_dir(c.student, "student", hint)
    if c.loads_teacher_model:
        require_dir(c.teacher, "teacher")
    if c.teacher_cache is not None:
        require_dir(c.teacher_cache, "teacher cache", " (make it with nemo-paced teacher-cache)")
    if c.teacher_service is not None and not c.teacher_service.startswith(("http://", "https://")):
        require_file(c.teacher_service, "teacher service address file", " (start nemo-paced serve-teacher "
                                                                         "--address-file FILE first, or give its URL)")


class _Run:
    def __init__(self, config: LocalTrainConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nemo_paced.batches import BatchBuilder
        from nemo_paced.passrates import PassRateTable
        from nemo_paced.problems import load_problems
        from nemo_paced.references import ReferenceBatches, load_references
        from nemo_paced.rollout.client import RolloutClient

        self.config = c = config
        check_inputs(c)
        self.first_step, self.end_step = stage_steps(c)
        self.stage = stage_label(c)
        self.out = Path(c.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        problems = load_problems(c.problems)
        self.pool = [p for p in problems if p.meta.get("split") != "test"]
        self.pool_ids = [p.id for p in self.pool]
        self.benchmarks: dict[str, list[str]] = collections.defaultdict(list)
        for p in problems:
            if p.meta.get("split") == "test":
                self.benchmarks[str(p.meta.get("benchmark", "test"))].append(p.id)
        if not self.benchmarks:
            log.warning("%s has no problem with meta.split = \"test\": the run reports no accuracy "
                        "(add test problems, e.g. the demo's problems.jsonl, to evaluate)", c.problems)
        self.tokenizer = AutoTokenizer.from_pretrained(c.student)
        self.student = AutoModelForCausalLM.from_pretrained(c.student, dtype=torch.float32)
        self.vocab_size = int(self.student.get_output_embeddings().weight.shape[0])
        self.self_teacher = None
        if c.self_teacher_weights is None:
            self.teacher = (AutoModelForCausalLM.from_pretrained(c.teacher, dtype=torch.float32).eval()
                            .requires_grad_(False) if c.loads_teacher_model else None)
        elif c.self_teacher_weights == "initial":  # a frozen copy of the starting student
            self.teacher = AutoModelForCausalLM.from_pretrained(c.student, dtype=torch.float32).eval().requires_grad_(False)
        else:  # current: the student itself, under no_grad
            self.teacher = None
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=c.lr, weight_decay=0.0)
        total = self.end_step - self.first_step
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / max(
            1, c.warmup_steps)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
        self.builder = BatchBuilder(self.tokenizer, c.seq_length)
        pool_set = set(self.pool_ids)
        self.train_ids = self.pool_ids
        if c.self_teacher_weights is None:
            loaded = load_references(c.references) if c.references is not None else {}
            references = {i: r for i, r in loaded.items() if i in pool_set}
            self.references = ReferenceBatches(self.pool, references, self.builder, c.template)
            if c.teacher_cache is not None:
                from nemo_paced.teacher.cache import CachedReferenceBatches, TeacherCache
                from nemo_paced.teacher.engines import tokenizer_fingerprint

                cache = TeacherCache(c.teacher_cache, tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
                                     vocab_size=self.vocab_size)
                self.references = CachedReferenceBatches(self.references, cache, self.vocab_size)
        else:
            from nemo_paced.problems import render_prompt
            from nemo_paced.self_teacher import SelfTeacher

            self.self_teacher = SelfTeacher(self.pool, self.builder,
                                            lambda p: render_prompt(p, c.template, self.tokenizer), c.self_teacher)
            self.train_ids = self.self_teacher.problem_ids
        self.client = RolloutClient.connect(c.rollout)
        self.served_teacher = None
        if c.teacher_service is not None:
            from nemo_paced.teacher.served import ServedTeacher, ServedTeacherMismatch

            try:
                self.served_teacher = ServedTeacher.connect(c.teacher_service, self.tokenizer, self.vocab_size,
                                                            k=c.teacher_k, estimator=c.rkl_estimator)
            except ServedTeacherMismatch as error:
                raise RunMismatch(str(error)) from None
        if c.passrates is not None:
            self.table = PassRateTable.load(c.passrates)
            self.seen_version = self.client.health()["table_version"]
        else:  # the service's table as it stands is the starting estimate
            self.seen_version, records = self.client.table_since(0)
            self.table = PassRateTable()
            self.table.merge(records, self.seen_version)
        self.step = self.first_step
        self.history: dict[str, Any] = {"steps": [], "evals": [], "passrates": [], "stopped": [], "pushes": 0}
        self.draws: collections.Counter[str] = collections.Counter()
        self.sampler = None
        self.sampler_stage: StageName | None = None
        self._pushed: int | None = None
        self._signal: int | None = None
        self._resume()

    # --- main loop ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from nemo_paced.sampler import AllWeightsZero

        c = self.config
        schedule = c.schedule
        restore = self._install_signal_handlers()
        try:
            if self.step == self.first_step and not self.history["evals"]:
                self._record_passrates("start")
                self._evaluate()
            bar = Progress(self.end_step - self.first_step, f"stage {self.stage}", initial=self.step - self.first_step,
                           enabled=c.progress, every=c.progress_every)
            while self.step < self.end_step:
                if self._signal is not None:
                    self._save_checkpoint()
                    bar.close()
                    log.warning("signal %d: checkpoint saved at step %d, stopping", self._signal, self.step)
                    return self._finish("preempted")
                if self.step > self.first_step and schedule.reestimate_before(self.step):
                    self._reestimate()
                stage = schedule.stage(self.step)
                try:
                    metrics = self._train_step(stage)
                except AllWeightsZero as e:  # nothing left to train on in this stage: skip to its end
                    end = min(self.end_step, schedule.switch_step if stage == "fkl" else schedule.total_steps)
                    log.warning("step %d: %s; skipping to step %d", self.step, e, end)
                    self.history["stopped"].append({"step": self.step, "stage": stage, "skipped": end - self.step,
                                                    "reason": str(e)})
                    bar.update(end - self.step)
                    self.step = end
                    continue
                self.step += 1
                bar.update(1, **({"stage": stage} if "+" in self.stage else {}), loss=f"{metrics['loss']:.4f}",
                           kept=metrics["kept"])
                if c.eval_every and self.step % c.eval_every == 0 and self.step < self.end_step:
                    self._evaluate()
                if self.step % c.checkpoint_every == 0 or self.step == self.end_step:
                    self._save_checkpoint()
            bar.close()
            self._evaluate()
            if c.final_estimate:
                self._reestimate(label="end")
            self.student.save_pretrained(self.out / "final")
            self.tokenizer.save_pretrained(self.out / "final")
            return self._finish("done")
        finally:
            restore()

    def _train_step(self, stage: StageName) -> dict[str, Any]:
        from nemo_paced.loss import paced_reduce, vocab_parallel_kl

        batch = self._next_batch(stage)
        self.student.train()
        tokens, positions = batch["tokens"], batch["position_ids"]
        student_logits = self.student(input_ids=tokens, position_ids=positions).logits
        direction = "forward" if stage == "fkl" else "reverse"
        if "teacher_ids" in batch:  # the teacher is outside the job: its top-k from the cache or the service
            per_token = self._sparse_kl(student_logits, batch, direction)
        else:
            with torch.no_grad():
                if self.self_teacher is None:
                    teacher_logits = self.teacher(input_ids=tokens, position_ids=positions).logits
                else:  # the student (or its initial copy) on the privileged prompt, aligned on the response tokens
                    from nemo_paced.self_teacher import gather_aligned

                    scorer = self.teacher if self.teacher is not None else self.student
                    scorer.eval()  # no dropout in the teacher pass
                    teacher_logits = gather_aligned(scorer(input_ids=batch["teacher_tokens"],
                                                           position_ids=batch["teacher_position_ids"]).logits,
                                                    batch["teacher_index"])
                    self.student.train()
            per_token = vocab_parallel_kl(student_logits, teacher_logits, direction=direction,
                                          temperature=self.config.kl_temperature)
        weighted_sum, weight_sum = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
        loss = normalise(weighted_sum, weight_sum, len(batch["problem_ids"]))  # sum w*l / sum w
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.draws.update(batch["problem_ids"])
        kept = int((batch["sample_weight"] > 0).sum())
        metrics = {"step": self.step, "stage": stage, "loss": loss.item(), "weight_sum": weight_sum.item(),
                   "kept": kept, "tokens": int(batch["loss_mask"][batch["sample_weight"] > 0].sum()),
                   "table_version": self.table.version}
        self.history["steps"].append(metrics)
        return metrics

    def _sparse_kl(self, student_logits: torch.Tensor, batch: dict[str, Any], direction: str) -> torch.Tensor:
        """Per-token divergence against a teacher known only by its top-k (and sampled-token) log-probs."""
        from nemo_paced.loss import topk_kl

        c = self.config
        if direction == "reverse" and c.rkl_estimator == "sampled":
            from nemo_paced.loss import sampled_reverse_kl

            return sampled_reverse_kl(student_logits, batch["labels"], batch["teacher_token_logprobs"],
                                      temperature=c.kl_temperature)
        return topk_kl(student_logits, batch["teacher_ids"], batch["teacher_logprobs"], direction=direction,
                       temperature=c.kl_temperature, tail=c.topk_tail)

    # --- data -----------------------------------------------------------------------------------

    def _next_batch(self, stage: StageName) -> dict[str, Any]:
        from nemo_paced.batches import leading_rows_for_tokens

        c = self.config
        if self.sampler_stage != stage:
            self._make_sampler(stage)
        batch = next(self.sampler) if stage == "fkl" else self._on_policy_batch(next(self.sampler))
        return leading_rows_for_tokens(batch, c.tokens_per_step) if c.tokens_per_step else batch

    def _on_policy_batch(self, draw) -> dict[str, Any]:
        """The student's own samples for the drawn problems, from the service, as a micro-batch."""
        from nemo_paced.batches import Pair

        c = self.config
        if (self.step - c.schedule.switch_step) % c.rkl_sync_every == 0:
            self._push()
        rollouts = self.client.sample(draw.problem_ids, n=1, seed=c.seed * 1_000_003 + self.step, fold=True)
        pairs = [Pair(r.problem_id, r.prompt_token_ids, r.samples[0].token_ids, float(w))
                 for r, w in zip(rollouts.problems, draw.weights)]
        self._pull()  # on-policy scores fold into pass rates once K per problem have arrived
        batch = self.builder.micro_batch(pairs)
        if self.served_teacher is not None:  # the teacher service's top-k (or sampled-token) rows
            scored = self.served_teacher.score([(p.prompt_ids, p.response_ids) for p in pairs])
            return self.served_teacher.attach(batch, [len(p.prompt_ids) for p in pairs], scored)
        return batch if self.self_teacher is None else self.self_teacher.add_teacher_rows(batch, pairs)

    # --- the rollout service ----------------------------------------------------------------------

    def _push(self) -> None:
        """Make the service sample from the current student."""
        if self._pushed == self.step:
            return
        directory = self.out / "weights" / f"step-{self.step}"
        self.student.save_pretrained(directory)
        self.client.load_weights(directory.resolve(), step=self.step)
        for old in (self.out / "weights").iterdir():
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
        self._pushed = self.step
        self.history["pushes"] += 1

    def _pull(self) -> None:
        """Adopt the evidence the service produced since this run last looked (only this run's)."""
        version, records = self.client.table_since(self.seen_version)
        pool = set(self.pool_ids)
        mine = [r for r in records if r.problem_id in pool]
        if mine:
            self.table.merge(mine, max(version, self.table.version + 1))
        self.seen_version = version

    def _reestimate(self, label: str | None = None) -> None:
        self._push()
        started = time.perf_counter()
        job = self.client.estimate(self.pool_ids)
        progress = Progress(len(self.pool_ids), f"pass rates ({label or 'refresh'} at step {self.step})",
                            unit="problem", enabled=self.config.progress, every=self.config.progress_every)
        self.client.wait(job, poll=0.1, progress=lambda status: progress.set(status["done"]))
        progress.close()
        self._pull()
        self._record_passrates(label or "refresh", seconds=time.perf_counter() - started)

    def _record_passrates(self, label: str, seconds: float = 0.0) -> None:
        from nemo_paced.weighting import pass_rate_histogram

        successes, trials, known = self.table.counts(self.pool_ids)
        rates = successes[known] / trials[known]
        at_zero, at_one = extreme_fraction(successes[known], trials[known])
        weights = self.table.weights(self.pool_ids, self.config.weighting)
        k = int(round(float(np.median(trials[known])))) if known.any() else 8
        self.history["passrates"].append({
            "step": self.step, "label": label, "seconds": seconds, "estimated": int(known.sum()),
            "at_zero": at_zero, "at_one": at_one, "mean": float(rates.mean()) if rates.size else None,
            "histogram": pass_rate_histogram(rates, k).tolist(), "k": k,
            "kept": int((weights > 0).sum()), "ess": effective_sample_size(weights),
            "by_level": _by_level(self.pool, rates, known)})
        if not known.any():
            log.warning("no pool problem has a pass rate yet (%s at step %d): every weight is 0", label, self.step)
        elif at_zero + at_one >= 1.0:
            log.warning("every pass rate is 0 or 1 (%s at step %d: %.0f%% at 0, %.0f%% at 1): w(p) = 0 for "
                        "every problem, so nothing trains; all zeros usually mean the service's --template, "
                        "--verifier or --max-tokens do not fit the model", label, self.step, 100 * at_zero,
                        100 * at_one)

    def _evaluate(self) -> None:
        """Mean accuracy over `eval_samples` samples per problem, per benchmark, in percent."""
        self._push()
        accuracy = {}
        for name, ids in sorted(self.benchmarks.items()):
            correct = trials = 0
            for start in range(0, len(ids), 256):
                batch = self.client.sample(ids[start:start + 256], n=self.config.eval_samples,
                                           seed=self.config.seed * 7919 + self.step + start, fold=False)
                correct += sum(r.successes for r in batch.problems)
                trials += sum(r.trials for r in batch.problems)
            accuracy[name] = 100.0 * correct / max(trials, 1)
        self.history["evals"].append({"step": self.step, "accuracy": accuracy})

    # --- checkpoints and signals ----------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        state = {"stage": self.stage, "steps": [self.first_step, self.end_step],
                 "step": self.step, "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(), "sampler_stage": self.sampler_stage,
                 "sampler": None if self.sampler is None else self.sampler.state_dict(),
                 "table": {"version": self.table.version, "records": self.table.to_rows()},
                 "seen_version": self.seen_version, "history": self.history, "draws": dict(self.draws)}
        with atomic_open(self.out / CHECKPOINT, "wb") as f:
            torch.save(state, f)

    def _resume(self) -> None:
        from nemo_paced.passrates import PassRateTable

        path = self.out / CHECKPOINT
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state.get("stage"), state.get("steps")
        if saved != (self.stage, [self.first_step, self.end_step]):
            raise RunMismatch(
                f"{path} is stage {saved[0] or 'unknown'} (steps {saved[1] or '?'}), stopped at step {state['step']}; "
                f"this run is stage {self.stage} (steps {[self.first_step, self.end_step]}): give this stage its "
                f"own --out, or delete the checkpoint to start over")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step, self.seen_version = state["step"], state["seen_version"]
        self.history, self.draws = state["history"], collections.Counter(state["draws"])
        self.table = PassRateTable()
        self.table.merge([PassRateTable.record_from_row(r) for r in state["table"]["records"]],
                         state["table"]["version"])
        if state["sampler_stage"] is not None:
            self._make_sampler(state["sampler_stage"])
            self.sampler.load_state_dict(state["sampler"])
        log.info("resumed from step %d of stage %s (%s; steps %d-%d)", self.step, self.stage, path,
                 self.first_step, self.end_step)

    def _make_sampler(self, stage: StageName) -> None:
        """Stage 1 draws among problems with a teacher reference (collated into reference batches);
        stage 2 draws from the whole pool and asks the service for the samples."""
        from nemo_paced.sampler import PacedSampler, SamplerConfig

        c = self.config
        first = 0 if stage == "fkl" else c.schedule.switch_step
        ids = self.references.problem_ids if stage == "fkl" else self.train_ids
        self.sampler = PacedSampler(ids, SamplerConfig(global_batch_size=c.batch_size, micro_batch_size=c.batch_size,
                                                       weighting=c.weighting, seed=c.seed, first_step=first),
                                    lambda: self.table, collate=self.references if stage == "fkl" else None)
        self.sampler_stage = stage

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        def handler(signum, frame):
            self._signal = signum
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    # --- result ---------------------------------------------------------------------------------

    def _finish(self, status: str) -> dict[str, Any]:
        drawn = np.array(list(self.draws.values()), dtype=np.float64)
        steps = self.history["steps"]
        result = {"status": status, "stage": self.stage, "stage_steps": [self.first_step, self.end_step],
                  "step": self.step, "signal": self._signal,
                  "config": jsonable(asdict(self.config)),
                  "history": self.history,
                  "draws": {"distinct": int(drawn.size), "total": int(drawn.sum()),
                            "per_drawn_problem": float(drawn.mean()) if drawn.size else 0.0,
                            "max": int(drawn.max()) if drawn.size else 0, "pool": len(self.pool_ids)},
                  "tokens": int(sum(s["tokens"] for s in steps)),
                  "sequences": int(sum(s["kept"] for s in steps))}
        atomic_write_json(self.out / RESULT, result)
        self._summary(result)
        return result

    def _summary(self, result: dict[str, Any]) -> None:
        """The closing lines on the terminal: where the student is and how it did."""
        if result["status"] != "done":
            log.info("stage %s stopped at step %d of %d-%d; checkpoint %s: run the same command to resume",
                     self.stage, self.step, self.first_step, self.end_step, self.out / CHECKPOINT)
            return
        evals = self.history["evals"]
        accuracy = ", ".join(f"{name} {value:.1f}%" for name, value in evals[-1]["accuracy"].items()) \
            if evals and evals[-1]["accuracy"] else "not evaluated (no test problems)"
        before = ", ".join(f"{name} {value:.1f}%" for name, value in evals[0]["accuracy"].items()) \
            if len(evals) > 1 and evals[0]["accuracy"] else ""
        log.info("stage %s done: %d steps trained (steps %d-%d), final student %s", self.stage,
                 len(self.history["steps"]), self.first_step, self.end_step, self.out / "final")
        log.info("accuracy: %s%s; result %s", accuracy, f" (before: {before})" if before else "", self.out / RESULT)


def _by_level(pool, rates: np.ndarray, known: np.ndarray) -> dict[str, float]:
    levels = np.array([p.meta.get("level", 0) for p in pool])[known]
    return {str(level): float(rates[levels == level].mean()) for level in sorted(set(levels.tolist()))}


def jsonable(value: Any) -> Any:
    """Config values as plain JSON: enums by value, tuples as lists, keys as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value.value if hasattr(value, "value") else value
