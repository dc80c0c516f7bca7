"""The demo's self-distillation comparison: PACED vs unweighted vs hard filter, reverse KL on own samples.

The paper's self-distillation starts from an instruction-tuned model, one that can already use a
reference solution placed in its prompt. The demo's analogue is the demo's student architecture and
curriculum pretrained with a share (`hint_fraction`) of its sequences showing the answer first
(`{answer}={question}`, the chain task's self-teacher template): with the answer in front it copies,
without it it must compute. The self-teacher is that model with the answer in its prompt; the
student is the same model on the bare question, trained with reverse KL on its own samples.

Methods (reverse KL only; the self-teacher is the frozen starting student with the answer in its
prompt, `teacher_weights="initial"`: with the current weights the demo's tiny student collapsed, its
loss falling to 0 as its outputs stopped depending on the prompt and every pass rate reaching 0 within
30 steps, a fixed point a moving self-teacher allows and a frozen one does not):
  self_paced     PACED weights w = p(1-p) on the loss
  self_uniform   unweighted reverse KL
  self_filter    hard filter 0.2 < p < 0.8
Every method starts from the same student, trains on the same response tokens per step (the main
demo's budget), with the same seeds, and is evaluated like the main demo's methods; the weighted ones
refresh pass rates every `refresh_every` steps (from the on-policy samples' scores too), while the
unweighted one, like the main demo's, neither refreshes nor is charged for the starting estimate.
Runs have the shape of `experiment.run_method`'s, so `report.method_summary` and `report.paired_rows`
apply to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from nemo_paced.atomic import atomic_write_json
from nemo_paced.demo.experiment import DemoConfig, Setting, evaluate, prepare, start_setting
from nemo_paced.problems import Problem
from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.self_teacher import SelfTeacherConfig
from nemo_paced.tasks import ChainTask
from nemo_paced.tiny_models import build_model, cache_key, pretrain
from nemo_paced.weighting import WeightConfig, WeightMode

SELF_METHODS = ("self_paced", "self_uniform", "self_filter")
SELF_COMPARISONS = (("self_paced", "self_uniform"), ("self_paced", "self_filter"))
CHAIN_TEMPLATE = "{context}={question}"


@dataclass(frozen=True)
class SelfDistillationConfig:
    hint_fraction: float = 0.5  # pretraining sequences that show the answer before the question
    teacher_weights: str = "initial"  # or "current" (see the module docstring)
    methods: tuple[str, ...] = SELF_METHODS

    def __post_init__(self) -> None:
        if not 0 < self.hint_fraction < 1:
            raise ValueError(f"hint_fraction must lie strictly between 0 and 1, got {self.hint_fraction}")
        unknown = set(self.methods) - set(SELF_METHODS)
        if unknown:
            raise ValueError(f"unknown self-distillation methods {sorted(unknown)}; choose from {', '.join(SELF_METHODS)}")

    @property
    def self_teacher(self) -> SelfTeacherConfig:
        return SelfTeacherConfig(weights=self.teacher_weights, template=CHAIN_TEMPLATE, context=("answer",))


def self_method_weighting(method: str) -> WeightConfig:
    if method == "self_paced":
        return WeightConfig(mode="loss")
    if method == "self_uniform":
        return WeightConfig(mode="uniform")
    if method == "self_filter":
        return WeightConfig(mode="filter", band=(0.2, 0.8))
    raise ValueError(f"unknown self-distillation method {method!r}; choose from {', '.join(SELF_METHODS)}")


def self_method_schedule(method: str, config: DemoConfig) -> TwoStageSchedule:
    """Reverse KL for every step; pass rates refreshed every `refresh_every` steps only for the methods
    that weight by them (unweighted self-distillation would pay for estimates it never reads)."""
    refresh = 0 if self_method_weighting(method).mode is WeightMode.UNIFORM else config.refresh_every
    return TwoStageSchedule(config.steps, 0.0, refresh_every=refresh)


class _HintedTask:
    """The task's pretraining mixture with a share of prompts rewritten by the self-teacher template."""

    def __init__(self, task: ChainTask, fraction: float, teacher: SelfTeacherConfig) -> None:
        self.task, self.fraction, self.teacher = task, fraction, teacher

    def mixture(self, count: int, level_weights: dict[int, float], rng: random.Random) -> list[Problem]:
        from nemo_paced.self_teacher import teacher_problem

        return [teacher_problem(p, self.teacher) if rng.random() < self.fraction else p
                for p in self.task.mixture(count, level_weights, rng)]


def instruction_tuned_student(config: DemoConfig, self_config: SelfDistillationConfig, cache: Path) -> Path:
    """The demo's student, pretrained with privileged-context sequences mixed in; cached by content."""
    key = hashlib.sha256(json.dumps({"base": cache_key(config.task, config.student, config.student_pretrain),
                                     "hint_fraction": self_config.hint_fraction, "template": CHAIN_TEMPLATE},
                                    sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache) / f"self-student-{key}"
    if (final / "pretrain.json").is_file():
        return final
    model, tokenizer = build_model(config.task, config.student, seed=config.student_pretrain.seed)
    loss = pretrain(model, tokenizer, _HintedTask(config.task, self_config.hint_fraction, self_config.self_teacher),
                    config.student_pretrain)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "pretrain.json", {"hint_fraction": self_config.hint_fraction,
                                                      "template": CHAIN_TEMPLATE, "final_loss": loss})
        if final.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def run_self_method(setting: Setting, self_config: SelfDistillationConfig, method: str, seed: int, out: Path,
                    progress: bool = True) -> dict[str, Any]:
    """One self-distillation run on its own fresh service, evaluated like `experiment.run_method`."""
    from nemo_paced.demo.compute import run_compute
    from nemo_paced.demo.service import Usage, loopback_service
    from nemo_paced.train.local import LocalTrainConfig, train

    config, prepared = setting.config, setting.prepared
    name = f"{method}-seed{seed}"
    run_dir = out / "runs" / name
    usage = Usage()
    started = time.perf_counter()
    with loopback_service(prepared.student, setting.problems, out / "service" / name, k=config.k,
                          max_tokens=prepared.max_tokens, usage=usage) as url:
        result = train(LocalTrainConfig(
            student=prepared.student, teacher="self", problems=prepared.problems, references=None,
            passrates=str(setting.passrates), rollout=url, out_dir=str(run_dir), batch_size=2 * config.batch_size,
            tokens_per_step=setting.tokens_per_step, lr=config.lr,
            seq_length=config.task.prompt_width + prepared.max_tokens, eval_every=config.eval_every,
            eval_samples=config.eval_samples, rkl_sync_every=config.rkl_sync_every,
            checkpoint_every=max(config.steps // 2, 1), seed=seed, final_estimate=False, progress=progress,
            schedule=self_method_schedule(method, config),
            weighting=self_method_weighting(method), self_teacher=self_config.self_teacher))
        if result["status"] == "preempted":
            raise SystemExit(f"stopped by a signal during {method} seed {seed} (checkpoint in {run_dir})")
        final = evaluate(url, setting.tests, config, weights=run_dir / "final", step=config.steps)

    def compute(before: int) -> dict[str, Any]:
        estimation = usage.total("estimate", before_step=before)
        if method != "self_uniform":
            estimation = {k: v + setting.start_estimation[k] for k, v in estimation.items()}
        steps = [s for s in result["history"]["steps"] if s["step"] < before]
        return run_compute(steps, setting.prompt_tokens, estimation, usage.total("onpolicy", before_step=before),
                           setting.n_student, setting.n_student)  # the teacher pass is the student's model

    evals = result["history"]["evals"]
    curve = [compute(e["step"]) for e in evals]
    return {"result": result, "final": final, "compute": compute(config.steps),
            "curve": {"steps": [e["step"] for e in evals], "accuracy": [e["accuracy"] for e in evals],
                      "training_tokens": [c["training_tokens"] for c in curve],
                      "total_flops": [c["total_flops"] for c in curve]},
            "seconds": time.perf_counter() - started}


def run_self_distillation(config: DemoConfig, out: Path, cache: Path,
                          self_config: SelfDistillationConfig = SelfDistillationConfig(),
                          say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """The comparison: the instruction-tuned-like student, its starting pass rates and evaluation,
    then every method for every seed of `config.seeds`. Returns {"config", "student", "setting",
    "start": {table, evaluation, timings, references}, "runs": {method: {seed: run}}, "rows", "seconds"};
    `rows` holds one {method, seed, accuracy (per benchmark and mean), tokens, sequences} per run."""
    started = time.perf_counter()
    out = Path(out)
    for stale in ("runs", "service"):
        shutil.rmtree(out / stale, ignore_errors=True)
    prepared = prepare(config, out, cache, say)
    student = instruction_tuned_student(config, self_config, cache)
    shutil.copytree(student, out / "self_student", dirs_exist_ok=True)
    say(f"instruction-tuned-like student: {out / 'self_student'} (from {student})")
    setting, start = start_setting(config, out, prepared, say, student=str(out / "self_student"), label="self_start")
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in self_config.methods}
    rows = []
    for seed in config.seeds:
        for method in self_config.methods:
            runs[method][seed] = run = run_self_method(setting, self_config, method, seed, out, progress)
            rows.append({"method": method, "seed": seed, "accuracy": run["final"]["accuracy"],
                         "tokens": run["result"]["tokens"], "sequences": run["result"]["sequences"]})
            say(f"{method} seed {seed}: {run['seconds']:.0f} s, final mean over levels "
                f"{run['final']['accuracy']['mean']:.1f} (SE {run['final']['se']['mean']:.2f})")
    return {"config": asdict(self_config), "student": str(student), "setting": setting, "start": start,
            "runs": runs, "rows": rows, "seconds": time.perf_counter() - started}


def summary(comparison: dict[str, Any]) -> dict[str, Any]:
    """The report's self-distillation block: the start, each method over seeds, paired differences."""
    from nemo_paced.demo.report import method_summary, paired_rows, start_summary

    config = comparison["setting"].config
    start = start_summary(comparison["start"]["table"], comparison["start"]["evaluation"], config.k)
    methods = {m: method_summary(by_seed, start["accuracy"]) for m, by_seed in comparison["runs"].items() if by_seed}
    return {"student": comparison["student"], "settings": comparison["config"], "start": start, "methods": methods,
            "paired": paired_rows(methods, SELF_COMPARISONS), "seconds": comparison["seconds"]}



def format_summary(block: dict[str, Any]) -> str:
    """The terminal report: accuracy per benchmark (mean ± std over seeds), the paired differences,
    and each method's compute (tokens and FLOPs, against unweighted self-distillation)."""
    from nemo_paced.demo.compute import FORMULA
    from nemo_paced.demo.report import format_compute, format_paired

    start, methods = block["start"], block["methods"]
    benchmarks = list(start["accuracy"])
    head = f"{'method':<14}" + "".join(f"{b:>12}" for b in benchmarks)
    lines = [head, "-" * len(head), f"{'start':<14}" + "".join(f"{start['accuracy'][b]:>12.1f}" for b in benchmarks)]
    for name, m in methods.items():
        lines.append(f"{name:<14}" + "".join(f"{m['final'][b]['mean']:>6.1f} ± {m['final'][b]['std']:<3.1f}"
                                             for b in benchmarks))
    seeds = next(iter(methods.values()))["final"]["mean"]["n"]
    se = max(v["mean"] for m in methods.values() for v in m["eval_se"].values())
    lines += [f"accuracy (%); ± is the std over {seeds} seed(s); largest evaluation SE of a run's mean: {se:.2f}", "",
              format_paired(block["paired"]), "", f"compute per run (mean over seeds); {FORMULA}",
              *format_compute(methods, baseline="self_uniform")]
    return "\n".join(lines)
