"""The loss Bridge's `pretrain()` logs is the Paced objective of the step's data, number for number.

A tiny fkl stage at TP=2 records the micro-batches of its first step and the loss and gradient norm
Bridge logs for it (stage.py). Step 1 runs on the loaded weights, before any update, so `reference.py`
recomputes both from those micro-batches and the same Hugging Face directories with transformers in
float64, without Megatron, ModelOpt or the Paced step: the weighting, the per-sequence token mean, the
normalisation by the step's weight sum and the vocabulary-parallel KL all have to be right for the
numbers to agree. A wrong weighting (unweighted mean) or normalisation (per micro-batch) was tried in the
Paced step and fails here (docs/bridge.md).
"""

from __future__ import annotations

import math

import pytest

from reference import paced_step

pytestmark = pytest.mark.timeout(900)

RTOL_LOSS, RTOL_GRAD = 1e-5, 1e-4


def check_step_one(run, tiny_models, direction: str, rank: int = 0, init=None) -> None:
    """Bridge's step-1 loss report and gradient norm on `rank` against the float64 reference."""
    ref = paced_step(tiny_models.teacher, init or tiny_models.student, run.first_batches(rank), direction)
    # the reference agrees with nemo_paced.loss on the same logits (fp32)
    assert math.isclose(ref.nemo_paced_loss, ref.loss, rel_tol=1e-5), ref
    # the step's weights differ, so a wrong weighting would show: the weighted loss is not the plain mean
    assert len(set(ref.weights)) > 1 and abs(ref.loss - ref.unweighted) > 1e-3 * ref.loss, ref
    logged = run.steps(rank)[1]
    print(f"step 1 on rank {rank}: Bridge paced kl {logged['paced kl']!r} grad norm {run.grad_norms(rank)[1]!r}; "
          f"float64 reference {ref.loss!r} / {ref.grad_norm!r} (unweighted {ref.unweighted!r})")
    assert math.isclose(logged["paced kl"], ref.loss, rel_tol=RTOL_LOSS), (logged, ref)
    assert math.isclose(logged["kl"], ref.unweighted, rel_tol=RTOL_LOSS), (logged, ref)
    assert math.isclose(logged["mean weight"], sum(ref.weights) / len(ref.weights), rel_tol=1e-6), (logged, ref)
    assert math.isclose(run.grad_norms(rank)[1], ref.grad_norm, rel_tol=RTOL_GRAD), (run.grad_norms(rank), ref)


def test_fkl_loss_and_grad_norm_at_tp2_match_the_float64_reference(bridge_stage, tiny_models, tmp_path):
    one_step = ["model.tensor_model_parallel_size=2", "train.train_iters=1", "dataset.refresh_every=1000"]
    run = bridge_stage(tmp_path / "fkl", "fkl", nproc=2, overrides=one_step)
    assert run.code == 0, run.log[-6000:]
    batches = run.first_batches(0)
    assert len(batches) == 4  # global batch 4, micro-batch 1, DP=1
    # both TP ranks read the same micro-batches (one data-parallel replica)
    for mine, theirs in zip(batches, run.first_batches(1)):
        assert mine["tokens"].equal(theirs["tokens"]) and mine["sample_weight"].equal(theirs["sample_weight"])
    check_step_one(run, tiny_models, "forward")
