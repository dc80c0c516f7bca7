"""PacedSampler: turns the pass-rate table into the micro-batches each data-parallel rank trains on.

Every global batch is G problems drawn i.i.d. (with replacement) from the draw distribution of the
weight mode (`WeightConfig.draw_and_loss`): `loss` draws uniformly among problems with w > 0 and
carries w as `sample_weight`; `sample` draws proportionally to w with weight 1; `filter` draws
uniformly inside the pass-rate band; `uniform` draws from every problem. A problem of weight 0 has
draw probability 0, so it is never drawn. Drawing with replacement makes each global batch an
unbiased sample of the weighted objective; a problem can repeat within a batch when few have w > 0.

Determinism: global batch b is drawn from `numpy.random.default_rng([seed, b])` and the weights in
force, so every rank that holds the same weights draws the same G problems. DP rank r trains on
the r-th contiguous slice of G / dp_size, cut into micro-batches: the slices are disjoint and cover
the global batch, and all TP ranks and pipeline stages of one DP replica see the same samples.
The seed and b are the whole RNG state; `state_dict` also keeps the weights in force, so a resumed
job continues the exact sequence even if the table moved on meanwhile.

Refresh: at the start of a global batch (every `refresh_every` batches) the first rank of `group`
reads the newest table from its source; if its version changed, it broadcasts the version and the
weights to the group, and every rank swaps them in at the same batch boundary. The swap is logged
with the table version and its age: trainer steps since the checkpoint the newest evidence came
from. `group` must hold every rank that iterates the sampler (default: the world). Under Megatron
pipeline parallelism only the first and last stages read data; build their group once with
`reader_group`.

All weights zero (e.g. the student has mastered everything): with `on_all_zero="stop"` (the
default) drawing raises `AllWeightsZero`, whose message says how many problems sit at p = 0 and
p = 1; the trainer ends the stage there. `on_all_zero="uniform"` is the named fallback: draw every
problem with weight 1, logged as a warning at each batch where it applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from nemo_paced.passrates import PassRateTable, UnknownPolicy
from nemo_paced.weighting import WeightConfig, _enum, effective_sample_size

log = logging.getLogger(__name__)

STATE_FORMAT = "nemo-paced.sampler"
ON_ALL_ZERO = ("stop", "uniform")


class AllWeightsZero(RuntimeError):
    """Every problem has draw weight 0 under the sampler's weight mode: nothing left to train on."""


@dataclass(frozen=True)
class SamplerConfig:
    """global_batch_size G is split over dp_size ranks in micro-batches of micro_batch_size.
    first_step is the trainer step of the sampler's first global batch (for the table's age);
    unknown says how problems absent from the table are weighted (see passrates.UnknownPolicy)."""

    global_batch_size: int
    micro_batch_size: int = 1
    weighting: WeightConfig = field(default_factory=WeightConfig)
    seed: int = 1234
    unknown: UnknownPolicy = UnknownPolicy.EXCLUDE
    on_all_zero: str = "stop"
    refresh_every: int = 1
    first_step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "unknown", _enum(UnknownPolicy, self.unknown, "unknown"))
        if isinstance(self.weighting, dict):
            object.__setattr__(self, "weighting", WeightConfig(**self.weighting))
        for name in ("global_batch_size", "micro_batch_size", "refresh_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.on_all_zero not in ON_ALL_ZERO:
            raise ValueError(f"on_all_zero must be one of {', '.join(ON_ALL_ZERO)}; got {self.on_all_zero!r}")


@dataclass(frozen=True)
class Draw:
    """The problems of one micro-batch for this rank, with their loss weights."""

    step: int  # trainer step of the global batch
    micro: int  # micro-batch index within this rank's share of it
    indices: np.ndarray  # positions in the sampler's problem list
    problem_ids: list[str]
    weights: np.ndarray  # loss weight per problem (sample_weight)
    table_version: int
    table_age: int | None  # steps since the newest evidence's checkpoint; None if unknown


class TableFile:
    """A table source that re-reads a pass-rate file (e.g. the rollout service's) when it changes.

    A change is a new (inode, device, mtime, size) or a new header version. mtime and size alone miss
    two same-size saves within one timestamp tick (coarse on Lustre and NFS); every atomic save makes
    a new inode, but a freed inode number can come back, so the header's version is read too."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._table: PassRateTable | None = None

    def __call__(self) -> PassRateTable:
        with open(self.path, "rb") as f:  # stat and header of one file, even if a save replaces it meanwhile
            stat = os.fstat(f.fileno())
            header = f.readline(1 << 16)
        stamp = (stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_size, _header_version(header))
        if stamp != self._stamp or self._table is None:
            self._table, self._stamp = PassRateTable.load(self.path), stamp
        return self._table


def _header_version(line: bytes) -> object:
    """The version in a table's header line; None when unreadable (PassRateTable.load says why)."""
    try:
        return json.loads(line).get("version")
    except (ValueError, AttributeError):
        return None


def reader_group(is_reader: bool, replica: int | None = None) -> dist.ProcessGroup | None:
    """The process group of the ranks that read data; call it on every rank, e.g. with
    `is_reader = is_pipeline_first_stage() or is_pipeline_last_stage()`.

    Without `replica` it spans every reader (the sampler's group). With `replica` (the DP rank) it
    spans the readers of that data-parallel replica: the peers that must see the same on-policy
    samples (`onpolicy.OnPolicyBatches`). Ranks that do not read get None.
    """
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (bool(is_reader), replica))
    groups = {}
    for key in sorted({r for reads, r in flags if reads}, key=str):  # every rank creates every group, in order
        groups[key] = dist.new_group([rank for rank, (reads, r) in enumerate(flags) if reads and r == key])
    return groups[replica] if is_reader else None


class PacedSampler:
    """Iterator of this DP rank's micro-batches: `Draw`s, or `collate(draw)` when collate is given.

    As Megatron Bridge's external data loader (`dataloader_type="external"`), pass a collate that
    builds the micro-batch dict (e.g. `references.ReferenceBatches`); `next()` is called once per
    micro-batch, G / (micro_batch_size * dp_size) times per step.
    """

    def __init__(self, problem_ids: Sequence[str], config: SamplerConfig,
                 table: PassRateTable | Callable[[], PassRateTable], *, dp_rank: int = 0, dp_size: int = 1,
                 group: dist.ProcessGroup | None = None, collate: Callable[[Draw], Any] | None = None) -> None:
        self.problem_ids = list(problem_ids)
        if not self.problem_ids:
            raise ValueError("the sampler needs at least one problem")
        if len(set(self.problem_ids)) != len(self.problem_ids):
            raise ValueError("problem ids must be unique")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        per_rank, rest = divmod(config.global_batch_size, dp_size * config.micro_batch_size)
        if rest:
            raise ValueError(f"global_batch_size ({config.global_batch_size}) must be a multiple of "
                             f"micro_batch_size * dp_size ({config.micro_batch_size} * {dp_size})")
        self.config, self.dp_rank, self.dp_size, self.group, self.collate = config, dp_rank, dp_size, group, collate
        self.micro_batches_per_step = per_rank
        self._source = table if callable(table) else (lambda: table)
        self._step = config.first_step  # trainer step of the current (or next) global batch
        self._micro = 0
        self._version: int | None = None
        self._weights: np.ndarray | None = None
        self._newest_step: int | None = None
        self._extremes = (0, 0, 0)  # problems at p=0, at p=1 and never estimated, for the all-zero message
        self._distribution: tuple[np.ndarray, np.ndarray, bool] | None = None  # cached per weights
        self._batch: tuple[np.ndarray, np.ndarray] | None = None  # this rank's (indices, loss weights)

    # --- public state ---------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def table_version(self) -> int | None:
        return self._version

    def table_age(self, step: int | None = None) -> int | None:
        """Trainer steps between `step` (default: the current one) and the newest evidence's checkpoint."""
        if self._newest_step is None:
            return None
        return (self._step if step is None else step) - self._newest_step

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._batch is None:
            self._begin_global_batch(refresh=self._micro == 0)
        indices, weights = self._batch
        size = self.config.micro_batch_size
        part = slice(self._micro * size, (self._micro + 1) * size)
        draw = Draw(self._step, self._micro, indices[part], [self.problem_ids[i] for i in indices[part]],
                    weights[part], self._version, self.table_age())
        out = draw if self.collate is None else self.collate(draw)  # a failed collate does not skip the draw
        self._micro += 1
        if self._micro == self.micro_batches_per_step:
            self._micro, self._step, self._batch = 0, self._step + 1, None
        return out

    # --- drawing --------------------------------------------------------------------------------

    def _begin_global_batch(self, refresh: bool) -> None:
        steps_in = self._step - self.config.first_step
        if self._weights is None or (refresh and steps_in % self.config.refresh_every == 0):
            self._refresh()
        if self._distribution is None:
            self._distribution = self._draw_distribution()
        cumulative, loss, fallback = self._distribution
        if fallback:
            log.warning("%s; on_all_zero='uniform': drawing every problem with weight 1 at step %d",
                        self._all_zero_message(), self._step)
        global_batch = draw_global_batch(cumulative, self.config.global_batch_size, self.config.seed, self._step)
        share = self.config.global_batch_size // self.dp_size
        mine = global_batch[self.dp_rank * share:(self.dp_rank + 1) * share]
        self._batch = (mine, loss[mine].astype(np.float32))

    def _draw_distribution(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(cumulative draw weights, loss weights, whether the uniform fallback is in force) for the weights held."""
        draw, loss = self.config.weighting.draw_and_loss(self._weights)
        if draw.sum() > 0:
            return np.cumsum(draw), loss, False
        if self.config.on_all_zero == "stop":
            raise AllWeightsZero(self._all_zero_message() + "; the stage is over (set on_all_zero='uniform' to "
                                                            "keep training on every problem with weight 1)")
        ones = np.ones(len(self.problem_ids))
        return np.cumsum(ones), ones, True

    def _all_zero_message(self) -> str:
        at_zero, at_one, unknown = self._extremes
        return (f"all {len(self.problem_ids)} problems have weight 0 under mode "
                f"'{self.config.weighting.mode.value}' with table version {self._version} ({at_zero} at p=0, "
                f"{at_one} at p=1, {unknown} never estimated)")

    # --- refresh --------------------------------------------------------------------------------

    def _is_source(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == self._source_rank()

    def _source_rank(self) -> int:
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def _refresh(self) -> None:
        payload = None
        if self._is_source():
            table = self._source()
            if table.version != self._version or self._weights is None:
                payload = (table.version, table.weights(self.problem_ids, self.config.weighting, self.config.unknown),
                           *_evidence(table, self.problem_ids))
        payload = self._agree(payload)
        if payload is not None:
            self._swap(*payload)

    def _agree(self, payload: tuple | None) -> tuple | None:
        """The source's payload on every rank of the group: one small broadcast says whether there is
        one, and only a new table is sent as an object."""
        if not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return payload
        nccl = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([payload is not None], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=self._source_rank(), group=self.group)
        if not flag.item():
            return None
        box = [payload]
        dist.broadcast_object_list(box, src=self._source_rank(), group=self.group)
        return box[0]

    def _swap(self, version: int, weights: np.ndarray, newest_step: int | None, extremes: tuple[int, int, int]) -> None:
        previous = self._version
        self._version, self._weights, self._newest_step = version, np.asarray(weights, np.float64), newest_step
        self._extremes = extremes
        self._distribution = None
        age = self.table_age()
        log.info("pass-rate table version %d in use from step %d (was %s): age %s steps, %d of %d problems "
                 "with weight > 0, effective sample size %.1f", version, self._step, previous,
                 "unknown" if age is None else age, int(np.sum(self._weights > 0)), len(self._weights),
                 effective_sample_size(self._weights))

    # --- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact sequence: step, micro-batch, seed, table weights."""
        return {"format": STATE_FORMAT, "problems": _fingerprint(self.problem_ids), "seed": self.config.seed,
                "global_batch_size": self.config.global_batch_size, "micro_batch_size": self.config.micro_batch_size,
                "dp_size": self.dp_size, "step": self._step, "micro": self._micro, "table_version": self._version,
                "newest_step": self._newest_step, "extremes": list(self._extremes),
                "weights": None if self._weights is None else self._weights.tolist()}

    def seek(self, step: int) -> None:
        """Continue at global batch `step` when no saved state is at hand (a job resumed from a
        checkpoint the sampler state was not saved with): the draws are then those of `step` under
        the table loaded next, so no batch is replayed, but the table may be newer than it was."""
        if step < self.config.first_step:
            raise ValueError(f"cannot seek to step {step}, before the sampler's first step {self.config.first_step}")
        self._step, self._micro, self._batch, self._weights, self._distribution = step, 0, None, None, None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sampler state (format {state.get('format')!r})")
        checks = {"problems": _fingerprint(self.problem_ids), "seed": self.config.seed,
                  "global_batch_size": self.config.global_batch_size}
        if state["micro"]:  # resuming inside a global batch: the split must match too
            checks.update(micro_batch_size=self.config.micro_batch_size, dp_size=self.dp_size)
        for key, expected in checks.items():
            if state.get(key) != expected:
                raise ValueError(f"sampler state does not match this sampler: {key} is {state.get(key)!r} in the "
                                 f"state and {expected!r} here")
        self._step, self._micro = int(state["step"]), int(state["micro"])
        self._version, self._newest_step = state["table_version"], state["newest_step"]
        self._extremes = tuple(state["extremes"])
        self._weights = None if state["weights"] is None else np.asarray(state["weights"], np.float64)
        self._distribution, self._batch = None, None


def draw_global_batch(cumulative: np.ndarray, size: int, seed: int, step: int) -> np.ndarray:
    """`size` i.i.d. indices, index i with probability proportional to its weight (cumulative[i] -
    cumulative[i-1]); a pure function of (seed, step) given the weights."""
    total = cumulative[-1]
    uniforms = np.random.default_rng([seed, step]).random(size) * total
    # side="right" never lands on a zero-weight index; the clamp (to the last positive weight)
    # guards against u rounding up to the total
    last = np.searchsorted(cumulative, total, side="left")
    return np.minimum(np.searchsorted(cumulative, uniforms, side="right"), last)


def _evidence(table: PassRateTable, problem_ids: Sequence[str]) -> tuple[int | None, tuple[int, int, int]]:
    """The step of the newest evidence, and how many problems sit at p=0, at p=1 and are unestimated."""
    records = [table.get(i) for i in problem_ids]
    known = [r for r in records if r is not None]
    steps = [r.step for r in known if r.step is not None]
    extremes = (sum(r.successes == 0 for r in known), sum(r.successes == r.trials for r in known),
                len(records) - len(known))
    return (max(steps) if steps else None), extremes


def _fingerprint(problem_ids: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(problem_ids).encode()).hexdigest()[:16]
