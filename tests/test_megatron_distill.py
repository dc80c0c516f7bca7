"""The Paced distillation step through megatron-core's real schedules, on CPU under gloo.

Tiny GPT teacher and student (megatron-core local layer spec) are distilled with ModelOpt's
distillation model, the Paced KL criterion and `PacedForwardStep`, wrapped in megatron DDP with
`finalize_model_grads`, exactly as a GPU run is. Every layout on 4 ranks (TP=2 x PP=2, PP=2 x DP=2,
TP=2 x DP=2) starts from the same master weights and sees the same global batch as a TP=1, PP=1
reference, and must reproduce its losses and its student gradients over several SGD steps. The
reference run also checks the weighting against the hand formula
grad L = sum_x w_x grad l_x / sum_x w_x, and the losses against ones computed from full logits.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest
import torch

from gloo_ranks import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, SEQ, GLOBAL_BATCH, MICRO = 96, 8, 8, 2
STUDENT = dict(num_layers=2, hidden_size=16, num_attention_heads=4)
TEACHER = dict(num_layers=2, hidden_size=32, num_attention_heads=4)
WEIGHTS = [0.25, 0.0, 0.5, 0.125, 1.0, 0.75, 0.1875, 0.25]
PASS_RATES = [0.5, 1.0, 0.5, 0.125, 0.5, 0.25, 0.75, 0.875]
STEPS, LR = 4, 0.2
EMPTY = 6  # the sequence without response tokens


# --- data and models (run inside the spawned ranks) ----------------------------------------------

def global_batch(weights=WEIGHTS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ)
    loss_mask[:, :3] = 0  # prompt tokens
    loss_mask[2, 6:] = 0  # padding
    loss_mask[EMPTY] = 0  # a sequence with no response tokens: it must count for nothing
    return dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=loss_mask,
                position_ids=torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone(),
                sample_weight=torch.tensor(weights, dtype=torch.float32),
                pass_rate=torch.tensor(PASS_RATES, dtype=torch.float32))


def microbatches(batch, rows: range, size: int) -> list[dict[str, torch.Tensor]]:
    rows = list(rows)
    return [{k: v[rows[i:i + size]] for k, v in batch.items()} for i in range(0, len(rows), size)]


def _global_name(name: str, layer_offset: int) -> str:
    return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + layer_offset}.", name)


def _layer_offset(config) -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank() * (config.num_layers // config.pipeline_model_parallel_size)


def gathered_grads(params: dict[str, torch.nn.Parameter], config) -> dict[str, torch.Tensor]:
    """Gradients (`main_grad`) by global parameter name, tensor-parallel shards gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, offset = ps.get_tensor_model_parallel_world_size(), _layer_offset(config)
    grads = {}
    for name, param in params.items():
        grad = param.main_grad.detach().clone()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
            grad = torch.cat(parts, param.partition_dim)
        grads[_global_name(name, offset)] = grad
    return grads


def load_master_weights(model, seed: int, gain: float) -> None:
    """Give every parameter a value that depends only on its global name, then take this rank's shard,
    so all layouts hold the same model as the TP=1, PP=1 reference."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset = _layer_offset(model.config)
    for name, param in model.named_parameters():
        sharded = getattr(param, "tensor_model_parallel", False)
        shape = list(param.shape)
        if sharded:
            shape[param.partition_dim] *= tp
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(_global_name(name, offset).encode()))
        full = torch.randn(shape, generator=g)
        if full.dim() == 2:
            full *= gain / shape[-1] ** 0.5
        elif "norm" in name and name.endswith("weight"):
            full = 1 + 0.1 * full
        else:
            full *= 0.02
        param.data.copy_(full.chunk(tp, param.partition_dim)[tp_rank] if sharded else full)


def gpt(shape: dict, seed: int, gain: float, tp: int, pp: int, vocab: int = VOCAB):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(**shape, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               pipeline_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0,
                               attention_dropout=0.0, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
                               masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                               calculate_per_token_loss=True)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=False)
    load_master_weights(model, seed, gain)
    return model


class Harness:
    """One rank's distillation model, DDP wrapper and a `step` that runs the real schedule once."""

    def __init__(self, tp: int, pp: int, stage: str = "fkl"):
        import megatron_shims

        megatron_shims.apply()
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from nemo_paced.megatron.teacher import distillation_model

        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
        self.ps = ps
        self.teacher = gpt(TEACHER, seed=2, gain=3.0, tp=tp, pp=pp)
        self.kd = distillation_model(gpt(STUDENT, seed=1, gain=1.0, tp=tp, pp=pp), self.teacher, stage)
        self.kd.config.finalize_model_grads_func = finalize_model_grads
        self.ddp = DistributedDataParallel(self.kd.config, DistributedDataParallelConfig(
            use_distributed_optimizer=False, overlap_grad_reduce=False), self.kd)
        self.student_params = {n: p for n, p in self.kd.named_parameters() if p.requires_grad}
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def my_rows(self) -> range:
        per_rank = GLOBAL_BATCH // self.dp
        return range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def step(self, mbs, micro: int, forward_step=None, num_microbatches: int | None = None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from modelopt.torch.distill.plugins.megatron import get_tensor_shapes_adjust_fn_for_distillation

        from nemo_paced.megatron.step import PacedForwardStep

        self.ddp.zero_grad_buffer()
        n = len(mbs) if num_microbatches is None else num_microbatches
        return get_forward_backward_func()(
            forward_step_func=forward_step or PacedForwardStep(num_microbatches=n),
            data_iterator=iter(mbs), model=[self.ddp], num_microbatches=n, seq_length=SEQ,
            micro_batch_size=micro, decoder_seq_length=SEQ, forward_only=False,
            adjust_tensor_shapes_fn=get_tensor_shapes_adjust_fn_for_distillation(
                self.ddp, seq_length=SEQ, micro_batch_size=micro, decoder_seq_length=SEQ))

    def full_grads(self) -> dict[str, torch.Tensor]:
        return gathered_grads(self.student_params, self.kd.config)

    def sgd(self) -> None:
        with torch.no_grad():
            for param in self.student_params.values():
                param.add_(param.main_grad, alpha=-LR)


def _paced_sums(reports: list[dict]) -> torch.Tensor:
    return sum((r["paced kl"] for r in reports), torch.zeros(2))


def to_numpy(obj):
    """Tensors become numpy arrays: torch tensors sent through the result queue share memory with a
    process that has exited by the time the test reads them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy()
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


LAYOUTS = {"tp2xpp2": (2, 2), "pp2-dp2": (1, 2), "tp2-dp2": (2, 1)}  # all on 4 ranks


def layouts_run(rank: int, world_size: int) -> dict[str, dict]:
    """Every layout in one 4-rank world (imports cost more than the runs): set up, train, tear down."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    results = {}
    for name, (tp, pp) in LAYOUTS.items():
        h = Harness(tp, pp)
        results[name] = to_numpy(train(h))
        if pp > 1:
            results[name]["sampler"] = to_numpy(sampler_run(h))
        ps.destroy_model_parallel()
        tensor_parallel.get_cuda_rng_tracker().reset()
    return results


def train(h: Harness) -> dict:
    """STEPS SGD steps on the global batch; the first step's gradients; teacher checks."""
    from nemo_paced.megatron.teacher import check_frozen

    teacher_before = {k: v.clone() for k, v in h.teacher.state_dict().items() if isinstance(v, torch.Tensor)}
    student_before = {n: p.detach().clone() for n, p in h.student_params.items()}
    batch = global_batch()
    sums, grads, report = [], None, None
    for step in range(STEPS):
        reports = h.step(microbatches(batch, h.my_rows(), MICRO), MICRO)
        sums.append(_paced_sums(reports) if reports else None)
        if step == 0:
            grads, report = h.full_grads(), reports
        h.sgd()
    check_frozen(h.kd)
    teacher_after = h.teacher.state_dict()
    return dict(
        is_last=h.ps.is_pipeline_last_stage(), tp_rank=h.ps.get_tensor_model_parallel_rank(), dp_rank=h.dp_rank,
        sums=sums, grads=grads, report=report,
        teacher_unchanged=all(torch.equal(v, teacher_after[k]) for k, v in teacher_before.items()),
        student_changed=all(not torch.equal(p, student_before[n]) for n, p in h.student_params.items()),
    )


def reference_run(rank: int, world_size: int) -> dict:
    """TP=1, PP=1: the layout reference plus the weighting checks, all at the initial weights."""
    from nemo_paced.megatron.step import PacedForwardStep
    from nemo_paced.megatron.teacher import TeacherMismatchError, distillation_model

    h = Harness(1, 1)
    rows = range(GLOBAL_BATCH)

    def run(weights, micro=MICRO, forward_step=None):
        reports = h.step(microbatches(global_batch(weights), rows, micro), micro, forward_step)
        return _paced_sums(reports), h.full_grads(), reports

    one_hot = [run([1.0 if j == i else 0.0 for j in range(GLOBAL_BATCH)]) for i in range(GLOBAL_BATCH)]
    doubled = list(WEIGHTS)
    doubled[2] *= 2
    zero_first = [0.0] * MICRO + WEIGHTS[MICRO:]
    bridge_step = PacedForwardStep(num_microbatches=GLOBAL_BATCH // MICRO)
    out = dict(
        per_sequence=[(s, g) for s, g, _ in one_hot],
        base=run(WEIGHTS)[:2],
        doubled=run(doubled)[:2],
        split_1=run(WEIGHTS, micro=1)[:2],
        split_4=run(WEIGHTS, micro=4)[:2],
        zero_microbatch=run(zero_first),
        all_zero=run([0.0] * GLOBAL_BATCH)[:2],
        bridge_signature=run(WEIGHTS, forward_step=lambda it, m: bridge_step("state", it, m, False))[:2],
        custom_bins=run(WEIGHTS, forward_step=PacedForwardStep(GLOBAL_BATCH // MICRO, pass_rate_bins=(0, 0.1, 1)))[2],
    )
    batches = collated_batches()
    out["collated"] = (step_loss(h, batches), hand_loss(h, batches, reverse=False), batches[1]["sample_weight"])
    out["layout"] = train(h)
    out["reverse"] = reverse_kl_check()
    try:
        distillation_model(gpt(STUDENT, 1, 1.0, 1, 1), gpt(TEACHER, 2, 1.0, 1, 1, vocab=VOCAB + 32), "fkl")
    except TeacherMismatchError as error:
        out["vocab_mismatch"] = str(error)
    return to_numpy(out)


def sampler_run(h: Harness) -> dict:
    """Two steps fed by a real PacedSampler that re-reads its pass-rate table every step: the
    refresh is a broadcast among all reading ranks, first and last pipeline stages alike. The
    StepBuffer reads the step before the schedule starts, as Bridge's PacedCallback does, so the
    collective cannot meet the stages waiting on each other's activations."""
    from nemo_paced.megatron.data import StepBuffer
    from nemo_paced.passrates import PassRateTable
    from nemo_paced.sampler import PacedSampler, SamplerConfig, reader_group

    ids = [f"p{i}" for i in range(16)]
    table = PassRateTable()
    table.update([(pid, i % 9, 8) for i, pid in enumerate(ids)], step=0)
    seen = []

    def collate(draw) -> dict:
        seen.append(list(draw.problem_ids))
        tokens = torch.stack([torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(int(i)))
                              for i in draw.indices])
        mask = torch.ones(len(tokens), SEQ)
        mask[:, :3] = 0
        return dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=mask,
                    position_ids=torch.arange(SEQ).expand(len(tokens), SEQ).clone(),
                    sample_weight=torch.as_tensor(draw.weights, dtype=torch.float32))

    reads = h.ps.is_pipeline_first_stage() or h.ps.is_pipeline_last_stage()
    sampler = PacedSampler(ids, SamplerConfig(GLOBAL_BATCH, MICRO, seed=5, refresh_every=1), lambda: table,
                           dp_rank=h.dp_rank, dp_size=h.dp, group=reader_group(reads), collate=collate)
    stream, sums = StepBuffer(sampler), []
    for _ in range(2):
        stream.fill(sampler.micro_batches_per_step)
        reports = h.step(stream, MICRO, num_microbatches=sampler.micro_batches_per_step)
        sums.append(_paced_sums(reports) if reports else None)
    return dict(seen=seen, sums=sums)


def hand_loss(h: Harness, batches: list[dict], reverse: bool) -> float:
    """L = sum w l / sum w computed here from the two models' full logits."""
    weighted, total = 0.0, 0.0
    for batch in batches:
        with torch.no_grad():
            teacher = h.teacher(batch["tokens"], batch["position_ids"], None).float().log_softmax(-1)
            with h.kd.only_student_forward():
                student = h.kd(batch["tokens"], batch["position_ids"], None).float().log_softmax(-1)
        p, q = (student, teacher) if reverse else (teacher, student)
        per_token = (p.exp() * (p - q)).sum(-1)  # KL(p || q)
        mask = batch["loss_mask"]
        tokens = mask.sum(-1)
        weight = batch["sample_weight"] * (tokens > 0)
        weighted += (weight * (per_token * mask).sum(-1) / tokens.clamp(min=1)).sum().item()
        total += weight.sum().item()
    return weighted / total


def step_loss(h: Harness, batches: list[dict]) -> float:
    sums = _paced_sums(h.step(batches, len(batches[0]["tokens"])))
    return (sums[0] / sums[1]).item()


def collated_batches() -> list[dict]:
    """Micro-batches laid out by nemo_paced.batches, as the sampler's collates build them: prompts and
    responses of different lengths, padding, a cut response and a row with no room for a response."""
    from nemo_paced.batches import collate, encode_row

    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()
    shapes = [(3, 4), (2, 9), (5, 1), (SEQ + 1, 2)]  # (prompt, response) lengths; the last leaves no room
    rows = [encode_row(ids(p), ids(r), SEQ, pad_id=0) for p, r in shapes]
    return [collate(rows[:2], [0.25, 0.5], ["a", "b"]), collate(rows[2:], [0.125, 1.0], ["c", "d"])]


def reverse_kl_check() -> tuple[float, float]:
    """The rkl stage's loss, and the same loss by hand."""
    h = Harness(1, 1, "rkl")
    batches = microbatches(global_batch(), range(GLOBAL_BATCH), MICRO)
    return step_loss(h, batches), hand_loss(h, batches, reverse=True)


# --- the tests ----------------------------------------------------------------------------------

def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _hand(weights, per_sequence) -> tuple[float, dict]:
    """L and grad L from the per-sequence losses l_x and gradients grad l_x, by the formula."""
    counted = [0.0 if i == EMPTY else w for i, w in enumerate(weights)]
    total = sum(counted)
    loss = sum(w * s[0].item() for w, (s, _) in zip(counted, per_sequence)) / total
    names = per_sequence[0][1].keys()
    grads = {n: sum(w * g[n] for w, (_, g) in zip(counted, per_sequence)) / total for n in names}
    return loss, grads


@pytest.fixture(scope="module")
def reference():
    return run_ranks(reference_run, 1)[0]


def test_loss_and_gradients_follow_the_weighted_formula(reference):
    per_sequence = reference["per_sequence"]
    empty_sums, empty_grads = per_sequence[EMPTY]  # all the weight on a sequence without response tokens
    assert empty_sums[0] == 0 and all(not g.any() for g in empty_grads.values())
    for name, weights in (("base", WEIGHTS), ("doubled", WEIGHTS[:2] + [WEIGHTS[2] * 2] + WEIGHTS[3:])):
        sums, grads = reference[name]
        loss, hand_grads = _hand(weights, per_sequence)
        assert sums[0].item() / sums[1].item() == pytest.approx(loss, rel=1e-5)
        _close(grads, hand_grads)
    # doubling one problem's weight really moved the gradient
    assert any(not np.allclose(reference["base"][1][n], reference["doubled"][1][n]) for n in reference["base"][1])


def test_normalisation_does_not_depend_on_the_micro_batch_split(reference):
    base_sums, base_grads = reference["base"]
    for key in ("split_1", "split_4", "bridge_signature"):
        sums, grads = reference[key]
        torch.testing.assert_close(sums, base_sums, rtol=1e-5, atol=1e-6)
        _close(grads, base_grads)


def test_zero_weights_give_zero_loss_and_no_nan(reference):
    sums, grads, reports = reference["zero_microbatch"]
    assert reports[0]["paced kl"][0] == 0 and np.isfinite(reports[0]["paced kl"]).all()
    _, hand_grads = _hand([0.0] * MICRO + WEIGHTS[MICRO:], reference["per_sequence"])
    _close(grads, hand_grads)
    sums, grads = reference["all_zero"]
    assert sums[0] / sums[1] == 0  # what Bridge logs: 0, not 0/0
    assert all(not g.any() for g in grads.values())


def test_report_holds_kl_weights_ess_and_pass_rate_bins(reference):
    logged = lambda reports, key: (lambda t: t[0] / t[1])(sum(r[key] for r in reports))  # as Bridge logs it
    reports = reference["layout"]["report"]
    ell = [s[0].item() for s, _ in reference["per_sequence"]]  # l_x, from all the weight on x (0 for EMPTY)
    counted = [w for i, w in enumerate(WEIGHTS) if i != EMPTY]
    assert logged(reports, "paced kl") == pytest.approx(sum(w * ell[i] for i, w in enumerate(WEIGHTS)) / sum(counted),
                                                        rel=1e-5)
    assert logged(reports, "mean weight") == pytest.approx(sum(WEIGHTS) / len(WEIGHTS))
    assert logged(reports, "weight ess") == pytest.approx(sum(counted) ** 2 / sum(w * w for w in counted), rel=1e-6)
    assert logged(reports, "kl") == pytest.approx(sum(ell) / (GLOBAL_BATCH - 1), rel=1e-5)
    assert logged(reports, "kl pass [0.00,0.25)") == pytest.approx(ell[3], rel=1e-5)
    assert logged(reports, "kl pass [0.50,0.75)") == pytest.approx((ell[0] + ell[2] + ell[4]) / 3, rel=1e-5)
    assert logged(reports, "kl pass [0.75,1.00]") == pytest.approx((ell[1] + ell[7]) / 2, rel=1e-5)
    assert logged(reference["custom_bins"], "kl pass [0.00,0.10)") == 0  # empty bin: 0, not NaN
    assert logged(reference["custom_bins"], "kl pass [0.10,1.00]") == pytest.approx(sum(ell) / 7, rel=1e-5)


def test_batches_laid_out_by_the_sampler_collates_train_as_expected(reference):
    from_step, by_hand, weights = reference["collated"]
    assert weights.tolist() == [0.125, 0.0]  # the row with no response token was given weight 0
    assert from_step == pytest.approx(by_hand, rel=1e-5)


def test_rkl_stage_computes_reverse_kl(reference):
    from_step, by_hand = reference["reverse"]
    assert from_step == pytest.approx(by_hand, rel=1e-5)


def test_teacher_with_another_vocabulary_is_rejected(reference):
    assert "vocabulary sizes differ: student=96, teacher=128" in reference["vocab_mismatch"]


def test_training_reduces_kl_and_leaves_teacher_untouched(reference):
    run = reference["layout"]
    kl = [s[0].item() / s[1].item() for s in run["sums"]]
    assert all(b < a for a, b in zip(kl, kl[1:])), kl
    assert run["teacher_unchanged"] and run["student_changed"]


@pytest.fixture(scope="module")
def layouts():
    return run_ranks(layouts_run, 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layout_matches_single_process(reference, layouts, layout):
    ranks = [by_layout[layout] for by_layout in layouts]
    ref = reference["layout"]
    last = [r for r in ranks if r["is_last"]]
    assert sorted(r["dp_rank"] for r in last if r["tp_rank"] == 0) == list(range(4 // math.prod(LAYOUTS[layout])))
    for step, ref_sums in enumerate(ref["sums"]):  # the whole SGD trajectory, not just the first step
        total = sum({r["dp_rank"]: r["sums"][step] for r in last}.values())
        assert (total[0] / total[1]).item() == pytest.approx((ref_sums[0] / ref_sums[1]).item(), rel=1e-4)
    grads = {}
    for r in ranks:
        if r["tp_rank"] == 0 and r["dp_rank"] == 0:
            grads.update(r["grads"])
    _close(grads, ref["grads"])
    assert all(r["teacher_unchanged"] and r["student_changed"] for r in ranks)
    if "sampler" in ranks[0]:  # the sampler-fed steps finished; both stages of a replica read the same problems
        for replica in {r["dp_rank"] for r in ranks}:
            seen = [r["sampler"]["seen"] for r in ranks if r["dp_rank"] == replica]
            dp = 4 // math.prod(LAYOUTS[layout])
            assert all(s == seen[0] for s in seen) and len(seen[0]) == 2 * GLOBAL_BATCH // (MICRO * dp)
        assert all(np.isfinite(s).all() for r in last for s in r["sampler"]["sums"])
