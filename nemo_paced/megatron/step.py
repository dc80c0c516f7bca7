"""The Paced distillation forward step for megatron-core's schedules and Megatron Bridge's `pretrain`.

Normalisation. The objective of a step is  L = sum_x w_x l_x / W,  where l_x is the token-mean KL
of sequence x, the sums run over every sequence of the global batch (all micro-batches, all
data-parallel ranks) and W is their total weight. megatron-core cannot divide by W itself: the
schedules accumulate the per-micro-batch token count in an int32 tensor, so a float count is
rejected. Instead, at the first micro-batch of a step the step reads all of the step's
micro-batches ahead, sums their weights and all-reduces that sum over the data-parallel group.
Each micro-batch then returns  sum_x w_x l_x / W  with a token count of 0, and the run must set
`calculate_per_token_loss=True` so the schedule does not divide again. Finalising the gradients
then sums (does not average) over micro-batches and data-parallel ranks, and because the total
count is 0 it applies no further scaling. The gradient is therefore exactly that of L, whatever the
micro-batch split. A step whose weights are all zero gives a loss of exactly 0, never NaN.

Sequence weights. Bridge's own batch loader keeps only the keys it knows and drops
`sample_weight`, so this step reads the batch dict itself: `tokens`, `position_ids`, `labels`,
`loss_mask`, `sample_weight` (float, one per sequence) and optionally `attention_mask` and
`pass_rate` (for the per-bin report).

Report. Per micro-batch, in Bridge's (value, count) form, already divided by the step's global
counts so that Bridge's sum over micro-batches and DP ranks logs the step's value: "paced kl" (the
objective L), "kl" (unweighted mean over sequences), "mean weight", "weight ess" ((sum w)^2 / sum w^2)
and "kl pass [a,b)" (mean KL of the sequences whose pass rate lies in each bin).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from nemo_paced.loss import paced_reduce

DEFAULT_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)
BATCH_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "sample_weight")


@dataclass(frozen=True)
class StepTotals:
    """Sums over the whole step (all micro-batches, all data-parallel ranks), the same on every rank
    of the last pipeline stage. Sequences without response tokens are left out of all but `sequences`."""

    weight_sum: torch.Tensor  # W = sum of w
    weight_square_sum: torch.Tensor  # sum of w^2
    sequences: torch.Tensor  # every sequence, for the mean weight
    with_tokens: torch.Tensor  # sequences that have response tokens
    per_bin: torch.Tensor  # of those, how many fall in each pass-rate bin
    shares: int  # micro-batches x data-parallel ranks: each report entry carries 1 / shares as its count

    @property
    def ess(self) -> torch.Tensor:
        """(sum w)^2 / sum w^2, 0 when every weight is 0."""
        return torch.where(self.weight_square_sum > 0, self.weight_sum**2 / self.weight_square_sum.clamp(min=1e-30),
                           torch.zeros_like(self.weight_sum))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _check_batch(batch: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in BATCH_KEYS if batch.get(k) is None]
    if missing:
        raise KeyError(f"micro-batch lacks {missing}; the Paced step needs {list(BATCH_KEYS)} "
                       "(nemo_paced.sampler.PacedSampler yields them)")
    weight, tokens = batch["sample_weight"], batch["tokens"]
    if weight.shape != tokens.shape[:1]:
        raise ValueError(f"sample_weight must have one value per sequence, shape {tuple(tokens.shape[:1])}; "
                         f"got {tuple(weight.shape)}")
    if not torch.is_floating_point(weight) or not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError(f"sample_weight must be finite floats >= 0; got {weight.tolist()}")
    device = _device()
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class PacedForwardStep:
    """Forward step for `get_forward_backward_func()` and for Bridge's `pretrain(config, forward_step)`.

    Called as `(data_iterator, model)` by megatron-core's schedules, or with Bridge's signature
    `(state, data_iterator, model, return_schedule_plan=False)`. The model is ModelOpt's
    distillation model (possibly wrapped in DDP / Float16Module) whose criterion is the Paced KL.

    `num_microbatches` is the number of micro-batches per step on each data-parallel rank; by
    default it is read from megatron's micro-batch calculator, which Bridge sets up.
    """

    def __init__(self, num_microbatches: int | Callable[[], int] | None = None,
                 pass_rate_bins: tuple[float, ...] = DEFAULT_BINS):
        if list(pass_rate_bins) != sorted(pass_rate_bins) or len(pass_rate_bins) < 2:
            raise ValueError(f"pass_rate_bins must be at least two increasing edges, got {pass_rate_bins!r}")
        self.num_microbatches = num_microbatches
        self.bins = tuple(float(b) for b in pass_rate_bins)
        self._pending: deque[dict[str, Any]] = deque()
        self._totals: StepTotals | None = None

    def __call__(self, *args: Any, return_schedule_plan: bool = False):
        if len(args) == 4:  # Bridge: (state, data_iterator, model, return_schedule_plan)
            *args, return_schedule_plan = args
        if len(args) == 3 and isinstance(args[2], torch.nn.Module):  # Bridge: (state, data_iterator, model)
            args = args[1:]
        if len(args) != 2:
            raise TypeError("call as (data_iterator, model) or (state, data_iterator, model[, return_schedule_plan]); "
                            "per-micro-batch activation checkpointing is not supported")
        if return_schedule_plan:
            raise ValueError("schedule plans (overlap_moe_expert_parallel_comm) are not supported by the Paced step")
        data_iterator, model = args
        if not get_model_config(model).calculate_per_token_loss:
            raise ValueError("the Paced step normalises by the global weight sum itself; set the model config's "
                             "calculate_per_token_loss=True so megatron-core does not divide the loss again")
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("context parallelism is not supported by the Paced step (a sequence's token mean "
                             "would span CP ranks); set context_parallel_size=1")

        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        if last:
            batch, totals = self._next_of_step(data_iterator)
        elif first:
            batch, totals = _check_batch(next(data_iterator)), None
        else:  # middle stages take their input from the previous stage
            batch, totals = dict.fromkeys(("tokens", "position_ids", "labels")), None
        output = self._forward(model, batch)
        if not last:
            return output, None
        return output, lambda output_tensor: self._loss(model, batch, totals, output_tensor)

    def _forward(self, model: torch.nn.Module, batch: dict[str, Any]):
        return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

    # --- the step's look-ahead -----------------------------------------------------------------

    def _microbatches_per_step(self) -> int:
        n = self.num_microbatches
        if n is None:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            return get_num_microbatches()
        return n() if callable(n) else n

    def _next_of_step(self, data_iterator: Iterator) -> tuple[dict[str, Any], StepTotals]:
        """The next micro-batch; at a step's first one, read the whole step and reduce its weights."""
        if not self._pending:
            self._pending.extend(_check_batch(next(data_iterator)) for _ in range(self._microbatches_per_step()))
            self._totals = self._step_totals(self._pending)
        return self._pending.popleft(), self._totals

    # --- the loss -------------------------------------------------------------------------------

    def _per_token(self, model: torch.nn.Module, batch: dict[str, Any], output_tensor: torch.Tensor) -> torch.Tensor:
        """The full per-token KL `[b, s]` of this micro-batch (here from ModelOpt's criterion)."""
        losses = _unwrap(model).compute_kd_loss(skip_balancer=True)
        if len(losses) != 1:
            raise ValueError(f"expected exactly one distillation criterion (the Paced KL), got {sorted(losses)}")
        per_token, tp_reduce, _ = next(iter(losses.values()))
        if tp_reduce:
            raise ValueError("the criterion returns partial per-shard KL; "
                             "use nemo_paced.megatron.criterion.PacedLogitsKL")
        return per_token

    def _loss(self, model: torch.nn.Module, batch: dict[str, Any], totals: StepTotals, output_tensor: torch.Tensor):
        per_token = self._per_token(model, batch, output_tensor)
        weighted_sum, _ = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
        W = totals.weight_sum
        loss = torch.where(W > 0, weighted_sum / W.clamp(min=torch.finfo(torch.float32).tiny), weighted_sum * 0)
        return loss, torch.zeros([], dtype=torch.int, device=loss.device), self._report(per_token, batch, totals,
                                                                                        weighted_sum)

    def _report(self, per_token, batch, totals: StepTotals, weighted_sum) -> dict[str, torch.Tensor]:
        """Entries (share, 1 / shares): each micro-batch's part of a step-wide mean, already divided by
        the step's global count. Bridge sums entries over micro-batches and DP ranks and logs
        sum[0] / sum[1], which gives the step's value, and 0 (not NaN) for an empty group."""
        mask = batch["loss_mask"] != 0
        tokens = mask.sum(-1)
        has_tokens = tokens > 0
        kl = torch.where(mask, per_token.detach().float(), 0.0)  # select, so inf/NaN at masked positions stay out
        seq_kl = torch.where(has_tokens, kl.sum(-1) / tokens.clamp(min=1), 0.0)
        count = torch.tensor(1.0 / totals.shares, device=seq_kl.device)

        def entry(total: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.where(over > 0, total.float() / over.clamp(min=1e-30), 0.0), count])

        report = {
            "paced kl": entry(weighted_sum.detach(), totals.weight_sum),
            "kl": entry(seq_kl.sum(), totals.with_tokens),
            "mean weight": entry(batch["sample_weight"].float().sum(), totals.sequences),
            "weight ess": torch.stack([totals.ess * count, count]),
        }
        if batch.get("pass_rate") is not None:
            inside = self._bin_masks(batch) & has_tokens
            for b, name in enumerate(self._bin_names()):
                report[name] = entry(seq_kl[inside[b]].sum(), totals.per_bin[b])
        return report

    # --- pass-rate bins and step totals -----------------------------------------------------------

    def _bin_names(self) -> list[str]:
        last = len(self.bins) - 2
        return [f"kl pass [{lo:.2f},{hi:.2f}{']' if b == last else ')'}"
                for b, (lo, hi) in enumerate(zip(self.bins[:-1], self.bins[1:]))]

    def _bin_masks(self, batch) -> torch.Tensor:
        """[bins, b]: which sequences fall in each bin (the last bin includes its upper edge)."""
        p = batch["pass_rate"].float()
        low, high = torch.tensor(self.bins[:-1], device=p.device), torch.tensor(self.bins[1:], device=p.device)
        below = p[None] < high[:, None]
        below[-1] = p <= high[-1]
        return (p[None] >= low[:, None]) & below

    def _step_totals(self, batches) -> StepTotals:
        """Sum the step's weights and counts on this rank, then over the data-parallel group."""
        device = batches[0]["sample_weight"].device
        sums = torch.zeros(4 + len(self.bins) - 1, dtype=torch.float64, device=device)
        for batch in batches:
            has_tokens = (batch["loss_mask"] != 0).sum(-1) > 0
            w = batch["sample_weight"].double() * has_tokens
            bins = (self._bin_masks(batch) & has_tokens).sum(-1) if batch.get("pass_rate") is not None else 0
            sums += torch.cat([torch.stack([w.sum(), (w * w).sum(), torch.tensor(float(len(w)), device=device),
                                            has_tokens.sum().double()]), torch.zeros_like(sums[4:]) + bins])
        dp = parallel_state.get_data_parallel_world_size()
        if dp > 1:
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        sums = sums.float()
        return StepTotals(weight_sum=sums[0], weight_square_sum=sums[1], sequences=sums[2], with_tokens=sums[3],
                          per_bin=sums[4:], shares=len(batches) * dp)


class TopKTeacherStep(PacedForwardStep):
    """The Paced step for a student-only model whose teacher is outside the job (nemo_paced.teacher): each
    micro-batch carries the teacher's top-k, `teacher_ids` / `teacher_logprobs` `[b, s, k]` (from the
    teacher cache or the teacher service), and the loss is `topk_kl` on the student's vocabulary-parallel
    logits; with `estimator="sampled"` (reverse KL on the student's own samples) it is the sampled-token
    estimator on `teacher_token_logprobs` `[b, s]` instead. The model is the plain GPT student: no
    DistillationProvider, no teacher weights; weighting and normalisation are the parent's."""

    def __init__(self, direction: str = "forward", estimator: str = "topk", temperature: float = 1.0,
                 tail: str = "bucket", chunk_size: int | None = None, **options: Any):
        super().__init__(**options)
        if estimator not in ("topk", "sampled") or (estimator == "sampled" and direction != "reverse"):
            raise ValueError(f"estimator must be topk, or sampled with direction reverse; got {estimator!r} "
                             f"with {direction!r}")
        self.direction, self.estimator, self.temperature = direction, estimator, temperature
        self.tail, self.chunk_size = tail, chunk_size

    def _forward(self, model: torch.nn.Module, batch: dict[str, Any]):
        return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))  # logits [b, s, V/TP]

    def _per_token(self, model: torch.nn.Module, batch: dict[str, Any], output_tensor: torch.Tensor) -> torch.Tensor:
        from nemo_paced.loss import sampled_reverse_kl, topk_kl

        sharded = parallel_state.get_tensor_model_parallel_world_size() > 1
        group = parallel_state.get_tensor_model_parallel_group() if sharded else None
        if self.estimator == "sampled":
            return sampled_reverse_kl(output_tensor, batch["labels"], batch["teacher_token_logprobs"],
                                      temperature=self.temperature, tp_group=group, chunk_size=self.chunk_size)
        return topk_kl(output_tensor, batch["teacher_ids"], batch["teacher_logprobs"], direction=self.direction,
                       temperature=self.temperature, tp_group=group, tail=self.tail, chunk_size=self.chunk_size)
