"""The reverse-KL stage's data source: the sampler's problems, answered by the student via the rollout service.

For each micro-batch the sampler draws, one on-policy sample per problem is requested from the
rollout service (`RolloutClient.sample`): the prompt's and the response's token ids exactly as the
engine produced them, and the checkpoint and trainer step of the weights that drew them. They are
laid out like every other batch (`batches.BatchBuilder`), the problem's loss weight carried as
`sample_weight`. The service grades the samples and pools the scores into its pass-rate table
(`fold=True`), which the sampler picks up at its next refresh.

Prefetch: generation runs on a worker thread, `prefetch` micro-batches ahead of training. Drawing
from the sampler and every collective stay on the caller's thread, in the same order on every rank.
Only the first rank of `group` (the model-parallel peers of one DP replica, which must train on the
same samples) calls the service; it broadcasts the samples to the others.

Lag: a sample drawn by the weights of trainer step s and trained on at step t is t - s steps
off-policy. Each batch carries `rollout_lag` (None when the service does not know its step) and
`rollout_checkpoint`; the lag is logged once per global batch.

Resume: `state_dict` is the sampler's state before the oldest micro-batch not yet handed out, so a
resumed job trains on the same problem sequence. The samples are drawn afresh; with
`SamplingSettings.seed` set they are the same too, given the same weights in the service.
"""

from __future__ import annotations

import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from nemo_paced.batches import BatchBuilder, Pair
from nemo_paced.rollout.client import RolloutClient
from nemo_paced.sampler import AllWeightsZero, Draw, PacedSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling for on-policy samples; None takes the service's default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    fold: bool = True  # pool the verifier scores into the service's pass-rate table
    seed: int | None = None  # set: each micro-batch's request is seeded from (seed, step, micro), reproducible


@dataclass(frozen=True)
class Rollouts:
    """What the leader fetched for one micro-batch, as broadcast to its peers."""

    pairs: list[tuple[str, list[int], list[int]]]  # (problem id, prompt ids, response ids)
    checkpoint: str
    step: int | None
    teacher: list[Any] | None = None  # the teacher service's answer per pair (OnPolicyBatches' `teacher`)


class OnPolicyBatches:
    """Iterator of micro-batch dicts for reverse KL; use it where a PacedSampler with a collate would go.

    `group` holds the ranks of one DP replica that read data: under Megatron
    `sampler.reader_group(is_first_or_last_stage, replica=dp_rank)`; the default (the world) suits a
    single replica. Only the group's first rank needs a working `client`. With `self_teacher`
    (`nemo_paced.self_teacher.SelfTeacher`) each micro-batch also carries its self-teacher rows. With
    `teacher` (`nemo_paced.teacher.served.ServedTeacher`) the leader has the teacher service score the
    samples on its worker thread, shares the answers with the samples, and every rank attaches them.
    """

    def __init__(self, sampler: PacedSampler, client: RolloutClient, builder: BatchBuilder, *, prefetch: int = 2,
                 sampling: SamplingSettings = SamplingSettings(), group: dist.ProcessGroup | None = None,
                 self_teacher: Any = None, teacher: Any = None) -> None:
        if sampler.collate is not None:
            raise ValueError("give OnPolicyBatches a sampler without a collate: it builds the batches itself")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.sampler, self.client, self.builder = sampler, client, builder
        self.prefetch, self.sampling, self.group, self.self_teacher = prefetch, sampling, group, self_teacher
        self.teacher = teacher
        self._leader = not dist.is_initialized() or dist.get_rank() == (
            0 if group is None else dist.get_global_rank(group, 0))
        self._shared = dist.is_initialized() and dist.get_world_size(group) > 1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onpolicy") if self._leader else None
        self._pending: collections.deque[tuple[dict, Draw, Future | None]] = collections.deque()
        self._exhausted: AllWeightsZero | None = None

    def __iter__(self) -> "OnPolicyBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        self._top_up()
        if not self._pending:
            raise self._exhausted
        _, draw, future = self._pending.popleft()
        rollouts = self._receive(future)
        self._top_up()  # keep the worker busy while this batch trains
        lag = None if rollouts.step is None else draw.step - rollouts.step
        if draw.micro == 0:
            log.info("on-policy samples for step %d from %s (step %s): lag %s steps, %d micro-batches prefetched",
                     draw.step, rollouts.checkpoint, rollouts.step, "unknown" if lag is None else lag,
                     len(self._pending))
        pairs = [Pair(pid, prompt, response, float(w))
                 for (pid, prompt, response), w in zip(rollouts.pairs, draw.weights)]
        batch = self.builder.micro_batch(pairs)
        if self.self_teacher is not None:
            batch = self.self_teacher.add_teacher_rows(batch, pairs)
        if self.teacher is not None:
            batch = self.teacher.attach(batch, [len(p.prompt_ids) for p in pairs], rollouts.teacher)
        batch.update(rollout_checkpoint=rollouts.checkpoint, rollout_lag=lag)
        return batch

    def _top_up(self) -> None:
        """Draw ahead up to `prefetch` micro-batches; when the sampler runs out (AllWeightsZero) the
        batches already drawn are still handed out before the error is raised."""
        while len(self._pending) < self.prefetch and self._exhausted is None:
            state = self.sampler.state_dict()
            try:
                draw = next(self.sampler)
            except AllWeightsZero as e:
                self._exhausted = e
                return
            future = self._executor.submit(self._fetch, draw) if self._leader else None
            self._pending.append((state, draw, future))

    def _fetch(self, draw: Draw) -> Rollouts:
        s = self.sampling
        seed = None if s.seed is None else int(np.random.SeedSequence([s.seed, draw.step, draw.micro]).generate_state(1)[0])
        answer = self.client.sample(draw.problem_ids, n=1, temperature=s.temperature, top_p=s.top_p,
                                    max_tokens=s.max_tokens, seed=seed, fold=s.fold)
        pairs = [(r.problem_id, list(r.prompt_token_ids), list(r.samples[0].token_ids)) for r in answer.problems]
        if [p[0] for p in pairs] != draw.problem_ids:
            raise RuntimeError(f"the rollout service answered for {[p[0] for p in pairs]}, "
                               f"asked for {draw.problem_ids}")
        scored = None if self.teacher is None else self.teacher.score([(prompt, response) for _, prompt, response
                                                                       in pairs])
        return Rollouts(pairs, answer.checkpoint, answer.step, scored)

    def _receive(self, future: Future | None) -> Rollouts:
        """The leader waits for its fetch and shares it (or its failure) with the peers."""
        payload: Any = None
        if self._leader:
            try:
                payload = future.result()
            except Exception as e:  # noqa: BLE001 - every peer must learn of it, or they would wait forever
                payload = f"{type(e).__name__}: {e}"
        if self._shared:
            box = [payload]
            dist.broadcast_object_list(box, src=0 if self.group is None else dist.get_global_rank(self.group, 0),
                                       group=self.group)
            payload = box[0]
        if isinstance(payload, str):
            raise RuntimeError(f"on-policy sampling failed: {payload}")
        return payload

    def state_dict(self) -> dict[str, Any]:
        return self._pending[0][0] if self._pending else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_pending()
        self._exhausted = None
        self.sampler.load_state_dict(state)

    def seek(self, step: int) -> None:
        self._drop_pending()
        self._exhausted = None
        self.sampler.seek(step)

    def close(self) -> None:
        self._drop_pending()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _drop_pending(self) -> None:
        for _, _, future in self._pending:
            if future is not None:
                future.cancel()
        self._pending.clear()
