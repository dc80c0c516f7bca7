"""Top-k teacher caches against full-vocabulary distillation: accuracy and KL after equal steps.

The demo's chain task has a 15-token vocabulary, so every k >= 15 is the full KL. Here the same task
(running floor means, levels 1-4) is written with a large alphabet: every answer digit d is spelled by
one of `synonyms` characters of its own (d's j-th synonym drawn with probability ~ (j+1)^-s), so a
teacher trained on it spreads each answer token's probability over ~100 tokens of a ~1,000-token
vocabulary, and a correct digit is any of its synonyms (the verifier reads synonyms back as digits).
A top-k cache keeps the k most likely synonyms; the tail mass beyond k is real probability of correct
tokens that a top-k student only sees as one lump (`bucket`) or not at all (`renormalize`).

Pipeline, all through the project's own pieces: the teacher and the student (2 layers, d=32, a
curriculum tilted to short chains) are pretrained on the spelled task (cached under --cache); the
teacher's sampled references are made and verified with `nemo_paced.references.make_references`;
the top-k caches are written by `nemo_paced.teacher.cache.build_cache` with the hf scorer (real
shards, k = 16, 64, 256); every arm trains the same student from the same weights for the same steps
with `nemo_paced.train.local.train` (forward KL, uniform weights): `full` with the teacher in the job
(exact KL over the whole vocabulary), the others with `teacher_cache=` and `topk_tail=`. Each run
has its own loopback rollout service (the demo's), which evaluates it: accuracy over
`--eval-samples` samples per test problem at one sampling seed shared by all runs. The KL to the full
teacher is the exact per-token KL(teacher || student) over the whole vocabulary on the teacher's
references for the test problems. Paired differences (arm - full) over seeds use the demo's
statistics (`nemo_paced.demo.stats.paired_difference`).

    .venv/bin/python bench/topk_gap.py                   # 3 seeds, both tails (~30 min on 2 busy cores)
    .venv/bin/python bench/topk_gap.py --tails bucket    # the bucket tail only
    .venv/bin/python bench/topk_gap.py --quick           # smoke run: 1 seed, k = 16, 10 steps

Writes OUT/report.json and prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIGITS = "0123456789"
FIRST_SYNONYM = 0x4E00  # synonyms are CJK ideographs: distinct, non-space, one token each
SYNONYMS = 100  # per digit; the verifier the service loads reads this many


@dataclass(frozen=True)
class Spelling:
    """Digit d is written by characters FIRST_SYNONYM + d*synonyms + j, j drawn with p ~ (j+1)^-zipf."""

    synonyms: int = SYNONYMS
    zipf: float = 0.8

    def chars(self, digit: int) -> str:
        return "".join(chr(FIRST_SYNONYM + digit * self.synonyms + j) for j in range(self.synonyms))

    @property
    def alphabet(self) -> str:
        return "".join(self.chars(d) for d in range(10))

    @property
    def probabilities(self) -> np.ndarray:
        weights = np.arange(1, self.synonyms + 1, dtype=np.float64) ** -self.zipf
        return weights / weights.sum()

    def spell(self, answer: str, rng: random.Random) -> str:
        weights = self.probabilities.tolist()
        return "".join(self.chars(int(c))[rng.choices(range(self.synonyms), weights)[0]] for c in answer)


def read_digits(text: str, synonyms: int = SYNONYMS) -> str:
    """A spelled answer read back as digits (a plain digit reads as itself; anything else as '?')."""
    codes = [ord(c) - FIRST_SYNONYM for c in text]
    return "".join(c if c in DIGITS else str(code // synonyms) if 0 <= code < 10 * synonyms else "?"
                   for c, code in zip(text, codes))


def synonym_exact(completion: str, answer: str) -> bool:
    """The verifier the rollout service loads (`topk_gap:synonym_exact`): the completion, read back as
    digits, equals the answer."""
    return read_digits(completion.strip()) == answer.strip()


class SpelledTask:
    """The chain task's pretraining mixture with answers spelled by synonyms (for `tiny_models.pretrain`)."""

    def __init__(self, task, spelling: Spelling) -> None:
        self.task, self.spelling = task, spelling

    def mixture(self, count: int, level_weights: dict[int, float], rng: random.Random):
        return [replace(p, answer=self.spelling.spell(p.answer, rng))
                for p in self.task.mixture(count, level_weights, rng)]


@dataclass(frozen=True)
class GapConfig:
    max_level: int = 4
    spelling: Spelling = field(default_factory=Spelling)
    teacher_layers: int = 3
    teacher_hidden: int = 64
    teacher_steps: int = 3000
    student_layers: int = 2
    student_hidden: int = 32
    student_steps: int = 400
    student_levels: tuple[float, ...] = (0.5, 0.3, 0.15, 0.05)
    pool_per_level: int = 300
    test_per_level: int = 40
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    ks: tuple[int, ...] = (16, 64, 256)
    tails: tuple[str, ...] = ("bucket", "renormalize")
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_samples: int = 32
    eval_seed: int = 20261205


QUICK = GapConfig(teacher_steps=300, student_steps=100, pool_per_level=60, test_per_level=10, steps=10,
                  ks=(16,), tails=("bucket",), seeds=(0,), eval_samples=4)


def build_model(config: GapConfig, layers: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_paced.tasks import ALPHABET
    from nemo_paced.tasks.tokenizer import char_tokenizer
    from nemo_paced.tiny_models import ROPE_THETA

    torch.manual_seed(seed)
    tokenizer = char_tokenizer(ALPHABET + config.spelling.alphabet)
    width = config.max_level + 2 + config.max_level + 1
    llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                        num_hidden_layers=layers, num_attention_heads=hidden // 16, max_position_embeddings=width,
                        rope_theta=ROPE_THETA, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(llama), tokenizer


def pretrained(config: GapConfig, name: str, cache: Path) -> Path:
    """The teacher (all levels) or the student (short-chain curriculum), pretrained once and cached."""
    from nemo_paced.tasks import ChainTask
    from nemo_paced.tiny_models import PretrainConfig, pretrain

    levels = range(1, config.max_level + 1)
    if name == "teacher":
        shape = (config.teacher_layers, config.teacher_hidden)
        training = PretrainConfig(steps=config.teacher_steps, level_weights={lv: 1.0 for lv in levels}, seed=1)
    else:
        shape = (config.student_layers, config.student_hidden)
        training = PretrainConfig(steps=config.student_steps, seed=2,
                                  level_weights=dict(zip(levels, config.student_levels)))
    key = hashlib.sha256(json.dumps({"shape": shape, "training": asdict(training), "level": config.max_level,
                                     "spelling": asdict(config.spelling), "torch": torch.__version__},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    final = cache / f"topk-gap-{name}-{key}"
    if (final / "pretrain.json").is_file():
        return final
    model, tokenizer = build_model(config, *shape, seed=training.seed)
    loss = pretrain(model, tokenizer, SpelledTask(ChainTask(config.max_level), config.spelling), training)
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "pretrain.json").write_text(json.dumps({"final_loss": loss}))
    staging.rename(final)
    return final


def problem_files(config: GapConfig, out: Path) -> tuple[list, list]:
    from nemo_paced.problems import save_problems
    from nemo_paced.tasks import ChainTask, make_splits

    splits = make_splits(ChainTask(config.max_level), config.pool_per_level, config.test_per_level, 0)
    pool = [replace(p, meta={**p.meta, "split": "train"}) for p in splits.pool]
    tests = [replace(p, meta={**p.meta, "split": "test", "benchmark": f"L{level}"})
             for level, ps in splits.test.items() for p in ps]
    save_problems(out / "problems.jsonl", pool + tests)
    return pool, tests


def tail_mass(scorer, items, ks: tuple[int, ...]) -> dict[int, float]:
    """The teacher's mean probability per response token beyond its k most likely tokens."""
    full = scorer.score([i.tokens for i in items], [i.start for i in items], scorer.vocab_size)
    probs = np.concatenate([np.exp(r.logprobs.astype(np.float64)) for r in full])
    kept = np.cumsum(probs, axis=1)
    return {k: float(np.mean(np.clip(1.0 - kept[:, k - 1], 0.0, 1.0))) for k in ks}


def kl_to_teacher(student: Path, teacher: Path, items) -> float:
    """Mean per-token KL(teacher || student) over the whole vocabulary on the given reference tokens."""
    from transformers import AutoModelForCausalLM

    from nemo_paced.loss import vocab_parallel_kl

    models = [AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval() for m in (student, teacher)]
    total, count = 0.0, 0
    with torch.inference_mode():
        for item in items:
            ids = torch.tensor([item.tokens])
            s, t = (m(input_ids=ids).logits[0, item.start - 1:-1] for m in models)
            kl = vocab_parallel_kl(s, t, direction="forward")
            total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


def start_estimate(config: GapConfig, out: Path, files: dict[str, Any]) -> dict[str, Any]:
    """The starting student's pass rates on the pool (the uniform weighting needs every problem in the
    table) and its evaluation, on a loopback service."""
    from nemo_paced.demo.experiment import DemoConfig, estimate_pool, evaluate
    from nemo_paced.demo.service import loopback_service

    with loopback_service(str(files["student"]), files["problems"], out / "service" / "start", k=8,
                          max_tokens=config.max_level + 1, verifier="topk_gap:synonym_exact") as url:
        table = estimate_pool(url, [p.id for p in files["problems"] if p.meta["split"] == "train"])
        demo = DemoConfig(final_eval_samples=config.eval_samples, eval_seed=config.eval_seed)
        evaluation = evaluate(url, files["tests"], demo)
    table.save(out / "passrates.jsonl")
    return evaluation


def arms(config: GapConfig) -> list[tuple[str, int | None, str | None]]:
    return [("full", None, None)] + [(f"{tail} k={k}", k, tail) for tail in config.tails for k in config.ks]


def run_arm(config: GapConfig, out: Path, files: dict[str, Any], arm: tuple[str, int | None, str | None],
            seed: int) -> dict[str, Any]:
    from nemo_paced.demo.experiment import DemoConfig, evaluate
    from nemo_paced.demo.service import loopback_service
    from nemo_paced.schedule import TwoStageSchedule
    from nemo_paced.train.local import LocalTrainConfig, train
    from nemo_paced.weighting import WeightConfig

    name, k, tail = arm
    run_dir = out / "runs" / f"{name.replace(' ', '-').replace('=', '')}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    max_tokens = config.max_level + 1
    with loopback_service(str(files["student"]), files["problems"], out / "service" / run_dir.name, k=8,
                          max_tokens=max_tokens, verifier="topk_gap:synonym_exact") as url:
        result = train(LocalTrainConfig(
            student=str(files["student"]), teacher=str(files["teacher"]), problems=str(out / "problems.jsonl"),
            references=str(out / "references.jsonl"), passrates=str(out / "passrates.jsonl"), rollout=url, out_dir=str(run_dir),
            schedule=TwoStageSchedule(config.steps, 1.0), weighting=WeightConfig(mode="uniform"),
            batch_size=config.batch_size, lr=config.lr, seq_length=2 * config.max_level + 3, eval_samples=4,
            checkpoint_every=config.steps, final_estimate=False, seed=seed, progress=False,
            teacher_cache=None if k is None else str(out / f"cache-k{k}"), topk_tail=tail or "bucket"))
        demo = DemoConfig(final_eval_samples=config.eval_samples, eval_seed=config.eval_seed)
        final = evaluate(url, files["tests"], demo, weights=run_dir / "final", step=config.steps)
    kl = kl_to_teacher(run_dir / "final", files["teacher"], files["heldout"])
    return {"arm": name, "seed": seed, "accuracy": final["accuracy"], "se": final["se"], "kl": kl,
            "tokens": result["tokens"], "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, k=16 bucket, 10 steps")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 150)")
    parser.add_argument("--tails", nargs="+", choices=["bucket", "renormalize"],
                        help="top-k tails to train with (default both)")
    parser.add_argument("--out", type=Path, default=Path("runs/topk_gap"),
                        help="output directory, emptied first (default runs/topk_gap)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/nemo-paced"),
                        help="where the pretrained teacher and student are kept (default .cache/nemo-paced)")
    args = parser.parse_args(argv)
    import logging

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the service resolves topk_gap:synonym_exact

    config = QUICK if args.quick else GapConfig()
    if args.seeds is not None:
        config = replace(config, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.tails:
        config = replace(config, tails=tuple(args.tails))
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()

    from nemo_paced.atomic import atomic_write_json
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceBatches, ReferenceConfig, load_references, make_references
    from nemo_paced.batches import BatchBuilder
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.teacher.cache import CacheConfig, build_cache, reference_items
    from nemo_paced.teacher.engines import HFScorer, tokenizer_fingerprint

    teacher, student = (pretrained(config, name, args.cache) for name in ("teacher", "student"))
    pool, tests = problem_files(config, out)
    print(f"models: {teacher}, {student} ({time.perf_counter() - started:.0f} s)", flush=True)
    refs = ReferenceConfig(n=1, template="raw", temperature=1.0, max_tokens=config.max_level + 1, seed=0,
                           batch_problems=256)
    engine = HFEngine(str(teacher), device="cpu", batch_size=1024)
    summary = make_references(engine, pool, synonym_exact, out / "references.jsonl", refs)
    make_references(engine, tests, synonym_exact, out / "heldout_references.jsonl", replace(refs, keep="all"))
    print(f"teacher references: {summary.report()}", flush=True)

    scorer = HFScorer(str(teacher), device="cpu")
    builder = BatchBuilder(scorer.tokenizer, seq_length=1 << 30)
    problems = load_problems(out / "problems.jsonl")
    items = reference_items(ReferenceBatches(pool, load_references(out / "references.jsonl"), builder, "raw"))
    heldout = reference_items(ReferenceBatches(  # every sample, right or wrong: the KL is on the teacher's own text
        tests, load_references(out / "heldout_references.jsonl", verified_only=False), builder, "raw"))
    tails = tail_mass(scorer, items, config.ks)
    info = {"model": str(teacher), "engine": "hf", "vocab_size": scorer.vocab_size,
            "tokenizer": tokenizer_fingerprint(scorer.tokenizer)}
    caches = {}
    for k in config.ks:
        cache = CacheConfig(k=k)
        built = build_cache(scorer.score, info, items, None, out / f"cache-k{k}", cache, settings={"template": "raw"})
        caches[k] = {"bytes_per_token": cache.bytes_per_token, "bytes": built.bytes, "tokens": built.scored_tokens}
    print("teacher tail mass per response token beyond k: "
          + ", ".join(f"k={k}: {m:.3f}" for k, m in tails.items()), flush=True)

    files = {"teacher": teacher, "student": student, "problems": problems, "tests": [p for p in problems
                                                                                    if p.meta["split"] == "test"],
             "heldout": heldout}
    start_kl = kl_to_teacher(student, teacher, heldout)
    start = start_estimate(config, out, files)
    rows = []
    report = {"config": asdict(config), "vocab_size": scorer.vocab_size, "tail_mass": tails, "caches": caches,
              "references": summary.report(), "start_kl": start_kl, "start": start, "rows": rows}
    for arm in arms(config):  # arm by arm, every seed: an interrupted run still has whole arms in its report
        for seed in config.seeds:
            row = run_arm(config, out, files, arm, seed)
            rows.append(row)
            print(f"{row['arm']} seed {seed}: accuracy {row['accuracy']['mean']:.1f} (SE {row['se']['mean']:.2f}), "
                  f"KL to teacher {row['kl']:.4f} ({row['seconds']:.0f} s)", flush=True)
            report.update(summary=summarise(config, rows), seconds=time.perf_counter() - started)
            atomic_write_json(out / "report.json", report)
    print()
    print(format_report(report))
    print(f"report: {out / 'report.json'} ({report['seconds']:.0f} s)")
    return 0


def summarise(config: GapConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from nemo_paced.demo.stats import paired_difference

    def by_seed(name: str, value) -> dict[int, float]:
        return {r["seed"]: value(r) for r in rows if r["arm"] == name}

    out = {}
    for name in dict.fromkeys(r["arm"] for r in rows):
        acc, kl = by_seed(name, lambda r: r["accuracy"]["mean"]), by_seed(name, lambda r: r["kl"])
        entry = {"accuracy": float(np.mean(list(acc.values()))), "accuracy_sd": float(np.std(list(acc.values()),
                                                                                          ddof=1)) if len(acc) > 1 else 0.0,
                 "kl": float(np.mean(list(kl.values()))), "levels": {
                     lv: float(np.mean([r["accuracy"][lv] for r in rows if r["arm"] == name]))
                     for lv in sorted(rows[0]["accuracy"]) if lv.startswith("L")}}
        if name != "full" and any(r["arm"] == "full" for r in rows):
            entry["accuracy_vs_full"] = paired_difference(acc, by_seed("full", lambda r: r["accuracy"]["mean"]))
            entry["kl_vs_full"] = paired_difference(kl, by_seed("full", lambda r: r["kl"]))
        out[name] = entry
    return out


def _interval(diff: dict[str, Any], digits: int) -> str:
    low, high = diff["t_ci95"]
    if math.isnan(low):
        return f"{diff['mean']:+.{digits}f}"
    return f"{diff['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def format_report(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [f"vocabulary {report['vocab_size']}; teacher tail mass per response token beyond k: "
             + ", ".join(f"k={k}: {m:.3f}" for k, m in report["tail_mass"].items()),
             f"{config['steps']} steps x {config['batch_size']} sequences, seeds {config['seeds']}; "
             f"accuracy = mean over levels of {config['eval_samples']} samples per test problem; "
             f"KL = per-token KL(teacher || student) on held-out teacher samples; "
             f"start: accuracy {report['start']['accuracy']['mean']:.1f}, KL {report['start_kl']:.4f}",
             "",
             "| arm | accuracy (%) | − full (95 % t) | KL to teacher | − full (95 % t) | seeds above full |",
             "|---|---|---|---|---|---|"]
    order = ["full"] + [f"{tail} k={k}" for tail in config["tails"] for k in config["ks"]]
    for name in [n for n in order if n in report["summary"]]:  # the report's JSON keys are sorted
        entry = report["summary"][name]
        if name == "full":
            lines.append(f"| full vocabulary | {entry['accuracy']:.1f}±{entry['accuracy_sd']:.1f} | | "
                         f"{entry['kl']:.4f} | | |")
            continue
        acc, kl = entry["accuracy_vs_full"], entry["kl_vs_full"]
        lines.append(f"| {name} | {entry['accuracy']:.1f}±{entry['accuracy_sd']:.1f} | {_interval(acc, 2)} | "
                     f"{entry['kl']:.4f} | {_interval(kl, 4)} | {acc['better']}/{acc['n']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
