import json
import logging
import os

import numpy as np
import pytest
from scipy.stats import chisquare

from nemo_paced.passrates import PassRateTable
from nemo_paced.sampler import AllWeightsZero, PacedSampler, SamplerConfig, TableFile, draw_global_batch
from nemo_paced.weighting import WeightConfig

# successes out of K = 8 for problems p0..p6: p = 0, 1/8, 2/8, 4/8, 6/8, 7/8, 1
SUCCESSES = [0, 1, 2, 4, 6, 7, 8]
IDS = [f"p{i}" for i in range(len(SUCCESSES))]


def table(successes=SUCCESSES, step=100) -> PassRateTable:
    t = PassRateTable()
    t.update([(i, s, 8) for i, s in zip(IDS, successes)], checkpoint="ckpt", step=step)
    return t


def sampler(mode="loss", global_batch=64, micro=8, dp_rank=0, dp_size=1, source=None, **options) -> PacedSampler:
    config = SamplerConfig(global_batch, micro, WeightConfig(mode=mode), seed=7, **options)
    return PacedSampler(IDS, config, table() if source is None else source, dp_rank=dp_rank, dp_size=dp_size)


def drawn(s: PacedSampler, micro_batches: int):
    draws = [next(s) for _ in range(micro_batches)]
    return np.concatenate([d.indices for d in draws]), np.concatenate([d.weights for d in draws]), draws


def test_sample_mode_frequencies_follow_the_beta_kernel():
    p = np.array(SUCCESSES) / 8
    w = p * (1 - p)
    indices, weights, _ = drawn(sampler("sample"), 8 * 300)  # 300 global batches of 64
    counts = np.bincount(indices, minlength=len(IDS))
    assert counts[0] == 0 and counts[-1] == 0  # p = 0 and p = 1 are never drawn
    kept = w > 0
    assert chisquare(counts[kept], counts.sum() * w[kept] / w[kept].sum()).pvalue > 1e-3
    assert set(weights.tolist()) == {1.0}


def test_loss_mode_draws_uniformly_among_positive_weights_and_carries_w():
    p = np.array(SUCCESSES) / 8
    indices, weights, draws = drawn(sampler("loss"), 8 * 300)
    counts = np.bincount(indices, minlength=len(IDS))
    assert counts[0] == 0 and counts[-1] == 0
    assert chisquare(counts[1:-1]).pvalue > 1e-3  # uniform over the 5 frontier problems
    np.testing.assert_allclose(weights, (p * (1 - p))[indices], rtol=1e-6)
    assert draws[0].problem_ids == [IDS[i] for i in draws[0].indices]


def test_filter_and_uniform_modes():
    indices, weights, _ = drawn(sampler("filter"), 8 * 50)
    counts = np.bincount(indices, minlength=len(IDS))
    assert set(np.flatnonzero(counts).tolist()) == {2, 3, 4}  # 0.2 < p < 0.8: 2/8, 4/8, 6/8
    assert chisquare(counts[2:5]).pvalue > 1e-3  # uniform inside the band
    assert set(weights.tolist()) == {1.0}
    indices, weights, _ = drawn(sampler("uniform"), 8 * 50)
    assert set(np.unique(indices).tolist()) == set(range(len(IDS)))


def test_dp_shards_are_disjoint_slices_that_cover_the_global_batch():
    reference, _, _ = drawn(sampler(global_batch=48, micro=4), 12 * 3)  # 3 global batches on one rank
    shards = [drawn(sampler(global_batch=48, micro=4, dp_rank=r, dp_size=4), 3 * 3)[2] for r in range(4)]
    for step in range(3):
        pieces = [np.concatenate([d.indices for d in shard[step * 3:(step + 1) * 3]]) for shard in shards]
        assert all(d.step == step for shard in shards for d in shard[step * 3:(step + 1) * 3])
        # rank r owns slots [12 r, 12 r + 12) of the global batch: disjoint, and together all 48
        np.testing.assert_array_equal(np.concatenate(pieces), reference[step * 48:(step + 1) * 48])


@pytest.mark.parametrize("stop_after", [16, 21])  # at a global-batch boundary, and inside a global batch
def test_resume_from_state_dict_continues_the_exact_sequence(stop_after):
    source = table()
    first = sampler(source=source)
    drawn(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON-like data
    source.update([("p3", 8, 8)], step=150)  # the table moves on while the job is down
    expected, expected_weights, _ = drawn(first, 20)
    resumed = sampler(source=source)
    resumed.load_state_dict(state)
    got, got_weights, _ = drawn(resumed, 20)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_weights, expected_weights)


def test_state_from_another_sampler_is_refused():
    state = sampler().state_dict()
    with pytest.raises(ValueError, match="seed"):
        PacedSampler(IDS, SamplerConfig(64, 8, seed=8), table()).load_state_dict(state)
    with pytest.raises(ValueError, match="problems"):
        PacedSampler(IDS[::-1], SamplerConfig(64, 8, seed=7), table()).load_state_dict(state)


def test_refresh_happens_only_at_global_batch_boundaries(caplog):
    source = table(step=100)
    s = sampler(source=source, global_batch=16, micro=4, first_step=120)
    with caplog.at_level(logging.INFO, logger="nemo_paced.sampler"):
        first = next(s)
        source.update([(i, 8, 8) for i in IDS if i != "p3"], step=118)  # only p3 is left at the frontier
        rest = [next(s) for _ in range(3)]
        after = next(s)
    assert first.table_version == 1 and all(d.table_version == 1 for d in rest)
    assert len(set(np.concatenate([d.indices for d in [first, *rest]]))) > 1  # still the old weights
    assert after.table_version == 2 and after.step == 121 and set(after.indices.tolist()) == {3}
    assert after.table_age == 121 - 118
    swaps = [r.getMessage() for r in caplog.records if "pass-rate table version" in r.getMessage()]
    assert "version 1 in use from step 120 (was None): age 20 steps" in swaps[0]
    assert "version 2 in use from step 121 (was 1): age 3 steps" in swaps[1]


def test_refresh_every_n_global_batches():
    source = table()
    s = sampler(source=source, global_batch=8, micro=8, refresh_every=3)
    next(s)
    source.update([("p3", 8, 8)])
    assert [next(s).table_version for _ in range(4)] == [1, 1, 2, 2]  # checked at steps 0, 3, 6, ...


def test_all_zero_weights_stop_the_stage_with_a_message():
    mastered = table([0, 8, 8, 8, 8, 0, 8])
    with pytest.raises(AllWeightsZero, match=r"all 7 problems have weight 0 .*'loss'.*2 at p=0, 5 at p=1"):
        next(sampler(source=mastered))


def test_all_zero_weights_named_uniform_fallback_is_logged(caplog):
    mastered = table([0, 8, 8, 8, 8, 0, 8])
    with caplog.at_level(logging.WARNING, logger="nemo_paced.sampler"):
        indices, weights, _ = drawn(sampler(source=mastered, on_all_zero="uniform"), 16)
    assert set(np.unique(indices).tolist()) == set(range(7)) and set(weights.tolist()) == {1.0}
    assert "on_all_zero='uniform'" in caplog.text


def test_unknown_problems_follow_the_policy():
    partial = PassRateTable()
    partial.update([("p3", 4, 8)])
    assert set(drawn(sampler(source=partial), 8)[0].tolist()) == {3}  # exclude: never drawn
    peak = drawn(sampler(source=partial, unknown="peak"), 80)[0]
    assert set(np.unique(peak).tolist()) == set(range(7))


def test_filter_mode_with_unknown_mean_draws_unweighted():
    """Once 0.5 for never-estimated problems, used as draw and loss weight in an unweighted mode."""
    partial = PassRateTable()
    partial.update([("p2", 4, 8), ("p3", 0, 8)])  # one of two in the band: mean 0.5
    indices, weights, _ = drawn(sampler("filter", source=partial, unknown="mean"), 80)
    assert set(np.unique(weights).tolist()) == {1.0}
    assert 3 not in indices and set(np.unique(indices).tolist()) == {0, 1, 2, 4, 5, 6}
    counts = np.bincount(indices, minlength=len(IDS))[[0, 1, 2, 4, 5, 6]]
    assert chisquare(counts).pvalue > 1e-3  # uniform among the kept, estimated or not


def test_table_file_source_rereads_a_changed_file(tmp_path):
    path = tmp_path / "passrates.jsonl"
    table().save(path)
    source = TableFile(path)
    s = sampler(source=source, global_batch=8, micro=8)
    assert next(s).table_version == 1
    newer = table()
    newer.update([("p3", 8, 8)])
    newer.save(path)
    assert next(s).table_version == 2


def _same_size_tables():
    """Two tables whose files have the same size: the second changes p3 from 4/8 to 6/8."""
    first = PassRateTable()
    first.update([(i, s, 8) for i, s in zip(IDS, SUCCESSES)], checkpoint="ckpt", step=100, now=1.0)
    second = PassRateTable()
    second.update([(i, s, 8) for i, s in zip(IDS, SUCCESSES)], checkpoint="ckpt", step=100, now=1.0)
    second.update([("p3", 6, 8)], checkpoint="ckpt", step=100, now=1.0)
    return first, second


def test_table_file_sees_a_same_size_save_within_one_timestamp_tick(tmp_path):
    """Lustre/NFS timestamps are coarse: two same-size atomic saves can share an mtime. The new
    inode of the atomic save tells them apart."""
    path = tmp_path / "passrates.jsonl"
    first, second = _same_size_tables()
    first.save(path)
    before = path.stat()
    source = TableFile(path)
    assert source().version == 1
    second.save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    table = source()
    assert table.version == 2 and table["p3"].successes == 6


def test_table_file_sees_a_new_header_version_in_a_reused_inode(tmp_path):
    """A freed inode number can be reused by a later save: the header version still tells."""
    path = tmp_path / "passrates.jsonl"
    first, second = _same_size_tables()
    first.save(path)
    before = path.stat()
    source = TableFile(path)
    assert source().version == 1
    staged = tmp_path / "second.jsonl"
    second.save(staged)
    with open(path, "r+b") as f:  # same inode, same size, same mtime: only the content differs
        f.write(staged.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert source().version == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of micro_batch_size \\* dp_size"):
        sampler(global_batch=60, micro=8, dp_size=2)
    with pytest.raises(ValueError, match="on_all_zero must be one of stop, uniform"):
        SamplerConfig(8, on_all_zero="ignore")
    with pytest.raises(ValueError, match="dp_rank"):
        sampler(dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="unique"):
        PacedSampler(["a", "a"], SamplerConfig(8), table())
    with pytest.raises(ValueError, match="mode must be one of"):
        SamplerConfig(8, weighting={"mode": "soft"})
    assert SamplerConfig(8, weighting={"mode": "sample"}).weighting == WeightConfig(mode="sample")  # from YAML


def test_draw_never_returns_a_zero_weight_index_at_the_edges():
    weights = np.array([0.0, 1e-300, 0.0, 1.0, 0.0])
    indices = np.concatenate([draw_global_batch(np.cumsum(weights), 1000, seed, 0) for seed in range(20)])
    assert set(np.unique(indices).tolist()) <= {1, 3}


def test_a_failed_collate_is_retried_with_the_same_draw():
    calls = []

    def flaky(draw):
        calls.append(draw.indices.tolist())
        if len(calls) == 1:
            raise ConnectionError("service briefly down")
        return draw

    s = PacedSampler(IDS, SamplerConfig(16, 4, seed=7), table(), collate=flaky)
    with pytest.raises(ConnectionError):
        next(s)
    assert next(s).indices.tolist() == calls[0] and s.step == 0
