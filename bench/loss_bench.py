"""Forward+backward cost of distillation losses, side by side on the same logits, as ratios to ModelOpt.

Rows: this package's chunked vocab-parallel losses, a naive torch loss (`log_softmax` + `kl_div` on
the gathered logits), ModelOpt's `LogitsKLLoss` (what Megatron Bridge uses for KD) and, where TRL is
installed, TRL's `generalized_jsd_loss`. Each row runs `loss = per_token.sum(); loss.backward()`
on leaf student logits; the student gradient it produces counts as extra memory for every row.

Peak extra memory (documented method):
- CPU: the process's peak resident set size. Before each measured run the kernel's high-water mark
  is reset (`echo 5 > /proc/self/clear_refs`), then extra = VmHWM − VmRSS-before. glibc is told to
  serve every allocation ≥ 64 KiB with mmap (`mallopt`), so freed tensors leave the RSS at once and
  one row's garbage cannot hide in the next row's baseline. tracemalloc is useless here: it sees
  Python's allocator only, not torch's.
- CUDA: `torch.cuda.max_memory_allocated()` − allocated-before, after `reset_peak_memory_stats()`.
Time: minimum of `--repeats` rounds, each round running every row once (after one warm-up run per
row), so that load changes on a shared machine hit all rows alike and the least-disturbed run
counts; one torch thread per process by default (`--threads`).

`nemo_paced topk_kl k=64` is the sparse loss against the teacher's top 64 ids and log-probs
(taken from the same teacher logits, outside the timed region); its baseline is the dense
`nemo_paced kl` of the same direction, its error is against the float64 top-k reference.

TP = 2 runs the same rows in 2 processes joined by gloo on 127.0.0.1 (each holds half of the
vocabulary; the naive rows all-gather it); the figures are rank 0's, memory per rank.

    .venv/bin/python bench/loss_bench.py            # CPU tables, fp32 and bf16 logits (long)
    .venv/bin/python bench/loss_bench.py --quick     # small shapes, a smoke run
    .venv/bin/python bench/loss_bench.py --sections tp1 --shape 2048x32768 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from nemo_paced.console import quiet_third_party; quiet_third_party()  # noqa: E702  (before torch & co. warn)
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gloo_ranks import free_port  # noqa: E402
from loss_reference import reference, topk_reference  # noqa: E402  (the float64 references the tests use)
from nemo_paced.loss import (  # noqa: E402
    fused_linear_kl, topk_kl, vocab_parallel_akl, vocab_parallel_jsd, vocab_parallel_kl)

TOP_K = 64

# loss(*differentiable inputs, teacher_logits, group) -> per-token values [N]
Loss = Callable[..., torch.Tensor]


def _force_mmap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold, m_trim_threshold = -3, -1
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMemory:
    """Peak extra bytes of the enclosed code (see the module docstring for the method)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.before


# ---- the losses, all returning per-token values [N] of the local shards [N, V_local] ----------

def _gather_vocab(x: torch.Tensor, group, differentiable: bool) -> torch.Tensor:
    if group is None:
        return x
    if differentiable:
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(x, group=group), dim=-1)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def naive(reverse: bool) -> Loss:
    def loss(s, t, group):
        ls = F.log_softmax(_gather_vocab(s, group, True).float(), dim=-1)
        lt = F.log_softmax(_gather_vocab(t, group, False).float(), dim=-1)
        a, b = (lt, ls) if reverse else (ls, lt)
        return F.kl_div(a, b, reduction="none", log_target=True).sum(-1)
    return loss


def modelopt(reverse: bool) -> Loss:
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    def loss(s, t, group):
        tp = 1 if group is None else dist.get_world_size(group)
        cfg = SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=False)
        per_token, _, _ = LogitsKLLoss(cfg, reverse=reverse)(s[:, None], t[:, None])
        # [1, N] partial sums over the local shard, as Bridge's _mask_loss reduces them
        return per_token[0]
    return loss


def trl(beta: float) -> Loss:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    def loss(s, t, group):
        assert group is None, "TRL's loss is not tensor-parallel"
        return GKDTrainer.generalized_jsd_loss(s, t, beta=beta, reduction="none").sum(-1)
    return loss


def ours(fn, **kw) -> Loss:
    return lambda s, t, group: fn(s, t, tp_group=group, **kw)


def with_head(loss: Loss) -> Loss:
    """The student's output layer (autograd matmul, full logits) followed by `loss`."""
    return lambda hidden, weight, t, group: loss(hidden @ weight.t(), t, group)


def fused(direction: str) -> Loss:
    return lambda hidden, weight, t, group: fused_linear_kl(hidden, weight, t, direction=direction,
                                                            tp_group=group)


def topk(direction: str, ids: torch.Tensor, logprobs: torch.Tensor) -> Loss:
    return lambda s, t, group: topk_kl(s, ids, logprobs, direction=direction, tp_group=group)


@dataclass
class Row:
    name: str
    loss: Loss
    # what it computes, for the float64 reference: forward | reverse | jsd (β=½) | akl (μ=½) | topk
    kind: str

    @property
    def baseline(self) -> str:  # the ModelOpt row of the same direction; the dense KL for top-k
        if self.kind == "topk":
            return "nemo_paced kl fwd"
        prefix = "head + " if self.name.startswith(("head", "nemo_paced fused")) else ""
        return f"{prefix}modelopt {'rev' if self.kind == 'reverse' else 'fwd'}"


def teacher_topk(teacher: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k global ids and their log-probabilities, from its full logits."""
    ids = teacher.float().topk(k, -1).indices
    return ids, teacher.float().log_softmax(-1).gather(-1, ids)


def rows(tp: int, top: tuple[torch.Tensor, torch.Tensor]) -> list[Row]:
    out = [Row("modelopt fwd", modelopt(False), "forward"),
           Row("modelopt rev", modelopt(True), "reverse"),
           Row("nemo_paced kl fwd", ours(vocab_parallel_kl, direction="forward"), "forward"),
           Row("nemo_paced kl rev", ours(vocab_parallel_kl, direction="reverse"), "reverse"),
           Row("naive torch fwd", naive(False), "forward"),
           Row("naive torch rev", naive(True), "reverse"),
           Row("nemo_paced jsd b=0.5", ours(vocab_parallel_jsd, beta=0.5), "jsd"),
           Row("nemo_paced akl", ours(vocab_parallel_akl), "akl"),
           Row(f"nemo_paced topk_kl k={TOP_K} fwd", topk("forward", *top), "topk")]
    if tp == 1:
        try:
            import trl as _trl  # noqa: F401
        except ImportError as e:
            print(f"# TRL rows skipped: {e}")
        else:
            out += [Row("trl generalized_jsd b=0", trl(0.0), "forward"),
                    Row("trl generalized_jsd b=1", trl(1.0), "reverse"),
                    Row("trl generalized_jsd b=0.5", trl(0.5), "jsd")]
    return out


def head_rows() -> list[Row]:
    return [Row("head + modelopt fwd", with_head(modelopt(False)), "forward"),
            Row("head + modelopt rev", with_head(modelopt(True)), "reverse"),
            Row("head + nemo_paced kl fwd", with_head(ours(vocab_parallel_kl, direction="forward")), "forward"),
            Row("head + nemo_paced kl rev", with_head(ours(vocab_parallel_kl, direction="reverse")), "reverse"),
            Row("nemo_paced fused head+kl fwd", fused("forward"), "forward"),
            Row("nemo_paced fused head+kl rev", fused("reverse"), "reverse")]


def references(student: torch.Tensor, teacher: torch.Tensor, kinds: set[str], rows_per_chunk: int = 128) -> dict:
    """Float64 per-token values of the full logits, chunked to bound memory."""
    out = {}
    for kind in kinds:
        parts = []
        for i in range(0, student.shape[0], rows_per_chunk):
            s, t = student[i:i + rows_per_chunk].double(), teacher[i:i + rows_per_chunk].double()
            parts.append(topk_reference(s, *teacher_topk(t)) if kind == "topk" else reference(kind, s, t))
        out[kind] = torch.cat(parts)
    return out


# ---- measurement --------------------------------------------------------------------------------

def _sync(device, group) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    if group is not None:
        dist.barrier(group)


def _run_once(row: Row, tensors: tuple[torch.Tensor, ...], group) -> torch.Tensor:
    """Forward+backward with every tensor but the last (the teacher's logits) a fresh leaf."""
    leaves = [x.detach().requires_grad_() for x in tensors[:-1]]
    values = row.loss(*leaves, tensors[-1], group)
    values.sum().backward()
    return values.detach()


def _timed(row: Row, tensors: tuple[torch.Tensor, ...], group) -> float:
    device = tensors[0].device
    _sync(device, group)
    start = time.perf_counter()
    _run_once(row, tensors, group)
    _sync(device, group)
    return time.perf_counter() - start


def measure(rows_: list[Row], tensors: tuple[torch.Tensor, ...], group, repeats: int,
            full_logits: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Warm-up and peak memory row by row, then `repeats` rounds over all rows (load drifts hit all).

    The warm-up's per-token values are compared with a float64 reference on `full_logits()`.
    """
    device = tensors[0].device
    with torch.no_grad():
        refs = references(*full_logits(), {row.kind for row in rows_})
    results = []
    for row in rows_:
        values = _run_once(row, tensors, group)  # warm-up
        if "modelopt" in row.name and group is not None:
            dist.all_reduce(values, group=group)  # ModelOpt returns per-shard partial KL
        ref = refs[row.kind].to(values.device)
        error = float(((values.double() - ref).abs() / ref.abs()).max())
        del values
        _sync(device, group)
        with PeakMemory(device) as mem:
            _run_once(row, tensors, group)
            _sync(device, group)
        results.append(dict(name=row.name, baseline=row.baseline, peak=mem.peak, error=error, times=[]))
    for _ in range(repeats):
        for row, result in zip(rows_, results):
            result["times"].append(_timed(row, tensors, group))
    for result in results:
        result["time"] = min(result.pop("times"))
    return results


def inputs(tokens: int, vocab: int, dtype: torch.dtype, device, rank: int = 0, tp: int = 1):
    g = torch.Generator().manual_seed(1234)
    s = torch.randn(tokens, vocab, generator=g) * 3
    t = 0.6 * s + torch.randn(tokens, vocab, generator=g) * 3
    shard = vocab // tp
    s, t = s[:, rank * shard:(rank + 1) * shard].to(dtype), t[:, rank * shard:(rank + 1) * shard].to(dtype)
    return s.to(device).contiguous(), t.to(device).contiguous()


def head_inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device):
    g = torch.Generator().manual_seed(4321)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 3
    t = 0.6 * (h @ w.t()) + torch.randn(tokens, vocab, generator=g) * 3
    return h.to(device, dtype), w.to(device, dtype), t.to(device, dtype)


def table(results: list[dict], title: str) -> str:
    by_name = {r["name"]: r for r in results}
    lines = [f"\n{title}", f"| {'loss (forward+backward)':28} | peak extra MiB | x baseline | time s | x baseline | max rel. error vs fp64 |",
             f"|{'-' * 30}|---------------:|-----------:|-------:|-----------:|-----------------------:|"]
    for r in results:
        base = by_name[r["baseline"]]
        lines.append(f"| {r['name']:28} | {r['peak'] / 2**20:14.0f} | {r['peak'] / base['peak']:10.2f} | "
                     f"{r['time']:6.3f} | {r['time'] / base['time']:10.2f} | {r['error']:22.1e} |")
    return "\n".join(lines)


def run_shape(tokens: int, vocab: int, dtype: torch.dtype, device, repeats: int, group=None,
              rank: int = 0, tp: int = 1) -> list[dict]:
    tensors = inputs(tokens, vocab, dtype, device, rank, tp)
    top = teacher_topk(inputs(tokens, vocab, dtype, device)[1])
    return measure(rows(tp, top), tensors, group, repeats, lambda: inputs(tokens, vocab, dtype, device))


def run_head(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device, repeats: int) -> list[dict]:
    h, w, t = tensors = head_inputs(tokens, vocab, hidden, dtype, device)
    return measure(head_rows(), tensors, None, repeats, lambda: (h.double() @ w.double().t(), t))


def _tp_worker(rank: int, world: int, port: int, tokens: int, vocab: int, dtype, repeats: int,
               threads: int, queue) -> None:
    _force_mmap()
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    try:
        queue.put((rank, run_shape(tokens, vocab, dtype, torch.device("cpu"), repeats, group, rank, world)))
    finally:
        dist.destroy_process_group()


def run_tp(tp: int, tokens: int, vocab: int, dtype, repeats: int, threads: int) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_tp_worker, args=(r, tp, port, tokens, vocab, dtype, repeats, threads, queue))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in range(tp))
    for p in procs:
        p.join()
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (minimum)")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="logit dtypes, one set of tables each")
    parser.add_argument("--shape", nargs="+", metavar="TOKENSxVOCAB",
                        help="replace the logits tables' shapes (TP=1 and TP=2), e.g. 2048x32768")
    parser.add_argument("--sections", nargs="+", choices=["tp1", "head", "tp2"],
                        default=["tp1", "head", "tp2"], help="which tables to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _force_mmap()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        shapes_tp1, shapes_tp2, shapes_head = [(4096, 32768), (8192, 151936)], [], [(8192, 151936, 2048)]
    elif args.quick:
        shapes_tp1, shapes_tp2, shapes_head = [(256, 8192)], [(256, 8192)], [(256, 8192, 64)]
    else:
        shapes_tp1 = [(1024, 32768), (4096, 32768), (1024, 151936)]
        shapes_tp2, shapes_head = [(4096, 32768)], [(4096, 32768, 256)]
    if args.shape:
        shapes_tp1 = shapes_tp2 = [tuple(int(x) for x in shape.split("x")) for shape in args.shape]
    cpu = os.cpu_count()
    print(f"# torch {torch.__version__}, {device} ({torch.cuda.get_device_name() if cuda else f'{cpu} CPU cores'}), "
          f"{args.threads} thread(s) per process, minimum of {args.repeats}")
    shapes_tp1 = shapes_tp1 if "tp1" in args.sections else []
    shapes_head = shapes_head if "head" in args.sections else []
    shapes_tp2 = shapes_tp2 if "tp2" in args.sections else []
    for dtype in (getattr(torch, name) for name in args.dtype):
        for tokens, vocab in shapes_tp1:
            res = run_shape(tokens, vocab, dtype, device, args.repeats)
            print(table(res, f"TP=1, {tokens} tokens x {vocab} vocab ({dtype})"), flush=True)
        for tokens, vocab, hidden in shapes_head:
            res = run_head(tokens, vocab, hidden, dtype, device, args.repeats)
            print(table(res, f"TP=1, output layer + loss: {tokens} tokens x hidden {hidden} -> {vocab} vocab "
                             f"({dtype}); rows without 'fused' materialise the logits"), flush=True)
        for tokens, vocab in shapes_tp2:
            res = run_tp(2, tokens, vocab, dtype, args.repeats, args.threads)
            print(table(res, f"TP=2 (gloo, rank 0 holds {vocab // 2}), {tokens} tokens x {vocab} vocab "
                             f"({dtype})"), flush=True)

if __name__ == "__main__":
    main()
