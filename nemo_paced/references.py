"""Teacher reference responses for the forward-KL stage: made once, resumable, and fed to the sampler.

File format (JSON Lines): a header, then one row per problem, in problem order:

    {"format": "nemo-paced.references", "schema": 1, "settings": {...}, "problems": 17398, "verified": 16012}
    {"problem_id": "p1", "prompt": "...", "tried": 1, "verified": 1,
     "references": [{"text": "...", "token_ids": [...], "finish_reason": "stop", "score": 1}]}

`settings` holds everything that decides the responses (teacher, n, keep, template, sampling,
verifier); a resumed run must use the same. With keep="verified" a row keeps only the responses the
verifier accepted, so a problem the teacher never solved has an empty list; keep="all" keeps every
response with its score.

Crash safety: rows are appended, flushed and fsynced to OUT.partial after every engine batch; a
restart reads it back (a torn last line is dropped and redone) and skips the problems done. The
final file is written atomically at the end, and the journal removed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from nemo_paced.atomic import atomic_open
from nemo_paced.batches import BatchBuilder, Pair
from nemo_paced.jsonlines import parse_object
from nemo_paced.problems import Problem, render_prompt
from nemo_paced.rollout.engines.base import Engine, SamplingParams
from nemo_paced.rollout.estimate import ProblemRollouts, batched, rollout
from nemo_paced.rollout.verifiers import Verifier
from nemo_paced.sampler import Draw

log = logging.getLogger(__name__)

FORMAT = "nemo-paced.references"
SCHEMA = 1
KEEP = ("verified", "all")


class ReferenceFileError(ValueError):
    """A references file (or journal) that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class ReferenceConfig:
    """n responses per problem; keep "verified" (only those the verifier accepts) or "all"."""

    n: int = 1
    keep: str = "verified"
    template: str = "plain"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    batch_problems: int = 16

    def __post_init__(self) -> None:
        if self.keep not in KEEP:
            raise ValueError(f"keep must be one of {', '.join(KEEP)}; got {self.keep!r}")
        if self.batch_problems < 1:
            raise ValueError(f"batch_problems must be >= 1, got {self.batch_problems}")
        self.sampling()  # validates n, temperature, top_p, max_tokens

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.n, self.temperature, self.top_p, self.max_tokens, self.seed)


@dataclass(frozen=True)
class Reference:
    text: str
    token_ids: list[int]
    finish_reason: str
    score: int


@dataclass(frozen=True)
class ReferenceRow:
    problem_id: str
    prompt: str
    tried: int
    references: list[Reference] = field(default_factory=list)

    @property
    def verified(self) -> int:
        return sum(r.score for r in self.references)

    def to_json(self) -> str:
        row = asdict(self)
        return json.dumps({**row, "verified": self.verified})


@dataclass(frozen=True)
class Summary:
    problems: int
    with_reference: int
    without: list[str]  # problem ids with no verified reference
    generated: int  # problems generated in this run (the rest were resumed)

    def report(self) -> str:
        shown = ", ".join(self.without[:10]) + (" ..." if len(self.without) > 10 else "")
        return (f"{self.problems} problems: {self.with_reference} with a verified reference, "
                f"{len(self.without)} without{f' ({shown})' if self.without else ''}; "
                f"{self.generated} generated now, {self.problems - self.generated} resumed")


def make_references(engine: Engine, problems: Sequence[Problem], verifier: Verifier, out: str | Path,
                    config: ReferenceConfig = ReferenceConfig(), settings: dict[str, Any] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Summary:
    """Generate and grade teacher responses for every problem not yet in `out`; see the module docstring.

    `settings` (e.g. the teacher and verifier names) are stored in the header with the config and
    must match on resume. `progress(done, total)` is called after every batch.
    """
    out = Path(out)
    settings = {**asdict(config), **(settings or {})}
    settings.pop("batch_problems")  # how work is batched does not change the responses
    journal = out.with_name(out.name + ".partial")
    done = _resume(out, journal, settings)
    wanted = {p.id for p in problems}
    stale = [i for i in done if i not in wanted]
    if stale:
        raise ReferenceFileError(f"{out}: holds {len(stale)} problem(s) not in this problem set "
                                 f"(e.g. {stale[0]!r}); use another --out for another problem set")
    todo = [p for p in problems if p.id not in done]
    if done:
        log.info("resuming %s: %d of %d problems done", out, len(done), len(problems))
    params = config.sampling()
    with open(journal, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps(_header(settings)) + "\n")
        for batch in batched(todo, config.batch_problems):
            for result in rollout(engine, batch, verifier, params, config.template):
                row = _row(result, config.keep)
                f.write(row.to_json() + "\n")
                done[row.problem_id] = row
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(len(done), len(problems))
    rows = [done[p.id] for p in problems]
    with atomic_open(out, "w") as f:
        header = {**_header(settings), "problems": len(rows), "verified": sum(r.verified > 0 for r in rows)}
        f.write(json.dumps(header) + "\n")
        for row in rows:
            f.write(row.to_json() + "\n")
    journal.unlink()
    without = [r.problem_id for r in rows if r.verified == 0]
    return Summary(len(rows), len(rows) - len(without), without, len(todo))


def load_references(path: str | Path, verified_only: bool = True) -> dict[str, list[Reference]]:
    """problem id -> its references (only verified ones unless verified_only=False); problems without
    any are left out, so the keys are the problems the forward-KL stage can train on."""
    _, rows = _read(Path(path), partial=False)
    kept = {}
    for row in rows.values():
        refs = [r for r in row.references if r.score == 1 or not verified_only]
        if refs:
            kept[row.problem_id] = refs
    return kept


class ReferenceBatches:
    """The sampler's collate for the forward-KL stage: each drawn problem's prompt (rendered for the
    student) with one of its teacher references, tokenised by `builder` into a micro-batch.

    A problem with several references uses them in turn, one per step. Token ids are re-derived from
    the reference text with the student's tokenizer (teacher and student share it in logit KD).
    """

    def __init__(self, problems: Sequence[Problem], references: dict[str, list[Reference]], builder: BatchBuilder,
                 template: str = "plain") -> None:
        self.problems = {p.id: p for p in problems}
        missing = [i for i in references if i not in self.problems]
        if missing:
            raise ValueError(f"{len(missing)} reference(s) for problems not in the problem set, e.g. {missing[0]!r}")
        self.references, self.builder, self.template = references, builder, template
        self._prompts: dict[str, list[int]] = {}

    @property
    def problem_ids(self) -> list[str]:
        """The problems with a reference, in problem-set order: the sampler's problem list."""
        return [i for i in self.problems if i in self.references]

    def __call__(self, draw: Draw) -> dict[str, Any]:
        pairs = [Pair(problem_id, *self.sequence(problem_id, draw.step)[1:], float(weight))
                 for problem_id, weight in zip(draw.problem_ids, draw.weights)]
        return self.builder.micro_batch(pairs)

    def sequence(self, problem_id: str, step: int) -> tuple[int, list[int], list[int]]:
        """(index of the reference used at `step`, prompt ids, response ids): what a row trains on,
        and what a teacher cache scored (nemo_paced.teacher.cache)."""
        refs = self.references[problem_id]
        index = step % len(refs)
        ref = refs[index]
        return index, self._prompt_ids(problem_id), self.builder.response_ids(
            ref.text, finished=ref.finish_reason == "stop")

    def _prompt_ids(self, problem_id: str) -> list[int]:
        if problem_id not in self._prompts:
            text = render_prompt(self.problems[problem_id], self.template, self.builder.tokenizer)
            self._prompts[problem_id] = self.builder.prompt_ids(text)
        return self._prompts[problem_id]


# --- file handling -------------------------------------------------------------------------------


def _header(settings: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "schema": SCHEMA, "settings": settings}


def _row(result: ProblemRollouts, keep: str) -> ReferenceRow:
    refs = [Reference(s.text, s.token_ids, s.finish_reason, s.score) for s in result.samples
            if keep == "all" or s.score == 1]
    return ReferenceRow(result.problem_id, result.prompt, result.trials, refs)


def _resume(out: Path, journal: Path, settings: dict[str, Any]) -> dict[str, ReferenceRow]:
    done: dict[str, ReferenceRow] = {}
    for path, partial in ((out, False), (journal, True)):
        if not path.exists():
            continue
        header, rows = _read(path, partial)
        theirs = header.get("settings")
        if theirs != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(settings) | set(theirs or {}) if (theirs or {}).get(k) != settings.get(k))
            raise ReferenceFileError(f"{path}: made with other settings ({', '.join(changed)} differ); "
                                     f"use the same settings to resume, or another --out")
        done.update(rows)
    if done and not journal.exists():  # resuming from a finished file (e.g. more problems now)
        with open(journal, "w", encoding="utf-8") as f:
            f.write(json.dumps(_header(settings)) + "\n")
            f.writelines(row.to_json() + "\n" for row in done.values())
    return done


def _read(path: Path, partial: bool) -> tuple[dict[str, Any], dict[str, ReferenceRow]]:
    """Header and rows of a references file; in a journal (partial) a torn last line is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise ReferenceFileError(f"{path}: cannot read: {e}") from e
    if partial and lines and not lines[-1].endswith("\n"):
        log.warning("%s: dropping a torn last line (a crash mid-write); that problem is redone", path)
        lines = lines[:-1]
        with open(path, "r+", encoding="utf-8") as f:  # so new rows are appended after a whole line
            f.truncate(sum(len(line.encode()) for line in lines))
    if not lines:
        raise ReferenceFileError(f"{path}: empty (expected a {FORMAT} header line)")
    header = parse_object(lines[0], f"{path}:1", ReferenceFileError)
    if header.get("format") != FORMAT or header.get("schema") != SCHEMA:
        raise ReferenceFileError(f"{path}:1: not a {FORMAT} schema {SCHEMA} header")
    rows: dict[str, ReferenceRow] = {}
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            row = _parse_row(path, number, parse_object(line, f"{path}:{number}", ReferenceFileError))
            rows[row.problem_id] = row
    return header, rows


def _parse_row(path: Path, number: int, row: dict[str, Any]) -> ReferenceRow:
    where = f"{path}:{number}"
    try:
        problem_id, prompt, tried = row["problem_id"], row["prompt"], row["tried"]
        refs = [Reference(r["text"], list(r["token_ids"]), r["finish_reason"], int(r["score"]))
                for r in row["references"]]
    except KeyError as e:
        raise ReferenceFileError(f"{where}: field {e.args[0]!r}: missing") from None
    except (TypeError, ValueError) as e:
        raise ReferenceFileError(f"{where}: field 'references': malformed ({e})") from None
    if not isinstance(problem_id, str) or not problem_id:
        raise ReferenceFileError(f"{where}: field 'problem_id': expected a non-empty string")
    if any(r.score not in (0, 1) for r in refs):
        raise ReferenceFileError(f"{where}: field 'references': every score must be 0 or 1")
    return ReferenceRow(problem_id, prompt, tried, refs)
