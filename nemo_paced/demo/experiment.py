"""The demo experiment: PACED against the paper's baselines on the running-mean task, on one machine.

Steps: build the task splits and the tiny teacher and student (cached), start the rollout service
on loopback with the starting student, estimate pass rates over HTTP, build verified teacher
references, measure the gradient SNR per pass-rate bin, then train every method for every seed
from the same starting student under the same token budget with `nemo_paced.train.local`, and
evaluate each (mean accuracy over 8 samples per problem).

The budget: every step of every method trains on the same number of response tokens,
`batch_size` x the mean teacher-reference length over the pool (to within half a sequence), taking
the drawn sequences in order from a draw of up to 2 x `batch_size`. A method that favours short
problems trains on more sequences per step, not on fewer tokens.

Methods (all with pass rates re-estimated every `refresh_every` steps where they use them):
  paced       PACED weights w = p(1-p), forward KL then reverse KL (the paper's two-stage setting)
  paced_fkl   PACED weights, forward KL only
  uniform     unweighted forward KL
  filter      hard filter 0.2 < p < 0.8, forward KL
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from nemo_paced.atomic import atomic_write_json
from nemo_paced.problems import Problem, save_problems
from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.tasks import ChainTask, make_splits
from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig, cached_pretrained
from nemo_paced.weighting import WeightConfig

METHODS = ("paced", "paced_fkl", "uniform", "filter")


@dataclass(frozen=True)
class DemoConfig:
    task: ChainTask = field(default_factory=lambda: ChainTask(max_level=6))
    teacher: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(layers=3, hidden=64, heads=4))
    teacher_pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        steps=600, level_weights={level: 1.0 for level in range(1, 7)}, seed=1))
    student: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(layers=2, hidden=32, heads=2))
    student_pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        steps=500, level_weights={1: 0.35, 2: 0.3, 3: 0.2, 4: 0.1, 5: 0.04, 6: 0.01}, seed=2))
    pool_per_level: int = 400
    test_per_level: int = 40
    retained_size: int = 100
    steps: int = 120
    batch_size: int = 64  # sequences per step at the pool's mean reference length (sets the token budget)
    lr: float = 1e-3
    fkl_fraction: float = 0.5
    refresh_every: int = 30
    eval_every: int = 30
    rkl_sync_every: int = 5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = METHODS
    k: int = 8
    eval_samples: int = 8
    snr_per_bin: int = 32


QUICK = DemoConfig(
    task=ChainTask(max_level=4),
    teacher=TinyModelConfig(layers=2, hidden=64, heads=4),
    teacher_pretrain=PretrainConfig(steps=300, level_weights={level: 1.0 for level in range(1, 5)}, seed=1),
    student_pretrain=PretrainConfig(steps=200, level_weights={1: 0.5, 2: 0.3, 3: 0.2}, seed=2),
    pool_per_level=60, test_per_level=20, retained_size=40, steps=30, batch_size=32, refresh_every=15,
    eval_every=15, seeds=(0,), snr_per_bin=8)


def method_overrides(method: str, config: DemoConfig) -> dict[str, Any]:
    """The LocalTrainConfig settings that define a method (everything else is shared)."""
    refresh = config.refresh_every
    if method == "paced":
        return {"weighting": WeightConfig(mode="loss"),
                "schedule": TwoStageSchedule(config.steps, config.fkl_fraction, refresh_every=refresh)}
    if method == "paced_fkl":
        return {"weighting": WeightConfig(mode="loss"), "schedule": TwoStageSchedule(config.steps, 1.0,
                                                                                      refresh_every=refresh)}
    if method == "uniform":
        return {"weighting": WeightConfig(mode="uniform"), "schedule": TwoStageSchedule(config.steps, 1.0)}
    if method == "filter":
        return {"weighting": WeightConfig(mode="filter", band=(0.2, 0.8)),
                "schedule": TwoStageSchedule(config.steps, 1.0, refresh_every=refresh)}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass(frozen=True)
class Prepared:
    """What the SLURM chain (and the demo) start from."""

    teacher: str
    student: str
    problems: str  # pool (meta.split = train) and benchmarks (meta.split = test)
    pool: str  # the pool alone, for make-references and estimation jobs
    max_tokens: int


def prepare(config: DemoConfig, out: Path, cache: Path, say: Callable[[str], None] = print) -> Prepared:
    """Write the problem files and train (or reuse) the tiny teacher and student."""
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(config.task, config.pool_per_level, config.test_per_level, config.retained_size)
    pool = [_with_meta(p, split="train") for p in splits.pool]
    tests = [_with_meta(p, split="test", benchmark=f"L{level}") for level, ps in splits.test.items() for p in ps]
    tests += [_with_meta(p, split="test", benchmark="retained") for p in splits.retained]
    save_problems(out / "problems.jsonl", pool + tests)
    save_problems(out / "pool.jsonl", pool)
    for name, model, training in (("teacher", config.teacher, config.teacher_pretrain),
                                  ("student", config.student, config.student_pretrain)):
        started = time.perf_counter()
        cached = cached_pretrained(cache, name, config.task, model, training)
        shutil.copytree(cached, out / name, dirs_exist_ok=True)  # stable paths for recipes and the SLURM chain
        say(f"{name}: {out / name} (from {cached}, {time.perf_counter() - started:.0f} s)")
    prepared = Prepared(str(out / "teacher"), str(out / "student"), str(out / "problems.jsonl"),
                        str(out / "pool.jsonl"), config.task.answer_length(config.task.max_level) + 1)
    atomic_write_json(out / "prepared.json", asdict(prepared))
    return prepared


def run_demo(config: DemoConfig, out: Path, cache: Path, say: Callable[[str], None] = print,
             progress: bool = True) -> dict[str, Any]:
    """The whole experiment; returns the report (also written to out/report.json)."""
    from nemo_paced.demo.report import build_report
    from nemo_paced.demo.service import loopback_service
    from nemo_paced.demo.snr import gradient_snr_by_pass_rate
    from nemo_paced.passrates import PassRateTable
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceConfig, make_references
    from nemo_paced.rollout.client import RolloutClient
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.verifiers import resolve
    from nemo_paced.train.local import LocalTrainConfig, train

    started = time.perf_counter()
    timings: dict[str, float] = {}
    for stale in ("runs", "service"):  # a new experiment: never resume another one's runs or table
        shutil.rmtree(out / stale, ignore_errors=True)
    prepared = prepare(config, out, cache, say)
    timings["prepare"] = time.perf_counter() - started
    problems = load_problems(prepared.problems)
    pool = [p for p in problems if p.meta["split"] == "train"]

    mark = time.perf_counter()
    references = out / "references.jsonl"
    summary = make_references(HFEngine(prepared.teacher, device="cpu", batch_size=1024), pool, resolve("exact"),
                              references, ReferenceConfig(n=1, template="raw", temperature=0.0,
                                                          max_tokens=prepared.max_tokens, batch_problems=256))
    say(f"teacher references: {summary.report()}")
    timings["references"] = time.perf_counter() - mark
    tokens_per_step = token_budget_per_step(config, references)
    say(f"budget for every method: {config.steps} steps x {tokens_per_step} response tokens")

    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in config.methods}
    with loopback_service(prepared.student, problems, out / "service", k=config.k,
                          max_tokens=prepared.max_tokens) as url:
        say(f"rollout service on {url}")
        mark = time.perf_counter()
        with RolloutClient(url) as client:
            client.wait(client.estimate([p.id for p in pool]), poll=0.1)
            table = PassRateTable()
            version, records = client.table_since(0)
            table.merge(records, version)
        table.save(out / "passrates_start.jsonl")
        timings["estimate"] = time.perf_counter() - mark
        say(f"pass rates of the starting student: {len(table)} problems, K={config.k} "
            f"({timings['estimate']:.0f} s over HTTP)")

        mark = time.perf_counter()
        snr = gradient_snr_by_pass_rate(prepared.student, prepared.teacher, pool, table, references,
                                        per_bin=config.snr_per_bin, k=config.k)
        timings["snr"] = time.perf_counter() - mark

        mark = time.perf_counter()
        for seed in config.seeds:
            for method in config.methods:
                run_dir = out / "runs" / f"{method}-seed{seed}"
                train_config = LocalTrainConfig(
                    student=prepared.student, teacher=prepared.teacher, problems=prepared.problems,
                    references=str(references), passrates=str(out / "passrates_start.jsonl"), rollout=url,
                    out_dir=str(run_dir), batch_size=2 * config.batch_size, tokens_per_step=tokens_per_step,
                    lr=config.lr,
                    seq_length=config.task.prompt_width + prepared.max_tokens, eval_every=config.eval_every,
                    eval_samples=config.eval_samples, rkl_sync_every=config.rkl_sync_every,
                    checkpoint_every=max(config.steps // 2, 1), seed=seed,
                    progress=progress, **method_overrides(method, config))
                run_started = time.perf_counter()
                runs[method][seed] = train(train_config)
                if runs[method][seed]["status"] == "preempted":
                    raise SystemExit(f"stopped by a signal during {method} seed {seed} (checkpoint in {run_dir})")
                say(f"{method} seed {seed}: {time.perf_counter() - run_started:.0f} s, final "
                    f"{_summary(runs[method][seed])}")
        timings["training"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    report = build_report(config, table, snr, runs, timings, summary)
    atomic_write_json(out / "report.json", report)
    return report


def token_budget_per_step(config: DemoConfig, references: Path) -> int:
    """`batch_size` sequences of the pool's mean teacher-reference length, in response tokens."""
    from nemo_paced.references import load_references

    lengths = [len(refs[0].token_ids) for refs in load_references(references).values()]
    return max(1, round(config.batch_size * sum(lengths) / len(lengths)))


def _with_meta(problem: Problem, **meta: Any) -> Problem:
    return replace(problem, meta={**problem.meta, **meta})


def _summary(result: dict[str, Any]) -> str:
    accuracy = result["history"]["evals"][-1]["accuracy"]
    return ", ".join(f"{name} {value:.1f}" for name, value in accuracy.items())
