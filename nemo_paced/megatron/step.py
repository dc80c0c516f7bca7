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
    """Weight statistics of one whole step, identical on every rank of the last pipeline stage."""

    weight_sum: torch.Tensor  # W: sum of the weights of the sequences that have loss tokens
    ess: torch.Tensor  # (sum w)^2 / sum w^2


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
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        if not last:
            return output, None
        return output, lambda output_tensor: self._loss(model, batch, totals)

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
            self._totals = _step_totals(self._pending)
        return self._pending.popleft(), self._totals

    # --- the loss -------------------------------------------------------------------------------

    def _loss(self, model: torch.nn.Module, batch: dict[str, Any], totals: StepTotals):
        losses = _unwrap(model).compute_kd_loss(skip_balancer=True)
        if len(losses) != 1:
            raise ValueError(f"expected exactly one distillation criterion (the Paced KL), got {sorted(losses)}")
        per_token, tp_reduce, _ = next(iter(losses.values()))
        if tp_reduce:
            raise ValueError("the criterion returns partial per-shard KL; use nemo_paced.megatron.PacedLogitsKL")
        weighted_sum, weight_sum = paced_reduce(per_token, batch["loss_mask"], batch["sample_weight"])
        W = totals.weight_sum
        loss = torch.where(W > 0, weighted_sum / W.clamp(min=torch.finfo(torch.float32).tiny), weighted_sum * 0)
        return loss, torch.zeros([], dtype=torch.int, device=loss.device), self._report(per_token, batch, totals,
                                                                                        weighted_sum, weight_sum)

    def _report(self, per_token, batch, totals, weighted_sum, weight_sum) -> dict[str, torch.Tensor]:
        """(sum, count) pairs: Bridge sums them over micro-batches and DP ranks and logs sum / count."""
        mask = batch["loss_mask"] != 0
        tokens = mask.sum(-1)
        has_tokens = tokens > 0
        kl = torch.where(mask, per_token.detach().float(), 0.0)  # select, so inf/NaN at masked positions stay out
        seq_kl = (kl.sum(-1) / tokens.clamp(min=1))[has_tokens]
        weight = batch["sample_weight"].float()
        pair = lambda total, count: torch.stack([torch.as_tensor(total, dtype=torch.float32, device=weight.device),
                                                 torch.as_tensor(count, dtype=torch.float32, device=weight.device)])
        report = {
            "paced kl": pair(weighted_sum.detach(), weight_sum),
            "kl": pair(seq_kl.sum(), seq_kl.numel()),
            "mean weight": pair(weight.sum(), weight.numel()),
            "weight ess": pair(totals.ess, 1.0),
        }
        if batch.get("pass_rate") is not None:
            p = batch["pass_rate"].float()[has_tokens]
            for low, high in zip(self.bins[:-1], self.bins[1:]):
                inside = (p >= low) & ((p < high) if high < self.bins[-1] else (p <= high))
                report[f"kl pass [{low:.2f},{high:.2f}{')' if high < self.bins[-1] else ']'}"] = pair(
                    seq_kl[inside].sum(), inside.sum())
        return report


def _step_totals(batches) -> StepTotals:
    """W, sum w^2 over the step's micro-batches on this rank, all-reduced over data parallelism."""
    sums = torch.zeros(2, dtype=torch.float64, device=batches[0]["sample_weight"].device)
    for batch in batches:
        counted = batch["sample_weight"].double() * (batch["loss_mask"].sum(-1) > 0)
        sums += torch.stack([counted.sum(), (counted * counted).sum()])
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    weight_sum, square_sum = sums
    ess = weight_sum**2 / square_sum if square_sum > 0 else torch.zeros_like(weight_sum)
    return StepTotals(weight_sum=weight_sum.float(), ess=ess.float())
