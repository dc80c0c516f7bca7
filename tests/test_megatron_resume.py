"""The data stream's state beside Megatron checkpoints (nemo_paced.megatron.resume), with a real sampler."""

import numpy as np
import pytest

from nemo_paced.megatron.resume import KEEP, restore_stream, save_stream_state, state_path
from nemo_paced.passrates import PassRateTable
from nemo_paced.sampler import PacedSampler, SamplerConfig
from nemo_paced.weighting import WeightConfig

IDS = [f"p{i}" for i in range(7)]


def table(successes=(0, 1, 2, 4, 6, 7, 8)) -> PassRateTable:
    t = PassRateTable()
    t.update([(i, s, 8) for i, s in zip(IDS, successes)], checkpoint="ckpt", step=0)
    return t


def sampler(source: PassRateTable) -> PacedSampler:
    return PacedSampler(IDS, SamplerConfig(16, 4, WeightConfig(mode="loss"), seed=3), source)


def steps(s: PacedSampler, n: int) -> list[list[str]]:
    """The problems of the next n global batches (4 micro-batches each)."""
    return [sum((next(s).problem_ids for _ in range(4)), []) for _ in range(n)]


def test_a_saved_state_resumes_exactly_though_the_table_moved_on(tmp_path):
    source = table()
    first = sampler(source)
    steps(first, 3)
    save_stream_state(tmp_path, first.state_dict())  # named by the stream's own position
    source.update([("p3", 8, 8), ("p0", 4, 8)], step=3)  # new evidence while the job was down
    resumed = sampler(source)
    assert restore_stream(resumed, tmp_path, 3) == "exact"
    assert steps(resumed, 4) == steps(first, 4)  # same draws, under the weights in force at the save


def test_without_a_state_file_the_stream_seeks_to_the_step_instead_of_replaying(tmp_path):
    first = sampler(table())
    start = steps(first, 3)
    resumed = sampler(table())
    assert restore_stream(resumed, tmp_path, 3) == "seek"
    assert steps(resumed, 2) == steps(first, 2)  # the same table: the draws of steps 3 and 4
    assert steps(sampler(table()), 3) == start  # a fresh stream would have replayed steps 0..2
    assert restore_stream(sampler(table()), None, 3) == "seek"  # no checkpoint directory configured


def test_a_fresh_run_reads_nothing_and_old_states_are_pruned(tmp_path):
    s = sampler(table())
    state_path(tmp_path, 0).parent.mkdir(parents=True)
    state_path(tmp_path, 0).write_text("not a sampler state")  # would fail to load if it were read
    assert restore_stream(s, tmp_path, 0) == "fresh"
    for _ in range(12):  # one file per step, checkpoints every 4 steps
        steps(s, 1)
        save_stream_state(tmp_path, s.state_dict(), interval=4)
    kept = sorted(int(p.stem[5:]) for p in state_path(tmp_path, 0).parent.iterdir())
    assert kept == [4, 8, 10, 11, 12]  # the newest KEEP, and the newest KEEP at checkpointed steps
    assert KEEP == 3 and not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_seek_refuses_a_step_before_the_first():
    s = PacedSampler(IDS, SamplerConfig(16, 4, seed=3, first_step=10), table())
    with pytest.raises(ValueError, match="before the sampler's first step 10"):
        s.seek(4)
    s.seek(12)
    assert s.step == 12 and np.all([d.step == 12 for d in (next(s) for _ in range(4))])
