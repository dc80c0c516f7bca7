"""Training problems with verifiable answers: loading, validation, stable ids and prompt rendering.

A problem set comes from a local JSON Lines / JSON / Parquet file or a Hugging Face `datasets`
name. A `FieldMap` says where the id, question and answer live; dotted paths reach into nested
fields (DAPO-Math-17k keeps its answer in `reward_model.ground_truth`), and a chat-message list
as the question resolves to its last user message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from nemo_paced.atomic import atomic_open
from nemo_paced.localpaths import MissingPath, looks_local

PAPER_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
TEMPLATES = ("raw", "plain", "chat")


class ProblemFormatError(ValueError):
    """A problem set row that cannot be used; the message names the source, the row and the field."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "meta": self.meta}


@dataclass(frozen=True)
class FieldMap:
    """Where each field lives in a row. Each entry lists candidates; the first present one wins.
    `id` may be empty: the id is then a hash of the prompt and answer, stable across runs."""

    id: tuple[str, ...] = ("id", "problem_id", "extra_info.index")
    prompt: tuple[str, ...] = ("prompt", "question", "problem")
    answer: tuple[str, ...] = ("answer", "reward_model.ground_truth", "solution")

    @classmethod
    def parse(cls, spec: str) -> "FieldMap":
        """From `id=uid,prompt=question,answer=reward_model.ground_truth` (the CLI form)."""
        values: dict[str, tuple[str, ...]] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, path = part.partition("=")
            if not sep or key not in ("id", "prompt", "answer") or not path:
                raise ValueError(f"bad field mapping {part!r}: expected id=PATH, prompt=PATH or answer=PATH")
            values[key] = (path,)
        return cls(**values)


def content_id(prompt: str, answer: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{answer}".encode()).hexdigest()[:16]


def load_problems(source: str | Path, *, fields: FieldMap = FieldMap(), split: str = "train",
                  limit: int | None = None, dedupe: bool = False) -> list[Problem]:
    """Load and validate a problem set; raises ProblemFormatError naming the row and field.

    `dedupe` drops rows whose question and answer repeat an earlier row (raw DAPO-Math-17k repeats
    each problem under new ids); the first row's id is kept.
    """
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    seen_content: set[str] = set()
    for row_number, row in _rows(source, split):
        if limit is not None and len(problems) >= limit:
            break
        where = f"{source}: row {row_number}"
        if not isinstance(row, Mapping):
            raise ProblemFormatError(f"{where}: expected an object, got {type(row).__name__}")
        prompt = _text(_lookup(row, fields.prompt, where, "prompt", required=True), where, "prompt")
        answer = _text(_lookup(row, fields.answer, where, "answer", required=True), where, "answer")
        if dedupe:
            content = content_id(prompt, answer)
            if content in seen_content:
                continue
            seen_content.add(content)
        raw_id = _lookup(row, fields.id, where, "id", required=False)
        problem_id = content_id(prompt, answer) if raw_id is None else _text(raw_id, where, "id")
        if problem_id in seen:
            raise ProblemFormatError(f"{where}: field 'id': duplicate id {problem_id!r} (first at row {seen[problem_id]})")
        seen[problem_id] = row_number
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        problems.append(Problem(problem_id, prompt, answer, dict(meta)))
    if not problems:
        raise ProblemFormatError(f"{source}: no problems found")
    return problems


def save_problems(path: str | Path, problems: Iterable[Problem]) -> None:
    """Write a problem set as JSON Lines, atomically."""
    with atomic_open(path, "w") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_row()) + "\n")


def render_prompt(problem: Problem, template: str = "plain", tokenizer: Any = None,
                  suffix: str = PAPER_SUFFIX) -> str:
    """The text the model is conditioned on.

    raw: the question as stored. plain: question, newline, the paper's suffix. chat: the
    tokenizer's chat template around one user turn (question + suffix), with the generation prompt.
    """
    if template == "raw":
        return problem.prompt
    content = f"{problem.prompt}\n{suffix}" if suffix else problem.prompt
    if template == "plain":
        return content
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")


def _rows(source: str | Path, split: str) -> Iterator[tuple[int, Any]]:
    path = Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            yield from enumerate(_json(text, f"{path}"), start=1)
            return
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield number, _json(line, f"{path}: row {number}")
        return
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    if path.suffix in (".jsonl", ".json", ".parquet"):
        raise ProblemFormatError(f"{source}: no such file")
    if looks_local(str(source)) and not path.expanduser().exists():  # never a Hub detour for a typo
        raise MissingPath(f"problems {source}: no such file or directory")
    import datasets  # a hub name or a local dataset directory

    yield from enumerate(datasets.load_dataset(str(source), split=split), start=1)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ProblemFormatError(f"{where}: not valid JSON: {e.msg}") from None


def _lookup(row: Mapping[str, Any], paths: tuple[str, ...], where: str, name: str, required: bool) -> Any:
    for path in paths:
        value: Any = row
        for key in path.split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    if required:
        raise ProblemFormatError(f"{where}: field {name!r}: missing (looked for {', '.join(paths)})")
    return None


def _text(value: Any, where: str, name: str) -> str:
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        value = users[-1] if users else None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ProblemFormatError(f"{where}: field {name!r}: expected text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ProblemFormatError(f"{where}: field {name!r}: empty")
    return text
