"""The teacher cache: top-k teacher log-probs on every reference response, written once, so the
forward-KL stage trains without the teacher in the job (`nemo-paced teacher-cache`).

Layout of a cache directory:

    index.json                  what the cache holds (below), rewritten atomically after every shard
    shard-00000.safetensors     per response token, in entry order:
                                  ids             [T, k] int32    the teacher's k most likely next tokens
                                  logprobs        [T, k] float16 | bfloat16   their log-probs
                                  token_logprobs  [T]    float16 | bfloat16   the actual token's log-prob
    ...

so a cached response token costs 4k + 2k + 2 bytes (386 at k = 64). Log-probs are the teacher's at
temperature 1, normalised over its full vocabulary (Σ exp ≤ 1 over the k ids; what is missing is the
tail mass `topk_kl(tail="bucket")` uses); a tempered loss applies its temperature to the student only.

index.json:

    {"format": "nemo-paced.teacher-cache", "schema": 1, "k": 64, "dtype": "float16", "template": "plain",
     "teacher": {"model": ..., "engine": ..., "vocab_size": V, "tokenizer": FINGERPRINT},
     "references": PATH, "bytes_per_token": 386,
     "shards": [{"file": "shard-00000.safetensors", "bytes": B, "sha256": ..., "tokens": T}],
     "entries": {"p1": [{"ref": 0, "shard": 0, "offset": 0, "length": 57, "start": 31, "digest": ...}]},
     "skipped": {"p9": 0.0}, "passrates": {"path": ..., "version": 7}, "scored_tokens": N, "skipped_tokens": M}

An entry is one verified reference of a problem (`ref` indexes the problem's verified references, as
the trainer uses them): the token sequence prompt + response as the trainer builds it, of which
tokens[start:] are scored (`length` of them, rows offset..offset+length of the shard). `digest` hashes
that sequence, so a reference or prompt that changed since is detected on lookup.

Problems whose weight is 0 under the pass-rate table given are not scored: they are listed in
`skipped` with their weight, and a later run with a new table scores only what is still missing.
A shard is written to a temporary file and renamed, and only then entered in the index, so a run
killed at any point loses at most the shard in flight and the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nemo_paced.atomic import atomic_open, atomic_write_json
from nemo_paced.teacher.engines import TopK

log = logging.getLogger(__name__)

FORMAT = "nemo-paced.teacher-cache"
SCHEMA = 1
INDEX = "index.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the shard or entry and the problem."""


@dataclass(frozen=True)
class CacheConfig:
    k: int = 64
    dtype: str = "float16"
    shard_tokens: int = 1 << 20  # response tokens per shard (~400 MB at k = 64)
    batch_sequences: int = 64  # sequences per scoring call

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("k", "shard_tokens", "batch_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def bytes_per_token(self) -> int:
        return 6 * self.k + 2


@dataclass(frozen=True)
class Item:
    """One sequence to cache: problem, reference index, token ids and where the response starts."""

    problem_id: str
    ref: int
    tokens: list[int]
    start: int

    @property
    def digest(self) -> str:
        return sequence_digest(self.tokens, self.start)


def sequence_digest(tokens: Sequence[int], start: int) -> str:
    data = np.asarray([start, *tokens], dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:20]


@dataclass(frozen=True)
class BuildSummary:
    scored: int  # sequences scored in this run
    scored_tokens: int
    cached: int  # sequences already in the cache
    skipped: int  # problems skipped because their weight is 0
    skipped_tokens: int  # response tokens of the skipped problems' references: teacher compute saved
    bytes: int  # total shard bytes

    def report(self) -> str:
        return (f"{self.scored} sequences scored now ({self.scored_tokens} tokens), {self.cached} already cached, "
                f"{self.skipped} problems skipped at weight 0 ({self.skipped_tokens} teacher tokens not scored); "
                f"{self.bytes / 2**20:.1f} MiB of shards")


def build_cache(score: Callable[[list[list[int]], list[int], int], list[TopK]], teacher: dict[str, Any],
                items: Sequence[Item], weights: dict[str, float] | None, out: str | Path,
                config: CacheConfig = CacheConfig(), settings: dict[str, Any] | None = None,
                passrates: dict[str, Any] | None = None, progress: Callable[[int, int], None] | None = None) -> BuildSummary:
    """Score every item whose problem has weight > 0 (all when `weights` is None) and is not cached yet.

    `score(sequences, starts, k)` is a scorer's or TeacherClient's `score`; `teacher` = {"model",
    "engine", "vocab_size", "tokenizer"} identifies it and must match on resume, as must the config's
    k and dtype and `settings` (e.g. the prompt template). `passrates` ({"path", "version"}) names the
    table the weights came from, for the record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # a shard or index in flight when a run was killed
        stale.unlink()
    header = {"format": FORMAT, "schema": SCHEMA, "k": config.k, "dtype": config.dtype, "teacher": teacher,
              **(settings or {})}
    index = _read_index(out) if (out / INDEX).exists() else {**header, "bytes_per_token": config.bytes_per_token,
                                                             "shards": [], "entries": {}, "skipped": {}}
    changed = sorted(key for key in header if index.get(key) != header[key])
    if changed:
        raise CacheError(f"{out / INDEX}: made with other settings ({', '.join(changed)}); use the same "
                         f"teacher and settings to extend it, or another --out")
    entries: dict[str, list[dict[str, Any]]] = index["entries"]
    done = {(pid, e["ref"]): e["digest"] for pid, rows in entries.items() for e in rows}
    skipped = {i.problem_id: float(weights.get(i.problem_id, 0.0)) for i in items
               if weights is not None and not weights.get(i.problem_id, 0.0) > 0}
    skipped_tokens = sum(len(i.tokens) - i.start for i in items if i.problem_id in skipped)
    todo, cached = [], 0
    for item in items:
        if item.problem_id in skipped:
            continue
        stored = done.get((item.problem_id, item.ref))
        if stored == item.digest:
            cached += 1
            continue
        if stored is not None:
            log.warning("problem %r reference %d changed since it was cached: scoring it again", item.problem_id,
                        item.ref)
        todo.append(item)
    index["skipped"] = {pid: w for pid, w in skipped.items() if pid not in entries}
    index["passrates"] = passrates
    scored_tokens = 0
    shard: list[tuple[Item, TopK]] = []

    def flush() -> None:
        nonlocal shard
        if shard:
            _write_shard(out, index, shard, config)
            shard = []

    for first in range(0, len(todo), config.batch_sequences):
        batch = todo[first:first + config.batch_sequences]
        results = score([i.tokens for i in batch], [i.start for i in batch], config.k)
        for item, result in zip(batch, results):
            if result.ids.shape != (len(item.tokens) - item.start, config.k):
                raise CacheError(f"the teacher returned {result.ids.shape} for problem {item.problem_id!r} "
                                 f"reference {item.ref}, expected {(len(item.tokens) - item.start, config.k)}")
            shard.append((item, result))
            scored_tokens += result.ids.shape[0]
        if sum(r.ids.shape[0] for _, r in shard) >= config.shard_tokens:
            flush()
        if progress is not None:
            progress(min(first + len(batch), len(todo)), len(todo))
    flush()
    index["scored_tokens"] = sum(s["tokens"] for s in index["shards"])
    index["skipped_tokens"] = skipped_tokens
    atomic_write_json(out / INDEX, index)
    return BuildSummary(len(todo), scored_tokens, cached, len(index["skipped"]), skipped_tokens,
                        sum(s["bytes"] for s in index["shards"]))


def _write_shard(out: Path, index: dict[str, Any], rows: list[tuple[Item, TopK]], config: CacheConfig) -> None:
    from safetensors.torch import save

    number = len(index["shards"])
    name = f"shard-{number:05d}.safetensors"
    dtype = DTYPES[config.dtype]
    tensors = {"ids": torch.from_numpy(np.concatenate([r.ids for _, r in rows]).astype(np.int32)),
               "logprobs": torch.from_numpy(np.concatenate([r.logprobs for _, r in rows])).to(dtype),
               "token_logprobs": torch.from_numpy(np.concatenate([r.token_logprobs for _, r in rows])).to(dtype)}
    data = save(tensors, metadata={"format": FORMAT, "shard": str(number)})
    with atomic_open(out / name, "wb") as f:
        f.write(data)
    offset = 0
    for item, result in rows:
        entry = {"ref": item.ref, "shard": number, "offset": offset, "length": int(result.ids.shape[0]),
                 "start": item.start, "digest": item.digest}
        kept = [e for e in index["entries"].get(item.problem_id, []) if e["ref"] != item.ref]
        index["entries"][item.problem_id] = sorted([*kept, entry], key=lambda e: e["ref"])
        index["skipped"].pop(item.problem_id, None)
        offset += entry["length"]
    index["shards"].append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "tokens": offset})
    atomic_write_json(out / INDEX, index)  # the shard counts only once the index names it


def _read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{directory}: no {INDEX}: not a teacher cache (make one with nemo-paced teacher-cache)") \
            from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("schema") != SCHEMA:
        raise CacheError(f"{path}: not a {FORMAT} schema {SCHEMA} index")
    return index


class TeacherCache:
    """A cache opened for training. Opening checks every shard's size against the index (a truncated
    shard is named), and with `checksums` its SHA-256; `tokenizer_fingerprint` and `vocab_size`, when
    given, must match the teacher's (a student with another tokenizer cannot use these ids)."""

    def __init__(self, directory: str | Path, *, tokenizer_fingerprint: str | None = None,
                 vocab_size: int | None = None, checksums: bool = False) -> None:
        self.directory = Path(directory)
        self.index = _read_index(self.directory)
        self.k, self.dtype = int(self.index["k"]), self.index["dtype"]
        teacher = self.index["teacher"]
        if tokenizer_fingerprint is not None and teacher["tokenizer"] != tokenizer_fingerprint:
            raise CacheError(f"{self.directory}: made with another tokenizer (teacher {teacher['model']!r}, "
                             f"fingerprint {teacher['tokenizer']}, the student's is {tokenizer_fingerprint}): "
                             "its token ids mean other strings for this student")
        if vocab_size is not None and teacher["vocab_size"] > vocab_size:
            raise CacheError(f"{self.directory}: the teacher's vocabulary ({teacher['vocab_size']}) is larger than "
                             f"the student's ({vocab_size})")
        for shard in self.index["shards"]:
            path = self.directory / shard["file"]
            if not path.exists():
                raise CacheError(f"{path}: missing (the index lists it)")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise CacheError(f"{path}: {size} bytes, the index says {shard['bytes']}: truncated or overwritten; "
                                 "run nemo-paced teacher-cache again to rescore it")
            if checksums and hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
                raise CacheError(f"{path}: SHA-256 differs from the index: the shard is corrupt")
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def problem_ids(self) -> list[str]:
        return list(self.index["entries"])

    @property
    def skipped(self) -> dict[str, float]:
        return dict(self.index["skipped"])

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        if number not in self._shards:
            from safetensors.torch import load_file

            path = self.directory / self.index["shards"][number]["file"]
            try:
                tensors = load_file(path)
                rows = self.index["shards"][number]["tokens"]
                if any(tensors[name].shape[0] != rows for name in ("ids", "logprobs", "token_logprobs")):
                    raise ValueError(f"holds other row counts than the index's {rows}")
            except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt shard, named
                raise CacheError(f"{path}: unreadable shard: {type(e).__name__}: {e}") from None
            self._shards[number] = tensors
        return self._shards[number]

    def lookup(self, problem_id: str, ref: int, tokens: Sequence[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [T, k] int64, logprobs [T, k] float32) for tokens[start:] of this reference; CacheError
        when it is not cached or its sequence changed since."""
        entry = next((e for e in self.index["entries"].get(problem_id, []) if e["ref"] == ref), None)
        if entry is None:
            why = (f"skipped at weight {self.index['skipped'][problem_id]} under pass-rate table "
                   f"{self.index.get('passrates')}" if problem_id in self.index["skipped"] else "not in the cache")
            raise CacheError(f"{self.directory}: problem {problem_id!r} reference {ref}: {why}; run nemo-paced "
                             "teacher-cache with the current pass-rate table to add it")
        if entry["digest"] != sequence_digest(tokens, start):
            shard = self.index["shards"][entry["shard"]]["file"]
            raise CacheError(f"{self.directory / shard}: problem {problem_id!r} reference {ref}: the cached sequence "
                             "no longer matches the reference (its prompt or response tokens changed); run nemo-paced "
                             "teacher-cache again to rescore it")
        tensors = self._shard(entry["shard"])
        rows = slice(entry["offset"], entry["offset"] + entry["length"])
        return tensors["ids"][rows].long(), tensors["logprobs"][rows].float()


def with_teacher_rows(batch: dict[str, Any], rows: Sequence[tuple[torch.Tensor, torch.Tensor, int] | None],
                      k: int, vocab_size: int) -> dict[str, Any]:
    """Add `teacher_ids` [B, S, k] (int64) and `teacher_logprobs` [B, S, k] (float32) to a micro-batch:
    row b's (ids, logprobs, start) cover its response tokens tokens[start:], predicted at positions
    start-1 onwards (labels[t] = tokens[t+1]); positions without a response token get distinct dummy
    ids and the uniform log-prob (loss_mask is 0 there, so they add nothing, and the sparse KL's
    checks pass)."""
    batch_size, seq_length = batch["tokens"].shape
    ids = torch.arange(k, dtype=torch.int64).expand(batch_size, seq_length, k).clone()
    logprobs = torch.full((batch_size, seq_length, k), -float(np.log(vocab_size)), dtype=torch.float32)
    for b, row in enumerate(rows):
        if row is None:
            continue
        row_ids, row_logprobs, start = row
        length = min(row_ids.shape[0], seq_length - (start - 1))
        if length > 0:
            ids[b, start - 1:start - 1 + length] = row_ids[:length]
            logprobs[b, start - 1:start - 1 + length] = row_logprobs[:length]
    return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}


def reference_items(references) -> list[Item]:
    """Every verified reference of a `ReferenceBatches`, as the trainer tokenises it."""
    items = []
    for problem_id in references.problem_ids:
        for step in range(len(references.references[problem_id])):
            ref, prompt, response = references.sequence(problem_id, step)
            items.append(Item(problem_id, ref, [*prompt, *response], len(prompt)))
    return items


class CachedReferenceBatches:
    """The forward-KL collate without a teacher in the job: `ReferenceBatches`' micro-batch plus the
    cached teacher rows (`teacher_ids`, `teacher_logprobs`, see `with_teacher_rows`).

    Only problems with every reference cached are offered to the sampler (`problem_ids`); those the
    cache skipped at weight 0, or never saw, are logged and not trained on until the cache is extended."""

    def __init__(self, references, cache: TeacherCache, vocab_size: int) -> None:
        self.references, self.cache, self.vocab_size = references, cache, vocab_size
        cached = {pid: {e["ref"] for e in rows} for pid, rows in cache.index["entries"].items()}
        self._ids = [pid for pid in references.problem_ids
                     if cached.get(pid, set()) >= set(range(len(references.references[pid])))]
        missing = len(references.problem_ids) - len(self._ids)
        if missing:
            log.warning("%s: %d of %d problems with a reference are not cached (%d skipped at weight 0 when it was "
                        "made); they are not trained on: run nemo-paced teacher-cache with the current table to add "
                        "them", cache.directory, missing, len(references.problem_ids), len(cache.skipped))

    @property
    def problem_ids(self) -> list[str]:
        return self._ids

    def __call__(self, draw) -> dict[str, Any]:
        batch = self.references(draw)
        rows = []
        for problem_id in draw.problem_ids:
            ref, prompt, response = self.references.sequence(problem_id, draw.step)
            ids, logprobs = self.cache.lookup(problem_id, ref, [*prompt, *response], len(prompt))
            rows.append((ids, logprobs, len(prompt)))
        return with_teacher_rows(batch, rows, self.cache.k, self.vocab_size)
