import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks


def _all_reduce_rank(rank: int, world_size: int, scale: float) -> torch.Tensor:
    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    assert rank != 1, "rank one refuses"


@pytest.mark.distributed
def test_ranks_really_communicate():
    out = run_ranks(_all_reduce_rank, 3, 2.0)
    assert [float(t) for t in out] == [6.0, 6.0, 6.0]


@pytest.mark.distributed
def test_failure_on_one_rank_is_reported():
    with pytest.raises(AssertionError, match="rank one refuses"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
