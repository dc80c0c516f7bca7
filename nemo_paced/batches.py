"""(prompt, response) pairs tokenised into the arrays Megatron's GPT step reads, and collated.

Layout of one row of length `seq_length` (S), built from the ids `prompt + response`:

    tokens[t]       input id at position t
    labels[t]       tokens[t + 1], the id predicted at position t
    loss_mask[t]    1.0 exactly where labels[t] is a response token, else 0.0
    position_ids[t] t

Rows are right-padded with the pad id (loss_mask 0 there). Under causal attention no real token
attends to a later pad, so no attention mask is needed. A micro-batch adds `sample_weight` [B]
(the per-problem loss weight, float32) and `problem_ids` (a list of str, for logging).

Truncation policy, when prompt + response needs more than S positions:

- "response" (the default): the whole prompt is kept and the end of the response is cut. The cut
  response loses its EOS, so that row does not teach the model to stop; each cut is counted in
  `TruncationStats` (rows cut, response tokens dropped) for the trainer to report.
- A prompt so long that no response token fits keeps its row (batch shapes stay fixed) with
  loss_mask 0 and sample_weight 0, so it adds nothing to the loss nor to the weight normaliser;
  counted as `empty`.
- "error": raise `SequenceTooLong` naming the problem instead of cutting anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

TRUNCATION_POLICIES = ("response", "error")


class SequenceTooLong(ValueError):
    """prompt + response does not fit in seq_length under the "error" truncation policy."""


@dataclass(frozen=True)
class Pair:
    """One training sequence: token ids of the prompt and of the response, and its loss weight."""

    problem_id: str
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    weight: float = 1.0


@dataclass
class TruncationStats:
    """Running counts of what the truncation policy did, for the training log."""

    rows: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    empty: int = 0
    empty_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows: {self.truncated} responses cut ({self.tokens_cut} tokens dropped), "
                f"{self.empty} with no room for a response token")


@dataclass(frozen=True)
class Row:
    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    tokens_cut: int
    empty: bool


def encode_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_length: int, pad_id: int) -> Row:
    """One row of the layout above under the "response" truncation policy (pure array code)."""
    if not prompt_ids:
        raise ValueError("a prompt needs at least one token: the first response token is predicted from it")
    ids = np.asarray([*prompt_ids, *response_ids], dtype=np.int64)
    kept = ids[: seq_length + 1]
    positions = len(kept) - 1
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    tokens[: min(len(kept), seq_length)] = kept[:seq_length]
    labels[:positions] = kept[1:]
    first_response_position = len(prompt_ids) - 1
    loss_mask[first_response_position:positions] = 1.0
    cut = max(0, len(ids) - len(kept))
    return Row(tokens, labels, loss_mask, tokens_cut=min(cut, len(response_ids)),
               empty=first_response_position >= positions)


def collate(rows: Sequence[Row], weights: Sequence[float], problem_ids: Sequence[str]) -> dict[str, Any]:
    """Stack rows into one micro-batch; rows with no response token get sample_weight 0."""
    if not rows:
        raise ValueError("a micro-batch needs at least one row")
    weight = np.asarray(weights, dtype=np.float32) * np.asarray([not r.empty for r in rows], dtype=np.float32)
    seq_length = len(rows[0].tokens)
    return {
        "tokens": torch.from_numpy(np.stack([r.tokens for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "loss_mask": torch.from_numpy(np.stack([r.loss_mask for r in rows])),
        "position_ids": torch.arange(seq_length, dtype=torch.int64).expand(len(rows), seq_length).clone(),
        "sample_weight": torch.from_numpy(weight),
        "problem_ids": list(problem_ids),
    }


def leading_rows_for_tokens(batch: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The batch's first rows whose weighted response tokens add up closest to `tokens` (at least
    one row). A step then trains on a fixed token count whatever the sequence lengths, as packed
    sequences do in Megatron, so methods that favour short or long problems get the same budget."""
    per_row = (batch["loss_mask"].sum(dim=1) * (batch["sample_weight"] > 0)).cumsum(dim=0)
    rows = int(torch.argmin((per_row - tokens).abs())) + 1
    return {key: value[:rows] for key, value in batch.items()}


class BatchBuilder:
    """Tokenises text with one tokenizer and builds micro-batches of one sequence length.

    `prompt_ids` adds the tokenizer's special tokens (BOS) unless the text already starts with the
    BOS token, as a chat-template rendering does. `response_ids` appends EOS when the response
    ended on its own (`finished`), so the model learns where to stop.
    """

    def __init__(self, tokenizer: Any, seq_length: int, truncation: str = "response") -> None:
        if seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {seq_length}")
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}; got {truncation!r}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.truncation = truncation
        self.pad_id = int(pad_id)
        self.stats = TruncationStats()

    def prompt_ids(self, prompt: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        special = not (bos and prompt.startswith(bos))
        return list(self.tokenizer.encode(prompt, add_special_tokens=special))

    def response_ids(self, response: str, finished: bool = True) -> list[int]:
        ids = list(self.tokenizer.encode(response, add_special_tokens=False))
        eos = self.tokenizer.eos_token_id
        if finished and eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        return ids

    def micro_batch(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        rows = []
        for pair in pairs:
            needed = len(pair.prompt_ids) + len(pair.response_ids) - 1
            if needed > self.seq_length and self.truncation == "error":
                raise SequenceTooLong(f"problem {pair.problem_id!r}: prompt ({len(pair.prompt_ids)} tokens) + "
                                      f"response ({len(pair.response_ids)}) needs {needed} positions, "
                                      f"seq_length is {self.seq_length}")
            row = encode_row(pair.prompt_ids, pair.response_ids, self.seq_length, self.pad_id)
            self._count(pair, row)
            rows.append(row)
        return collate(rows, [p.weight for p in pairs], [p.problem_id for p in pairs])

    def _count(self, pair: Pair, row: Row) -> None:
        self.stats.rows += 1
        if row.empty:
            self.stats.empty += 1
            if len(self.stats.empty_ids) < 20:
                self.stats.empty_ids.append(pair.problem_id)
            log.warning("problem %r: the prompt (%d tokens) leaves no room for a response in seq_length %d; "
                        "row kept with loss_mask 0 and sample_weight 0", pair.problem_id, len(pair.prompt_ids),
                        self.seq_length)
        elif row.tokens_cut:
            if self.stats.truncated == 0:
                log.warning("problem %r: response cut by %d tokens to fit seq_length %d (truncation policy "
                            "'response'; further cuts are counted in TruncationStats)",
                            pair.problem_id, row.tokens_cut, self.seq_length)
            self.stats.truncated += 1
            self.stats.tokens_cut += row.tokens_cut
