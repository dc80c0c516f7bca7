"""paced_reduce: per-sequence token means weighted per problem, with global normalisation."""

import pytest
import torch

from nemo_paced.loss import paced_reduce


def test_weighted_token_means_and_weight_sum():
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    w = torch.tensor([0.5, 0.25, 2.0])
    total, weight = paced_reduce(kl, mask, w)
    assert total.item() == pytest.approx(0.5 * 2.5 + 0.25 * 25.0 + 2.0 * 5.0)
    assert weight.item() == pytest.approx(2.75)


def test_empty_and_zero_weight_sequences_add_nothing_even_with_inf_kl():
    kl = torch.tensor([[float("inf"), 1.0], [float("nan"), 3.0], [2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = torch.tensor([1.0, 1.0, 0.0])   # row 0: no response tokens; row 2: weight 0
    total, weight = paced_reduce(kl, mask, w)
    assert total.item() == 3.0 and weight.item() == 1.0
    total.backward()
    assert torch.equal(kl.grad, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_all_zero_batch_is_zero_not_nan():
    total, weight = paced_reduce(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2))
    assert total.item() == 0.0 and weight.item() == 0.0


def test_split_into_micro_batches_gives_the_global_result():
    g = torch.Generator().manual_seed(0)
    kl, mask, w = torch.rand(8, 6, generator=g), torch.rand(8, 6, generator=g) > 0.4, torch.rand(8, generator=g)
    total, weight = paced_reduce(kl, mask, w)
    parts = [paced_reduce(kl[i:i + 3], mask[i:i + 3], w[i:i + 3]) for i in range(0, 8, 3)]
    torch.testing.assert_close(sum(p[0] for p in parts) / sum(p[1] for p in parts), total / weight)


def test_gradient_is_weight_over_token_count():
    kl = torch.rand(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    total, _ = paced_reduce(kl, mask, torch.tensor([3.0, 2.0]))
    total.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([[1.5, 1.5, 0, 0], [0.5, 0.5, 0.5, 0.5]]))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="loss_mask"):
        paced_reduce(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="sample_weight"):
        paced_reduce(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"bad rows \[1\]"):
        paced_reduce(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([1.0, -1.0]))
