"""Frontier-teacher measurements, side by side: what the teacher cache costs and saves, and a training
step with the teacher co-located in the job against the same step fed from the cache.

Sections (`--sections`, default all):

  cache   `nemo-paced teacher-cache`'s builder on the demo's references (hf teacher in-process) for each
          --k: shard bytes per cached response token against the documented 6k+2, build time, and the
          teacher tokens skipped because their problem has weight 0 under the demo's starting table.
  step    peak resident memory (VmHWM of a fresh process) and median time of a forward-KL training step,
          co-located teacher (teacher forward + dense vocab_parallel_kl) against the cache (lookup +
          topk_kl, k=64), at CPU scale: a Llama student d=256 x 4 layers, teacher d=1024 x 8 layers,
          vocabulary 32000, 8 sequences of 256 tokens. Needs nemo_paced.loss.topk_kl.

The demo's files come from a demo output directory (`make demo` writes runs/demo; `--demo DIR`):
prepared.json (teacher, problems), references.jsonl and passrates_start.jsonl.

    .venv/bin/python bench/teacher_bench.py --demo runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cache_section(demo: Path, ks: list[int]) -> None:
    from transformers import AutoTokenizer

    from nemo_paced.batches import BatchBuilder
    from nemo_paced.passrates import PassRateTable
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceBatches, load_references
    from nemo_paced.teacher.cache import CacheConfig, build_cache, reference_items
    from nemo_paced.teacher.engines import HFScorer, tokenizer_fingerprint
    from nemo_paced.weighting import WeightConfig

    prepared = json.loads((demo / "prepared.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(prepared["teacher"])
    problems = load_problems(prepared["problems"])
    references = ReferenceBatches(problems, load_references(demo / "references.jsonl"),
                                  BatchBuilder(tokenizer, 1 << 30), "raw")
    items = reference_items(references)
    table = PassRateTable.load(demo / "passrates_start.jsonl")
    ids = references.problem_ids
    weights = dict(zip(ids, table.weights(ids, WeightConfig()).tolist()))
    scorer = HFScorer(prepared["teacher"], batch_tokens=1 << 15)
    teacher = {"model": prepared["teacher"], "engine": "hf", "vocab_size": scorer.vocab_size,
               "tokenizer": tokenizer_fingerprint(tokenizer)}
    total_tokens = sum(len(i.tokens) - i.start for i in items)
    print(f"demo: {len(ids)} problems with a reference, {len(items)} references, {total_tokens} response tokens, "
          f"teacher vocabulary {scorer.vocab_size}; weights w = p(1-p) under the starting table "
          f"(version {table.version})\n")
    print("| k | stored k | sequences scored | teacher tokens scored | skipped at w=0 (problems) | teacher tokens "
          "skipped | skipped share | shard bytes/token | 6k+2 | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        stored = min(k, scorer.vocab_size)
        out = Path(tempfile.mkdtemp(prefix=f"teacher-cache-k{k}-"))
        try:
            start = time.perf_counter()
            summary = build_cache(scorer.score, teacher, items, weights, out, CacheConfig(k=stored),
                                  settings={"template": "raw"})
            seconds = time.perf_counter() - start
            per_token = summary.bytes / summary.scored_tokens
        finally:
            shutil.rmtree(out)
        share = summary.skipped_tokens / total_tokens
        print(f"| {k} | {stored} | {summary.scored} | {summary.scored_tokens} | {summary.skipped} | "
              f"{summary.skipped_tokens} | {share:.1%} | {per_token:.1f} | {6 * stored + 2} | {seconds:.1f} |")
    print()


def step_section(repeats: int) -> None:
    rows = {}
    for mode in ("colocated", "cache"):
        result = subprocess.run([sys.executable, __file__, "--step-worker", mode, "--repeats", str(repeats)],
                                capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            print(f"step section not run: {mode} worker failed:\n{result.stderr[-2000:]}")
            return
        rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    base = rows["colocated"]
    print("| forward-KL step | peak RSS MiB | ratio | step s (median) | ratio |")
    print("|---|---|---|---|---|")
    for mode, label in (("colocated", "teacher in the job + dense KL"), ("cache", "teacher cache k=64 + topk_kl")):
        r = rows[mode]
        print(f"| {label} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f} | {r['seconds']:.3f} | "
              f"{r['seconds'] / base['seconds']:.2f} |")
    print()


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def step_worker(mode: str, repeats: int) -> None:
    """One process per mode, so VmHWM is this mode's peak alone."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_paced.loss import vocab_parallel_kl

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, batch, seq, k = 32000, 8, 256, 64
    student = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4))
    tokens = torch.randint(0, vocab, (batch, seq))
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4)
    if mode == "colocated":
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=2816,
                                               num_hidden_layers=8, num_attention_heads=8,
                                               num_key_value_heads=8)).eval().requires_grad_(False)
    else:
        from nemo_paced.loss import topk_kl

        with torch.no_grad():  # what a cache lookup returns: ids int64 and float32 log-probs
            values, ids = torch.topk(torch.log_softmax(torch.randn(batch, seq, vocab), -1), k, dim=-1)
        cached = (ids, values.half())
    times = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        logits = student(input_ids=tokens).logits
        if mode == "colocated":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=tokens).logits
            per_token = vocab_parallel_kl(logits, teacher_logits, direction="forward")
        else:
            per_token = topk_kl(logits, cached[0], cached[1].float(), direction="forward")
        optimizer.zero_grad()
        per_token.mean().backward()
        optimizer.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    print(json.dumps({"peak_mib": _vm("VmHWM"), "seconds": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a demo output directory (default runs/demo)")
    parser.add_argument("--sections", nargs="+", default=["cache", "step"], choices=["cache", "step"])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64, 256], help="cache k values (default 16 64 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode (default 5)")
    parser.add_argument("--step-worker", choices=["colocated", "cache"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_worker:
        return step_worker(args.step_worker, args.repeats)
    print(f"teacher bench: {os.cpu_count()} CPUs, torch threads 1 in the step workers\n")
    if "cache" in args.sections:
        cache_section(Path(args.demo), args.k)
    if "step" in args.sections:
        step_section(args.repeats)


if __name__ == "__main__":
    main()
