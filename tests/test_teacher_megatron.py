"""Training without the teacher in the job through megatron-core's real schedules, on CPU under gloo:
a plain GPT student (no distillation model, no teacher weights) trained by `TopKTeacherStep` on
micro-batches that carry a teacher's top-k log-probs (as the teacher cache or service supplies them).
TP=2 x PP=2 on 4 ranks must reproduce the TP=1, PP=1 run's losses and gradients, for the bucket forward
KL and for the sampled-token reverse-KL estimator; the reference's loss is checked against topk_kl on
the full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gloo_ranks import run_ranks
from test_megatron_distill import (GLOBAL_BATCH, MICRO, SEQ, STUDENT, VOCAB, gathered_grads, global_batch, gpt,
                                   microbatches, to_numpy)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

K, STEPS, LR = 8, 3, 0.2


def teacher_batch() -> dict[str, torch.Tensor]:
    """The shared global batch plus a teacher's top-k and the log-prob of every label token."""
    batch = global_batch()
    g = torch.Generator().manual_seed(11)
    logprobs = torch.log_softmax(3 * torch.randn(GLOBAL_BATCH, SEQ, VOCAB, generator=g), -1)
    values, ids = torch.topk(logprobs, K, dim=-1)
    token = logprobs.gather(-1, batch["labels"][..., None]).squeeze(-1)
    return {**batch, "teacher_ids": ids, "teacher_logprobs": values, "teacher_token_logprobs": token}


class Student:
    def __init__(self, tp: int, pp: int):
        import megatron_shims

        megatron_shims.apply()
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        self.ps = ps
        self.model = gpt(STUDENT, seed=1, gain=1.0, tp=tp, pp=pp)
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.ddp = DistributedDataParallel(self.model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=False, overlap_grad_reduce=False), self.model)
        self.params = dict(self.model.named_parameters())

    def step(self, mbs, forward_step) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.ddp.zero_grad_buffer()
        return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs), model=[self.ddp],
                                           num_microbatches=len(mbs), seq_length=SEQ, micro_batch_size=MICRO,
                                           decoder_seq_length=SEQ, forward_only=False)

    def full_grads(self) -> dict[str, torch.Tensor]:
        return gathered_grads(self.params, self.model.config)

    def close(self) -> None:
        from megatron.core import tensor_parallel

        self.ps.destroy_model_parallel()
        tensor_parallel.get_cuda_rng_tracker().reset()


def train(tp: int, pp: int, direction: str, estimator: str, check_full: bool = False) -> dict:
    from nemo_paced.megatron.step import TopKTeacherStep

    s = Student(tp, pp)
    batch = teacher_batch()
    sums, grads, full = [], None, None
    if check_full:  # the TP=1 reference: the schedule's loss against topk_kl on the full logits, by hand
        from nemo_paced.loss import paced_reduce, sampled_reverse_kl, topk_kl

        with torch.no_grad():
            logits = s.model(batch["tokens"], batch["position_ids"], None)
        per_token = (sampled_reverse_kl(logits, batch["labels"], batch["teacher_token_logprobs"])
                     if estimator == "sampled" else
                     topk_kl(logits, batch["teacher_ids"], batch["teacher_logprobs"], direction=direction))
        weighted, weight = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
        full = float(weighted / weight)
    for step in range(STEPS):
        reports = s.step(microbatches(batch, range(GLOBAL_BATCH), MICRO),
                         TopKTeacherStep(direction, estimator, num_microbatches=GLOBAL_BATCH // MICRO))
        sums.append(sum((r["paced kl"] for r in reports), torch.zeros(2)) if reports else None)
        if step == 0:
            grads = s.full_grads()
        with torch.no_grad():
            for param in s.params.values():
                param.add_(param.main_grad, alpha=-LR)
    out = dict(is_last=s.ps.is_pipeline_last_stage(), tp_rank=s.ps.get_tensor_model_parallel_rank(), sums=sums,
               grads=grads, full=full)
    s.close()
    return to_numpy(out)


CASES = (("forward", "topk"), ("reverse", "sampled"), ("reverse", "topk"))


def layouts(rank: int, world_size: int, tp: int, pp: int) -> dict:
    return {case: train(tp, pp, *case, check_full=tp * pp == 1) for case in CASES}


@pytest.fixture(scope="module")
def runs():
    reference = run_ranks(layouts, 1, 1, 1, timeout=900)[0]
    parallel = run_ranks(layouts, 4, 2, 2, timeout=900)
    return reference, parallel


@pytest.mark.parametrize("case", CASES)
def test_tp2_pp2_reproduces_tp1_without_a_teacher_in_the_job(runs, case):
    reference, parallel = runs
    ref = reference[case]
    assert ref["sums"][0][0] == pytest.approx(ref["full"], rel=1e-5)  # the step's loss is topk_kl's, weighted
    last = [r[case] for r in parallel if r[case]["is_last"]]
    assert last
    for r in last:
        for got, want in zip(r["sums"], ref["sums"]):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    grads = {}
    for r in parallel:
        if r[case]["tp_rank"] == 0:
            grads.update(r[case]["grads"])
    assert grads.keys() == ref["grads"].keys()
    for name, want in ref["grads"].items():
        np.testing.assert_allclose(grads[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
