"""The demo experiment: PACED against the paper's baselines on the running-mean task, on one machine.

Steps: build the task splits and the tiny teacher and student (cached), make verified teacher
references (for the pool, and for the test problems: the held-out gradient of the SNR diagnostic),
estimate the starting pass rates over HTTP, then train every method for every seed from the same
starting student under the same token budget with `nemo_paced.train.local`. Every run gets its own
freshly started rollout service (an emptied state directory: no table, job or pooled on-policy score
crosses runs), which also counts what the student generated for the compute accounting. After
training, each run is evaluated on the test problems with `final_eval_samples` samples per problem,
with the same sampling seed for every run (common random numbers sharpen the paired differences).

The budget: every step of every method trains on the same number of response tokens,
`batch_size` x the mean teacher-reference length over the pool (to within half a sequence), taking
the drawn sequences in order from a draw of up to 2 x `batch_size`. A method that favours short
problems trains on more sequences per step, not on fewer tokens. Estimation and on-policy sampling
are not equalised; they are counted (see `nemo_paced.demo.compute`).

Methods (all with pass rates re-estimated every `refresh_every` steps where they use them):
  paced          PACED weights w = p(1-p) on the loss, forward KL then reverse KL (the paper's setting)
  paced_fkl      PACED weights on the loss, forward KL only
  paced_sample   PACED weights as draw probabilities, unweighted loss, forward KL only
  drop_extremes  w = 1 on 0 < p < 1, 0 at p in {0, 1}, forward KL (what is left of PACED without its shape)
  filter         hard filter 0.2 < p < 0.8, forward KL
  uniform        unweighted forward KL (pays for no pass-rate estimation)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from nemo_paced.atomic import atomic_write_json
from nemo_paced.problems import Problem, save_problems
from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.tasks import ChainTask, make_splits
from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig, cached_pretrained
from nemo_paced.weighting import WeightConfig

METHODS = ("paced", "paced_fkl", "paced_sample", "drop_extremes", "filter", "uniform")
# Paired comparisons (a - b) the report makes: the paper's method against every baseline, then the
# forward-KL-only PACED against the forward-KL baselines and its sample mode (the kernel's own effect).
COMPARISONS = (("paced", "uniform"), ("paced", "filter"), ("paced", "drop_extremes"), ("paced", "paced_fkl"),
               ("paced_fkl", "uniform"), ("paced_fkl", "filter"), ("paced_fkl", "drop_extremes"),
               ("paced_fkl", "paced_sample"))


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
    test_per_level: int = 40  # level 1 has only 100 distinct problems (test, retained and pool share them)
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
    eval_samples: int = 4  # per test problem at the evaluations during training (the curves)
    final_eval_samples: int = 64  # per test problem at the final evaluation (the tables)
    eval_seed: int = 20261205  # the same for every run's final evaluation
    snr_per_bin: int = 64
    final_estimate: bool = True  # re-estimate the pool after the first seed's runs (the "after" histograms)


QUICK = DemoConfig(
    task=ChainTask(max_level=4),
    teacher=TinyModelConfig(layers=2, hidden=64, heads=4),
    teacher_pretrain=PretrainConfig(steps=300, level_weights={level: 1.0 for level in range(1, 5)}, seed=1),
    student_pretrain=PretrainConfig(steps=200, level_weights={1: 0.5, 2: 0.3, 3: 0.2}, seed=2),
    pool_per_level=60, test_per_level=20, retained_size=40, steps=30, batch_size=32, refresh_every=15,
    eval_every=15, seeds=(0, 1), methods=("paced", "paced_fkl", "drop_extremes", "uniform"),
    final_eval_samples=16, snr_per_bin=12)


def method_overrides(method: str, config: DemoConfig) -> dict[str, Any]:
    """The LocalTrainConfig settings that define a method (everything else is shared)."""
    refresh = config.refresh_every
    fkl_only = TwoStageSchedule(config.steps, 1.0, refresh_every=refresh)
    if method == "paced":
        return {"weighting": WeightConfig(mode="loss"),
                "schedule": TwoStageSchedule(config.steps, config.fkl_fraction, refresh_every=refresh)}
    if method == "paced_fkl":
        return {"weighting": WeightConfig(mode="loss"), "schedule": fkl_only}
    if method == "paced_sample":
        return {"weighting": WeightConfig(mode="sample"), "schedule": fkl_only}
    if method == "drop_extremes":
        return {"weighting": WeightConfig(mode="filter", band=(0.0, 1.0)), "schedule": fkl_only}
    if method == "filter":
        return {"weighting": WeightConfig(mode="filter", band=(0.2, 0.8)), "schedule": fkl_only}
    if method == "uniform":
        return {"weighting": WeightConfig(mode="uniform"), "schedule": TwoStageSchedule(config.steps, 1.0)}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def uses_pass_rates(method: str) -> bool:
    return method != "uniform"


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


@dataclass(frozen=True)
class Setting:
    """What every run of one experiment shares: models, files, the starting table and its cost."""

    config: DemoConfig
    prepared: Prepared
    problems: list[Problem]
    references: Path
    passrates: Path
    tokens_per_step: int
    prompt_tokens: int  # every prompt of the task has this many tokens
    n_student: int
    n_teacher: int
    start_estimation: dict[str, int]  # rollout totals of the starting estimate

    @property
    def pool(self) -> list[Problem]:
        return [p for p in self.problems if p.meta["split"] == "train"]

    @property
    def tests(self) -> list[Problem]:
        return [p for p in self.problems if p.meta["split"] == "test"]


def start_setting(config: DemoConfig, out: Path, prepared: Prepared, say: Callable[[str], None] = print,
                  student: str | None = None, label: str = "start") -> tuple[Setting, dict[str, Any]]:
    """References (made once per `out`), the pass rates and the large evaluation of the starting
    `student` (default: the prepared one). Returns the setting and {table, evaluation, timings}."""
    from nemo_paced.demo.compute import parameter_count
    from nemo_paced.demo.service import Usage, loopback_service
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceConfig, make_references
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.verifiers import resolve

    student = student or prepared.student
    problems = load_problems(prepared.problems)
    pool = [p for p in problems if p.meta["split"] == "train"]
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    references = out / "references.jsonl"
    reference_config = ReferenceConfig(n=1, template="raw", temperature=0.0, max_tokens=prepared.max_tokens,
                                       batch_problems=256)
    teacher = HFEngine(prepared.teacher, device="cpu", batch_size=1024)
    summary = make_references(teacher, pool, resolve("exact"), references, reference_config)
    heldout = [p for p in problems if p.meta["split"] == "test" and p.meta["benchmark"].startswith("L")]
    make_references(teacher, heldout, resolve("exact"), out / "heldout_references.jsonl", reference_config)
    timings["references"] = time.perf_counter() - mark
    tokens_per_step = token_budget_per_step(config, references)

    mark = time.perf_counter()
    usage = Usage()
    with loopback_service(student, problems, out / "service" / label, k=config.k, max_tokens=prepared.max_tokens,
                          usage=usage) as url:
        table = estimate_pool(url, [p.id for p in pool])
        timings["estimate"] = time.perf_counter() - mark
        mark = time.perf_counter()
        evaluation = evaluate(url, [p for p in problems if p.meta["split"] == "test"], config)
        timings["start_eval"] = time.perf_counter() - mark
    passrates = out / f"passrates_{label}.jsonl"
    table.save(passrates)
    setting = Setting(config, replace(prepared, student=student), problems, references, passrates, tokens_per_step,
                      prompt_tokens=_prompt_tokens(student, pool[0]), n_student=parameter_count(student),
                      n_teacher=parameter_count(prepared.teacher), start_estimation=usage.total("estimate"))
    say(f"teacher references: {summary.report()}")
    say(f"budget for every method: {config.steps} steps x {tokens_per_step} response tokens")
    say(f"pass rates of {label}: {len(table)} problems, K={config.k} ({timings['estimate']:.0f} s over HTTP)")
    return setting, {"table": table, "evaluation": evaluation, "timings": timings, "references": summary}


def estimate_pool(url: str, ids: Sequence[str]):
    """Pass rates of the service's current weights on `ids`, as a table."""
    from nemo_paced.passrates import PassRateTable
    from nemo_paced.rollout.client import RolloutClient

    with RolloutClient(url) as client:
        client.wait(client.estimate(list(ids)), poll=0.1)
        table = PassRateTable()
        version, records = client.table_since(0)
        table.merge(records, version)
    return table


def evaluate(url: str, tests: Sequence[Problem], config: DemoConfig, weights: str | Path | None = None,
             step: int | None = None) -> dict[str, Any]:
    """Accuracy per benchmark with its sampling standard error: `final_eval_samples` samples per
    test problem at the fixed `eval_seed` (scores not pooled into the table)."""
    from nemo_paced.demo.stats import accuracy_with_se
    from nemo_paced.rollout.client import RolloutClient

    per_problem = []
    with RolloutClient(url) as client:
        if weights is not None:
            client.load_weights(Path(weights).resolve(), step=step)
        for start in range(0, len(tests), 256):
            chunk = tests[start:start + 256]
            batch = client.sample([p.id for p in chunk], n=config.final_eval_samples,
                                  seed=config.eval_seed + start, fold=False)
            per_problem += [(p.meta["benchmark"], r.successes, r.trials) for p, r in zip(chunk, batch.problems)]
    return accuracy_with_se(per_problem)


def run_method(setting: Setting, method: str, seed: int, out: Path, progress: bool = True,
               snapshots: dict[int, Path] | None = None) -> dict[str, Any]:
    """One training run on its own fresh service, its final evaluation and its compute."""
    from nemo_paced.demo.compute import run_compute
    from nemo_paced.demo.service import Usage, loopback_service
    from nemo_paced.train.local import LocalTrainConfig, train

    config, prepared = setting.config, setting.prepared
    name = f"{method}-seed{seed}"
    run_dir = out / "runs" / name
    usage = Usage()
    started = time.perf_counter()
    with loopback_service(prepared.student, setting.problems, out / "service" / name, k=config.k,
                          max_tokens=prepared.max_tokens, usage=usage, snapshots=snapshots) as url:
        result = train(LocalTrainConfig(
            student=prepared.student, teacher=prepared.teacher, problems=prepared.problems,
            references=str(setting.references), passrates=str(setting.passrates), rollout=url,
            out_dir=str(run_dir), batch_size=2 * config.batch_size, tokens_per_step=setting.tokens_per_step,
            lr=config.lr, seq_length=config.task.prompt_width + prepared.max_tokens, eval_every=config.eval_every,
            eval_samples=config.eval_samples, rkl_sync_every=config.rkl_sync_every,
            checkpoint_every=max(config.steps // 2, 1), seed=seed,
            final_estimate=config.final_estimate and seed == config.seeds[0],
            progress=progress,
            **method_overrides(method, config)))
        if result["status"] == "preempted":
            raise SystemExit(f"stopped by a signal during {method} seed {seed} (checkpoint in {run_dir})")
        final = evaluate(url, setting.tests, config, weights=run_dir / "final", step=config.steps)

    def compute(before: int) -> dict[str, Any]:
        estimation = usage.total("estimate", before_step=before)
        if uses_pass_rates(method):
            estimation = {k: v + setting.start_estimation[k] for k, v in estimation.items()}
        steps = [s for s in result["history"]["steps"] if s["step"] < before]
        return run_compute(steps, setting.prompt_tokens, estimation, usage.total("onpolicy", before_step=before),
                           setting.n_student, setting.n_teacher)

    evals = result["history"]["evals"]
    curve = [compute(e["step"]) for e in evals]
    run = {"result": result, "final": final, "compute": compute(config.steps),
           "curve": {"steps": [e["step"] for e in evals], "accuracy": [e["accuracy"] for e in evals],
                     "training_tokens": [c["training_tokens"] for c in curve],
                     "total_flops": [c["total_flops"] for c in curve]},
           "seconds": time.perf_counter() - started}
    atomic_write_json(run_dir / "demo_run.json", run)  # the run's evaluation and compute, kept beside it
    return run


def run_all(setting: Setting, jobs: Sequence[tuple[str, int, dict[int, Path] | None]], out: Path,
            workers: int = 1, progress: bool = True) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """`run_method` for every (method, seed, snapshots), in this process or spread over `workers`
    processes (runs are independent: each has its own service, seed and directory, so the results do
    not depend on how they are spread); yields (method, seed, run) as runs finish."""
    if workers <= 1:
        for method, seed, snapshots in jobs:
            yield method, seed, run_method(setting, method, seed, out, progress, snapshots)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        futures = {pool.submit(run_method, setting, method, seed, out, False, snapshots): (method, seed)
                   for method, seed, snapshots in jobs}
        for future in as_completed(futures):
            yield (*futures[future], future.result())


def _one_thread() -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # tiny models: one thread per worker process


def run_demo(config: DemoConfig, out: Path, cache: Path, say: Callable[[str], None] = print,
             progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """The whole experiment; returns the report (also written to out/report.json). `workers` > 1
    spreads the training runs over that many processes."""
    from nemo_paced.demo.report import build_report

    started = time.perf_counter()
    for stale in ("runs", "service", "snapshots"):  # a new experiment: never resume another one's runs or table
        shutil.rmtree(out / stale, ignore_errors=True)
    prepared = prepare(config, out, cache, say)
    timings: dict[str, float] = {"prepare": time.perf_counter() - started}
    setting, start = start_setting(config, out, prepared, say)
    timings.update(start["timings"])

    mark = time.perf_counter()
    switch = TwoStageSchedule(config.steps, config.fkl_fraction).switch_step
    probe_method = "paced" if "paced" in config.methods else config.methods[0]
    snapshots = {switch: out / "snapshots" / "switch"}
    jobs = [(method, seed, snapshots if seed == config.seeds[0] and method == probe_method else None)
            for seed in config.seeds for method in config.methods]
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in config.methods}
    for method, seed, run in run_all(setting, jobs, out, workers, progress):
        runs[method][seed] = run
        say(f"{method} seed {seed}: {run['seconds']:.0f} s, final mean over levels "
            f"{run['final']['accuracy']['mean']:.1f} (SE {run['final']['se']['mean']:.2f})")
    runs = {m: dict(sorted(by_seed.items())) for m, by_seed in runs.items()}
    timings["training"] = time.perf_counter() - mark

    mark = time.perf_counter()
    probe_run = out / "runs" / f"{probe_method}-seed{config.seeds[0]}"
    snr = snr_at_checkpoints(setting, out, start["table"], {
        "switch": snapshots[switch] if snapshots[switch].exists() else None, "end": probe_run / "final"})
    timings["snr"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    report = build_report(config, setting, start, snr, runs, timings, probe=f"{probe_method} seed {config.seeds[0]}")
    atomic_write_json(out / "report.json", report)
    return report


def snr_at_checkpoints(setting: Setting, out: Path, start_table, checkpoints: dict[str, Path | None]
                       ) -> dict[str, Any]:
    """The SNR diagnostic for the starting student (its starting table) and each checkpoint (pass
    rates re-estimated for it on a fresh service)."""
    from nemo_paced.demo.service import loopback_service
    from nemo_paced.demo.snr import gradient_snr_by_pass_rate
    from nemo_paced.references import load_references

    from transformers import AutoTokenizer

    config, prepared = setting.config, setting.prepared
    tokenizer = AutoTokenizer.from_pretrained(prepared.student)
    references = {i: refs[0].text for i, refs in load_references(setting.references).items()}
    held = load_references(out / "heldout_references.jsonl")
    heldout = [(p, held[p.id][0].text) for p in setting.tests if p.id in held]
    pool = setting.pool
    result = {"start": gradient_snr_by_pass_rate(prepared.student, prepared.teacher, pool, start_table, references,
                                                 heldout, per_bin=config.snr_per_bin, k=config.k)}
    for label, model in checkpoints.items():
        if model is None:
            continue
        tokenizer.save_pretrained(model)  # pushed weights are saved without their tokenizer
        with loopback_service(str(model), setting.problems, out / "service" / f"snr-{label}", k=config.k,
                              max_tokens=prepared.max_tokens) as url:
            table = estimate_pool(url, [p.id for p in pool])
        result[label] = gradient_snr_by_pass_rate(str(model), prepared.teacher, pool, table, references, heldout,
                                                  per_bin=config.snr_per_bin, k=config.k)
    return result


def token_budget_per_step(config: DemoConfig, references: Path) -> int:
    """`batch_size` sequences of the pool's mean teacher-reference length, in response tokens."""
    from nemo_paced.references import load_references

    lengths = [len(refs[0].token_ids) for refs in load_references(references).values()]
    return max(1, round(config.batch_size * sum(lengths) / len(lengths)))


def _prompt_tokens(student: str, problem: Problem) -> int:
    from transformers import AutoTokenizer

    from nemo_paced.batches import BatchBuilder

    return len(BatchBuilder(AutoTokenizer.from_pretrained(student), seq_length=64).prompt_ids(problem.prompt))


def _with_meta(problem: Problem, **meta: Any) -> Problem:
    return replace(problem, meta={**problem.meta, **meta})
