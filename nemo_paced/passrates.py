"""Per-problem pass-rate evidence: what the student solved, from which checkpoint, and when.

The table is the hand-off between the rollout service (which writes it) and the sampler (which
turns it into weights). It is saved as JSON Lines: a header line, then one record per problem:

    {"format": "nemo-paced.passrates", "schema": 1, "version": 7, "update_mode": "replace", "decay": 0.5}
    {"problem_id": "p1", "successes": 3, "trials": 8, "checkpoint": "ckpt/step-200", "step": 200,
     "updated_at": 1764300000.0, "version": 7}

`version` rises by one on every update, so a reader can tell that a refresh happened and ask for
the records changed since the version it holds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from nemo_paced.atomic import atomic_open
from nemo_paced.jsonlines import parse_object
from nemo_paced.weighting import WeightConfig, _enum

FORMAT = "nemo-paced.passrates"
SCHEMA = 1


class PassRateFileError(ValueError):
    """A pass-rate file that cannot be read; the message names the file, line and field."""


class UpdateMode(str, Enum):
    """replace: new evidence replaces a problem's old counts (the student changed; old counts are stale).
    accumulate: old counts are multiplied by `decay` and the new ones added, an exponential
    moving estimate that keeps some old evidence when K is small."""

    REPLACE = "replace"
    ACCUMULATE = "accumulate"


class UnknownPolicy(str, Enum):
    """Weight of a problem with no estimate yet.

    exclude: 0, not trained on until estimated (the default: no guessing).
    peak: the kernel's largest weight, treating it as a frontier problem.
    mean: the mean weight of the estimated problems asked about. The unweighted modes (filter,
    uniform) keep weights 0/1: there it is that mean rounded, 1 when at least half of the estimated
    problems are kept, else 0.
    """

    EXCLUDE = "exclude"
    PEAK = "peak"
    MEAN = "mean"


@dataclass(frozen=True)
class Outcome:
    """New rollout evidence for one problem."""

    problem_id: str
    successes: int
    trials: int


@dataclass(frozen=True)
class PassRateRecord:
    problem_id: str
    successes: float
    trials: float
    checkpoint: str | None
    step: int | None
    updated_at: float
    version: int

    @property
    def pass_rate(self) -> float:
        return self.successes / self.trials


class PassRateTable:
    def __init__(self, update_mode: UpdateMode | str = UpdateMode.REPLACE, decay: float = 0.5) -> None:
        self.update_mode = _enum(UpdateMode, update_mode, "update_mode")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must lie in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.version = 0
        self._records: dict[str, PassRateRecord] = {}

    # --- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, problem_id: object) -> bool:
        return problem_id in self._records

    def __getitem__(self, problem_id: str) -> PassRateRecord:
        return self._records[problem_id]

    def get(self, problem_id: str) -> PassRateRecord | None:
        return self._records.get(problem_id)

    def records(self) -> list[PassRateRecord]:
        return list(self._records.values())

    def since(self, version: int) -> list[PassRateRecord]:
        """Records updated after `version` (all of them for version 0)."""
        return [r for r in self._records.values() if r.version > version]

    def counts(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(successes, trials, known) arrays for `ids`; unknown ids get 0/1 counts and known=False."""
        ids = list(ids)
        successes = np.zeros(len(ids))
        trials = np.ones(len(ids))
        known = np.zeros(len(ids), dtype=bool)
        for i, problem_id in enumerate(ids):
            record = self._records.get(problem_id)
            if record is not None:
                successes[i], trials[i], known[i] = record.successes, record.trials, True
        return successes, trials, known

    def pass_rates(self, ids: Iterable[str]) -> np.ndarray:
        """Maximum-likelihood pass rates; NaN for problems never estimated."""
        successes, trials, known = self.counts(ids)
        return np.where(known, successes / trials, np.nan)

    def weights(self, ids: Iterable[str], config: WeightConfig,
                unknown: UnknownPolicy | str = UnknownPolicy.EXCLUDE) -> np.ndarray:
        """One weight per id under `config`; ids never estimated follow `unknown`."""
        unknown = _enum(UnknownPolicy, unknown, "unknown")
        successes, trials, known = self.counts(ids)
        weights = np.zeros(len(known))
        if known.any():
            weights[known] = config.weights(successes[known], trials[known])
        if unknown is UnknownPolicy.PEAK:
            weights[~known] = _kernel_max(config)
        elif unknown is UnknownPolicy.MEAN:
            mean = weights[known].mean() if known.any() else 0.0
            weights[~known] = float(mean >= 0.5) if config.unweighted else mean
        return weights

    # --- writing ------------------------------------------------------------------------------

    def update(self, outcomes: Iterable[Outcome | Mapping[str, Any] | tuple], *, checkpoint: str | None = None,
               step: int | None = None, now: float | None = None) -> int:
        """Fold new evidence in under the table's update mode; returns the new version.

        Every outcome is validated before anything changes, so a bad one leaves the table as it was.
        """
        parsed = [_as_outcome(o, i) for i, o in enumerate(outcomes)]
        if not parsed:
            return self.version
        now = time.time() if now is None else now
        version = self.version + 1
        for outcome in parsed:
            successes, trials = float(outcome.successes), float(outcome.trials)
            old = self._records.get(outcome.problem_id)
            if old is not None and self.update_mode is UpdateMode.ACCUMULATE:
                successes += self.decay * old.successes
                trials += self.decay * old.trials
            self._records[outcome.problem_id] = PassRateRecord(
                outcome.problem_id, successes, trials, checkpoint, step, now, version)
        self.version = version
        return version

    def merge(self, records: Iterable[PassRateRecord], version: int) -> None:
        """Adopt records and the version from another copy of this table (e.g. the service's)."""
        for record in records:
            self._records[record.problem_id] = record
        self.version = max(self.version, version)

    # --- files --------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema": SCHEMA, "version": self.version,
                "update_mode": self.update_mode.value, "decay": self.decay}

    def save(self, path: str | Path) -> None:
        """Write atomically: readers see the previous file or this one, never a partial file."""
        with atomic_open(path, "w") as f:
            f.write(json.dumps(self.header()) + "\n")
            for record in self._records.values():
                f.write(json.dumps(asdict(record)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PassRateTable":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PassRateFileError(f"{path}: cannot read: {e}") from e
        if not lines:
            raise PassRateFileError(f"{path}: empty file (expected a {FORMAT} header line)")
        header = parse_object(lines[0], f"{path}:1", PassRateFileError)
        if header.get("format") != FORMAT:
            raise PassRateFileError(f"{path}:1: field 'format': expected {FORMAT!r}, got {header.get('format')!r}")
        if header.get("schema") != SCHEMA:
            raise PassRateFileError(f"{path}:1: field 'schema': unsupported {header.get('schema')!r} (expected {SCHEMA})")
        version = _field(path, 1, header, "version", int, lambda v: v >= 0)
        try:
            table = cls(header.get("update_mode", UpdateMode.REPLACE), header.get("decay", 0.5))
        except ValueError as e:
            raise PassRateFileError(f"{path}:1: {e}") from e
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            record = _parse_record(path, number, parse_object(line, f"{path}:{number}", PassRateFileError), version)
            if record.problem_id in table._records:
                raise PassRateFileError(f"{path}:{number}: field 'problem_id': duplicate id {record.problem_id!r}")
            table._records[record.problem_id] = record
        table.version = version
        return table

    def to_rows(self, since: int = 0) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.since(since)]

    @classmethod
    def record_from_row(cls, row: Mapping[str, Any], where: str = "row") -> PassRateRecord:
        """Validate one record row (e.g. received over HTTP); errors name `where` and the field."""
        return _parse_record(where, None, dict(row), None)


def _kernel_max(config: WeightConfig) -> float:
    if config.unweighted:
        return 1.0
    total = config.alpha + config.beta
    if total == 0:
        return 1.0
    peak = config.alpha / total
    return peak**config.alpha * (1 - peak) ** config.beta


def _as_outcome(item: Outcome | Mapping[str, Any] | tuple, index: int) -> Outcome:
    if isinstance(item, Outcome):
        outcome = item
    elif isinstance(item, Mapping):
        try:
            outcome = Outcome(item["problem_id"], item["successes"], item["trials"])
        except KeyError as e:
            raise ValueError(f"outcome {index}: missing field {e.args[0]!r}") from None
    else:
        outcome = Outcome(*item)
    if not isinstance(outcome.problem_id, str) or not outcome.problem_id:
        raise ValueError(f"outcome {index}: field 'problem_id' must be a non-empty string, got {outcome.problem_id!r}")
    for name in ("successes", "trials"):
        value = getattr(outcome, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"outcome {index} ({outcome.problem_id}): field {name!r} must be an integer >= 0, got {value!r}")
    if outcome.trials == 0 or outcome.successes > outcome.trials:
        raise ValueError(f"outcome {index} ({outcome.problem_id}): need 0 <= successes <= trials and trials > 0, "
                         f"got successes={outcome.successes}, trials={outcome.trials}")
    return outcome


def _field(path, number, row, name, kind, ok=lambda v: True, nullable=False):
    where = f"{path}:{number}" if number is not None else str(path)
    if name not in row:
        raise PassRateFileError(f"{where}: field {name!r}: missing")
    value = row[name]
    if value is None and nullable:
        return None
    kinds = (int, float) if kind is float else (kind,)
    valid = isinstance(value, kinds) and not isinstance(value, bool)
    if valid and kind is float:
        valid = math.isfinite(value)
    if not valid or not ok(value):
        raise PassRateFileError(f"{where}: field {name!r}: invalid value {value!r}")
    return value


def _parse_record(path, number, row: dict[str, Any], max_version: int | None) -> PassRateRecord:
    problem_id = _field(path, number, row, "problem_id", str, lambda v: v != "")
    trials = _field(path, number, row, "trials", float, lambda v: v > 0)
    successes = _field(path, number, row, "successes", float, lambda v: 0 <= v <= trials)
    checkpoint = _field(path, number, row, "checkpoint", str, nullable=True)
    step = _field(path, number, row, "step", int, lambda v: v >= 0, nullable=True)
    updated_at = _field(path, number, row, "updated_at", float)
    version = _field(path, number, row, "version", int,
                     lambda v: v >= 0 and (max_version is None or v <= max_version))
    return PassRateRecord(problem_id, float(successes), float(trials), checkpoint, step, float(updated_at), version)
