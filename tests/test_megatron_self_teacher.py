"""Self-distillation through megatron-core's real schedules, on CPU under gloo.

A tiny GPT student scores its own samples twice: as the student on the question, and as its
self-teacher on the question with privileged context (`current`: its own weights under no_grad;
`initial`: a frozen copy). Teacher rows are built by `nemo_paced.self_teacher.align`, so prompts of
different lengths, a response cut in the teacher row and a row left without tokens are all there.
The TP=1, PP=1 run is checked against the loss and the autograd gradient computed here from full
logits with the teacher pass detached (and that gradient is shown to differ from the one a teacher
pass with gradient would give); TP=2 x PP=2, PP=2 x DP=2 and TP=2 x DP=2 must reproduce its losses
and student gradients over several SGD steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from gloo_ranks import run_ranks
from test_megatron_distill import STUDENT, _close, _global_name, gathered_grads, gpt, microbatches, to_numpy

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, SEQ, GLOBAL_BATCH, MICRO = 96, 8, 8, 2
WEIGHTS = [0.25, 0.0, 0.5, 0.125, 1.0, 0.75, 0.1875, 0.25]
STEPS, LR = 3, 0.5
LAYOUTS = {"tp2xpp2": (2, 2), "pp2-dp2": (1, 2), "tp2-dp2": (2, 1)}  # all on 4 ranks


def global_batch() -> dict[str, torch.Tensor]:
    """Student rows (prompt + own sample) and their teacher rows (context + prompt + the same sample)."""
    from nemo_paced.batches import collate, encode_row
    from nemo_paced.self_teacher import align

    g = torch.Generator().manual_seed(11)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    prompts, teacher_prompts, responses = [], [], []
    for i in range(GLOBAL_BATCH):
        prompt = ids(2 + i % 2)
        prompts.append(prompt)
        teacher_prompts.append(ids(1 + i % 3) + prompt)
        responses.append(ids(3 + i % 4))
    teacher_prompts[5] = ids(SEQ + 1)  # a context so long that the teacher row holds no response token
    batch = collate([encode_row(p, r, SEQ, pad_id=0) for p, r in zip(prompts, responses)], WEIGHTS,
                    [f"p{i}" for i in range(GLOBAL_BATCH)])
    rows = align([len(p) for p in prompts], teacher_prompts, responses, batch["loss_mask"], SEQ, pad_id=0)
    del batch["problem_ids"]
    return {**batch, "loss_mask": rows.loss_mask, "sample_weight": batch["sample_weight"] * (rows.loss_mask.sum(-1) > 0),
            "teacher_tokens": rows.tokens, "teacher_position_ids": rows.position_ids, "teacher_index": rows.index}


class Harness:
    def __init__(self, tp: int, pp: int, weights: str):
        import megatron_shims

        megatron_shims.apply()
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from nemo_paced.megatron.self_teacher import SelfDistillationModel, initial_copy

        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
        self.ps = ps
        build = lambda seed: gpt(STUDENT, seed=seed, gain=2.0, tp=tp, pp=pp)  # noqa: E731
        student = build(1)
        self.model = SelfDistillationModel(student, initial_copy(student, lambda: build(9)) if weights == "initial"
                                           else None)
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.ddp = DistributedDataParallel(self.model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=False, overlap_grad_reduce=False), self.model)
        self.student_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def my_rows(self) -> range:
        per_rank = GLOBAL_BATCH // self.dp
        return range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def step(self, mbs) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_paced.megatron.self_teacher import SelfDistillForwardStep, tensor_shapes_adjust_fn

        self.ddp.zero_grad_buffer()
        return get_forward_backward_func()(
            forward_step_func=SelfDistillForwardStep(num_microbatches=len(mbs)), data_iterator=iter(mbs),
            model=[self.ddp], num_microbatches=len(mbs), seq_length=SEQ, micro_batch_size=MICRO,
            decoder_seq_length=SEQ, forward_only=False, adjust_tensor_shapes_fn=tensor_shapes_adjust_fn(self.ddp))

    def full_grads(self) -> dict[str, torch.Tensor]:
        return gathered_grads(self.student_params, self.model.config)

    def sgd(self) -> None:
        with torch.no_grad():
            for param in self.student_params.values():
                param.add_(param.main_grad, alpha=-LR)


def train(h: Harness) -> dict:
    """STEPS SGD steps on the global batch: the loss sums of every step, the first step's gradients."""
    frozen_before = None if h.model.initial is None else {
        k: v.clone() for k, v in h.model.initial.state_dict().items() if isinstance(v, torch.Tensor)}
    batch = global_batch()
    sums, grads = [], None
    for step in range(STEPS):
        reports = h.step(microbatches(batch, h.my_rows(), MICRO))
        sums.append(sum((r["paced kl"] for r in reports), torch.zeros(2)) if reports else None)
        if step == 0:
            grads = h.full_grads()
        h.sgd()
    out = dict(is_last=h.ps.is_pipeline_last_stage(), tp_rank=h.ps.get_tensor_model_parallel_rank(),
               dp_rank=h.dp_rank, sums=sums, grads=grads)
    if frozen_before is not None:
        after = h.model.initial.state_dict()
        out["initial_unchanged"] = all(torch.equal(v, after[k]) for k, v in frozen_before.items())
        out["initial_untrainable"] = all(not p.requires_grad and p.grad is None and getattr(p, "main_grad", None) is None
                                         for p in h.model.initial.parameters())
    return out


def hand_check(h: Harness) -> dict:
    """At TP=1, PP=1: the loss and gradient computed here from full logits, with the teacher pass
    detached (what self-distillation must do) and with gradient through it (what it must not)."""
    from nemo_paced.self_teacher import gather_aligned

    batch = global_batch()
    student = h.model.student

    def loss(detach: bool) -> torch.Tensor:
        s = student(batch["tokens"], batch["position_ids"], None).float().log_softmax(-1)
        with torch.set_grad_enabled(not detach):
            t = gather_aligned(student(batch["teacher_tokens"], batch["teacher_position_ids"], None), batch["teacher_index"])
            t = t.float().log_softmax(-1)
        per_token = (s.exp() * (s - t)).sum(-1)  # KL(student || self-teacher)
        mask = batch["loss_mask"]
        tokens = mask.sum(-1)
        w = batch["sample_weight"]
        return (w * (per_token * mask).sum(-1) / tokens.clamp(min=1)).sum() / w.sum()

    out = {}
    for detach in (True, False):
        student.zero_grad(set_to_none=True)
        value = loss(detach)
        grads = torch.autograd.grad(value, [p for p in h.student_params.values()])
        out["detached" if detach else "through_teacher"] = (value.item(), {
            _global_name(n, 0): g for n, g in zip(h.student_params, grads)})
    return out


def reference_run(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    out = {}
    for weights in ("current", "initial"):
        h = Harness(1, 1, weights)
        if weights == "current":
            out["hand"] = hand_check(h)
        out[weights] = train(h)
        ps.destroy_model_parallel()
        tensor_parallel.get_cuda_rng_tracker().reset()
    return to_numpy(out)


def layouts_run(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    results = {}
    for name, (tp, pp) in LAYOUTS.items():
        for weights in ("current", "initial") if name == "tp2xpp2" else ("current",):
            results[(name, weights)] = to_numpy(train(Harness(tp, pp, weights)))
            ps.destroy_model_parallel()
            tensor_parallel.get_cuda_rng_tracker().reset()
    return results


@pytest.fixture(scope="module")
def reference():
    return run_ranks(reference_run, 1)[0]


@pytest.fixture(scope="module")
def layouts():
    return run_ranks(layouts_run, 4)


def _loss(sums) -> float:
    return (sums[0] / sums[1]).item()


def test_batch_has_a_cut_teacher_row_and_an_empty_one():
    batch = global_batch()
    assert batch["sample_weight"][5] == 0 and batch["loss_mask"][5].sum() == 0  # no room in the teacher row
    student_tokens = (batch["tokens"] != 0).sum(-1) - torch.tensor([2 + i % 2 for i in range(GLOBAL_BATCH)])
    assert (batch["loss_mask"].sum(-1) < student_tokens).sum() >= 2  # teacher rows cut some responses short


def test_loss_and_gradient_are_reverse_kl_to_the_detached_self_teacher(reference):
    loss, grads = reference["hand"]["detached"]
    assert _loss(reference["current"]["sums"][0]) == pytest.approx(loss, rel=1e-5)
    _close(reference["current"]["grads"], grads)


def test_no_gradient_flows_through_the_teacher_pass(reference):
    """Had the teacher pass kept its graph, the gradient would be the other one; it is measurably apart."""
    _, detached = reference["hand"]["detached"]
    _, through = reference["hand"]["through_teacher"]
    gap = max(float(abs(detached[n] - through[n]).max()) for n in detached)
    assert gap > 1e-3
    _close(reference["current"]["grads"], detached)


def test_initial_teacher_is_frozen_and_current_follows_the_student(reference):
    current, initial = reference["current"], reference["initial"]
    assert _loss(current["sums"][0]) == pytest.approx(_loss(initial["sums"][0]), rel=1e-6)  # same weights at step 0
    _close(current["grads"], initial["grads"])
    assert _loss(current["sums"][-1]) != pytest.approx(_loss(initial["sums"][-1]), rel=1e-3)
    assert initial["initial_unchanged"] and initial["initial_untrainable"]
    kl = [_loss(s) for s in current["sums"]]
    assert kl[-1] < kl[0], kl


@pytest.mark.parametrize("layout,weights", [("tp2xpp2", "current"), ("tp2xpp2", "initial"),
                                            ("pp2-dp2", "current"), ("tp2-dp2", "current")])
def test_parallel_layout_matches_single_process(reference, layouts, layout, weights):
    ranks = [by_layout[(layout, weights)] for by_layout in layouts]
    ref = reference[weights]
    last = [r for r in ranks if r["is_last"]]
    assert sorted(r["dp_rank"] for r in last if r["tp_rank"] == 0) == list(range(4 // math.prod(LAYOUTS[layout])))
    for step, ref_sums in enumerate(ref["sums"]):
        total = sum({r["dp_rank"]: r["sums"][step] for r in last}.values())
        assert _loss(total) == pytest.approx(_loss(ref_sums), rel=1e-4)
    grads = {}
    for r in ranks:
        if r["tp_rank"] == 0 and r["dp_rank"] == 0:
            grads.update(r["grads"])
    _close(grads, ref["grads"])
    if weights == "initial":
        assert all(r["initial_unchanged"] and r["initial_untrainable"] for r in ranks)
