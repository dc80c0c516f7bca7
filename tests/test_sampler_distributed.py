"""PacedSampler on real gloo ranks: TP peers identical, DP shards disjoint, refreshes agreed."""

import numpy as np
import pytest
import torch.distributed as dist

from gloo_ranks import run_ranks
from nemo_paced.passrates import PassRateTable
from nemo_paced.sampler import PacedSampler, SamplerConfig, reader_group
from nemo_paced.weighting import WeightConfig

IDS = [f"p{i}" for i in range(12)]
CONFIG = SamplerConfig(global_batch_size=16, micro_batch_size=4, weighting=WeightConfig(mode="loss"), seed=3)
STEPS = 3


def _table() -> PassRateTable:
    table = PassRateTable()
    table.update([(i, n % 9, 8) for n, i in enumerate(IDS)], step=0)
    return table


def _evolve(table: PassRateTable, step: int, micro: int) -> None:
    """The trainer's view of the service: new estimates land at arbitrary points, not only at boundaries."""
    if (step, micro) == (0, 1):
        table.update([(i, 4, 8) for i in IDS[:4]] + [(i, 8, 8) for i in IDS[4:8]], step=1)
    if (step, micro) == (1, 0):
        table.update([(i, 0, 8) for i in IDS[:2]], step=2)


def _refuse():
    raise AssertionError("only the first rank of the group may read the table")


def _run(sampler: PacedSampler, table: PassRateTable | None) -> list[tuple]:
    out = []
    for step in range(STEPS):
        for micro in range(sampler.micro_batches_per_step):
            draw = next(sampler)
            out.append((draw.step, draw.micro, draw.indices.tolist(), draw.weights.tolist(), draw.table_version))
            if table is not None:
                _evolve(table, step, micro)
    return out


def _ranks(rank: int, world_size: int) -> dict:
    # TP2 x DP2: TP groups {0, 1} and {2, 3}; DP rank = rank // 2. The sampler agrees over the world.
    table = _table() if rank == 0 else None
    sampler = PacedSampler(IDS, CONFIG, table if rank == 0 else _refuse, dp_rank=rank // 2, dp_size=2)
    tp_layout = _run(sampler, table)
    replica = reader_group(True, replica=rank // 2)  # the peers that must share on-policy samples
    replica_ranks = dist.get_process_group_ranks(replica)
    # PP4 with one DP replica: only the first and last stages read data, agreeing inside their group.
    readers = reader_group(rank in (0, 3))
    pp_layout = None
    if rank in (0, 3):
        mine = _table() if rank == 0 else PassRateTable()  # rank 3's table would give other draws
        sampler = PacedSampler(IDS, CONFIG, mine, group=readers)
        pp_layout = _run(sampler, mine if rank == 0 else None)
    dist.barrier()
    return {"tp": tp_layout, "pp": pp_layout, "replica": replica_ranks, "reader": readers is not None}


@pytest.mark.distributed
def test_tp_peers_see_identical_batches_and_dp_shards_cover_the_global_batch():
    results = run_ranks(_ranks, 4, timeout=240)
    tp = [r["tp"] for r in results]
    assert tp[0] == tp[1] and tp[2] == tp[3]  # TP peers: same samples, weights and versions
    assert [d[4] for d in tp[0]] == [d[4] for d in tp[2]] == [1, 1, 2, 2, 3, 3]  # refreshes agreed, at boundaries

    table = _table()  # single-process reference with the same table history
    reference = _run(PacedSampler(IDS, CONFIG, table), table)
    for step in range(STEPS):
        shards = [np.concatenate([d[2] for d in rank if d[0] == step]) for rank in (tp[0], tp[2])]
        expected = np.concatenate([d[2] for d in reference if d[0] == step])
        np.testing.assert_array_equal(np.concatenate(shards), expected)  # DP0 then DP1 slot order = the global batch
        weights = np.concatenate([d[3] for rank in (tp[0], tp[2]) for d in rank if d[0] == step])
        np.testing.assert_allclose(weights, np.concatenate([d[3] for d in reference if d[0] == step]))

    assert [r["replica"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["reader"] for r in results] == [True, False, False, True]

    pp = [r["pp"] for r in results]
    assert pp[1] is None and pp[2] is None
    assert pp[0] == pp[3] == reference  # first and last stage read the same batches as the reference
