"""Sampler overhead per global batch: PacedSampler against a plain random sampler, side by side.

    .venv/bin/python bench/sampler_bench.py [--problems 17398] [--global-batch 256] [--micro-batch 4]
                                            [--dp 8] [--batches 200] [--ranks 2]

Each variant yields this DP rank's micro-batches of problem indices for `--batches` global batches
(the same work Megatron asks of a data loader, without tokenisation); the time per global batch is
printed with its ratio to the baseline, torch's RandomSampler + BatchSampler. Variants:

- paced, table unchanged: the steady state (a version check per global batch, then drawing).
- paced, table changed every batch: the worst case (weights recomputed for every problem each batch).
- with --ranks N: the same on N gloo processes, adding the broadcast that keeps ranks in agreement.
"""

from __future__ import annotations

import argparse
import os
import time

from nemo_paced.console import quiet_third_party; quiet_third_party()  # noqa: E702  (before torch & co. warn)
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, RandomSampler

from nemo_paced.passrates import PassRateTable
from nemo_paced.sampler import PacedSampler, SamplerConfig


def make_table(ids: list[str], seed: int = 0) -> PassRateTable:
    rng = np.random.default_rng(seed)
    table = PassRateTable()
    table.update([(i, int(k), 8) for i, k in zip(ids, rng.integers(0, 9, len(ids)))], step=0)
    return table


def time_baseline(n: int, args) -> float:
    per_step = args.global_batch // (args.micro_batch * args.dp)
    generator = torch.Generator().manual_seed(0)
    batches = iter(BatchSampler(RandomSampler(range(n), replacement=True, num_samples=10**9, generator=generator),
                                args.micro_batch, drop_last=True))
    start = time.perf_counter()
    for _ in range(args.batches):
        for _ in range(per_step * args.dp):  # a plain sampler walks the whole global batch on every rank
            next(batches)
    return (time.perf_counter() - start) / args.batches


def time_paced(ids: list[str], args, change_every_batch: bool, dp_rank: int = 0) -> float:
    table = make_table(ids)
    sampler = PacedSampler(ids, SamplerConfig(args.global_batch, args.micro_batch), table,
                           dp_rank=dp_rank, dp_size=args.dp)
    start = time.perf_counter()
    for step in range(args.batches):
        if change_every_batch:
            table.update([(ids[step], 4, 8)], step=step)
        for _ in range(sampler.micro_batches_per_step):
            next(sampler)
    return (time.perf_counter() - start) / args.batches


def _rank_main(rank: int, world: int, port: int, ids: list[str], args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for change in (False, True):
        dist.barrier()
        results[change] = time_paced(ids, args, change, dp_rank=rank % args.dp)
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def time_on_ranks(ids: list[str], args) -> tuple[float, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.ranks, port, ids, args, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = out.get(timeout=600)
    for p in procs:
        p.join()
    return results[False], results[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=17398, help="problem-set size (default: DAPO-Math-17k dedup)")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dp", type=int, default=8, help="data-parallel size the global batch is split over")
    parser.add_argument("--batches", type=int, default=200, help="global batches timed per variant")
    parser.add_argument("--ranks", type=int, default=2, help="gloo processes for the broadcast variant (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = [f"problem-{i}" for i in range(args.problems)]

    baseline = time_baseline(args.problems, args)
    rows = [("torch RandomSampler + BatchSampler (baseline)", baseline),
            ("PacedSampler, table unchanged", time_paced(ids, args, False)),
            ("PacedSampler, table changed every batch", time_paced(ids, args, True))]
    if args.ranks > 1:
        steady, changing = time_on_ranks(ids, args)
        rows += [(f"PacedSampler on {args.ranks} gloo ranks, table unchanged", steady),
                 (f"PacedSampler on {args.ranks} gloo ranks, table changed every batch", changing)]
    print(f"{args.problems} problems, global batch {args.global_batch}, micro-batch {args.micro_batch}, "
          f"DP {args.dp}, {args.batches} global batches per variant\n")
    for name, seconds in rows:
        print(f"{name:<58} {seconds * 1e3:8.3f} ms/global batch  {seconds / baseline:6.2f}x")


if __name__ == "__main__":
    main()
