"""Input checks of the Paced forward step (the schedule tests are in test_megatron_distill.py)."""

from __future__ import annotations

import pytest
import torch

from nemo_paced.megatron.step import PacedForwardStep, _check_batch


def batch(**changes):
    b = dict(tokens=torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long),
             loss_mask=torch.ones(2, 4), position_ids=torch.arange(4).expand(2, 4),
             sample_weight=torch.tensor([0.25, 0.0]))
    b.update(changes)
    return {k: v for k, v in b.items() if v is not None}


def test_good_batch_passes_through():
    out = _check_batch(batch(problem_ids=["a", "b"]))
    assert torch.equal(out["sample_weight"], torch.tensor([0.25, 0.0])) and out["problem_ids"] == ["a", "b"]


@pytest.mark.parametrize("changes,message", [
    (dict(sample_weight=None), r"lacks \['sample_weight'\]"),
    (dict(loss_mask=None, labels=None), r"lacks \['labels', 'loss_mask'\]"),
    (dict(sample_weight=torch.tensor([0.5])), r"one value per sequence, shape \(2,\); got \(1,\)"),
    (dict(sample_weight=torch.tensor([0.5, -1.0])), r"finite floats >= 0; got \[0.5, -1.0\]"),
    (dict(sample_weight=torch.tensor([0.5, float("nan")])), "finite floats >= 0"),
    (dict(sample_weight=torch.tensor([1, 0])), "finite floats"),
])
def test_bad_batches_are_named(changes, message):
    with pytest.raises((KeyError, ValueError), match=message):
        _check_batch(batch(**changes))


def test_bins_must_increase():
    with pytest.raises(ValueError, match="increasing edges"):
        PacedForwardStep(pass_rate_bins=(0.5, 0.25))
    with pytest.raises(TypeError, match="call as"):
        PacedForwardStep(num_microbatches=1)(iter([]))


def test_step_buffer_hands_out_exactly_the_filled_step():
    from nemo_paced.megatron.data import StepBuffer

    stream = StepBuffer(iter(range(10)))
    with pytest.raises(RuntimeError, match="not read ahead"):
        next(stream)
    stream.fill(3)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.fill(3)
    next(stream)
    with pytest.raises(RuntimeError, match="2 micro-batches of the previous step were not used"):
        stream.fill(3)
