"""The reverse-KL stage's teacher rows from the teacher service: the student's own samples, scored by
the served teacher and aligned with the positions that predict them.

Two steps, so a data source can score on a worker thread and attach on every rank: `score` (one
request per micro-batch, on whichever process talks to the service) and `attach` (pure tensor
layout). Used by the single-machine trainer and by the Bridge on-policy batches
(`nemo_paced.onpolicy.OnPolicyBatches(teacher=...)`: scored by the replica's leader, shared with
its peers).

With `estimator="topk"` (the default) the rows are the teacher's top-k per response token for
`topk_kl`; with `"sampled"` only the sampled token's log-prob is needed (`sampled_reverse_kl`), so
the service is asked for k = 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nemo_paced.teacher.cache import with_teacher_rows
from nemo_paced.teacher.client import TeacherClient
from nemo_paced.teacher.engines import TopK, tokenizer_fingerprint

ESTIMATORS = ("topk", "sampled")


class ServedTeacherMismatch(ValueError):
    """The served teacher's token ids do not mean the student's tokens."""


class ServedTeacher:
    """Scores (prompt ids, response ids) pairs at the teacher service and lays the answers out as
    `teacher_ids` / `teacher_logprobs` [B, S, k] and `teacher_token_logprobs` [B, S]."""

    def __init__(self, client: TeacherClient, vocab_size: int, k: int = 64, estimator: str = "topk") -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.client, self.vocab_size, self.estimator = client, vocab_size, estimator
        self.k = 1 if estimator == "sampled" else k

    @classmethod
    def connect(cls, address: str, tokenizer: Any, vocab_size: int, k: int = 64,
                estimator: str = "topk") -> "ServedTeacher":
        """Connect and check the service's tokenizer fingerprint and vocabulary against the student's."""
        client = TeacherClient.connect(address)
        served = client.info
        if served["tokenizer"] != tokenizer_fingerprint(tokenizer) or served["vocab_size"] > vocab_size:
            client.close()
            raise ServedTeacherMismatch(
                f"the teacher service at {client.url} serves {served['model']!r} with another tokenizer or a "
                f"larger vocabulary ({served['vocab_size']}) than the student's ({vocab_size}): its token ids "
                "would not mean the student's tokens")
        return cls(client, vocab_size, k, estimator)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[TopK]:
        """The teacher's answer for each (prompt ids, response ids)."""
        return self.client.score([[*prompt, *response] for prompt, response in pairs],
                                 [len(prompt) for prompt, _ in pairs], self.k)

    def attach(self, batch: dict[str, Any], prompt_lengths: Sequence[int], scored: Sequence[TopK]) -> dict[str, Any]:
        """`batch` (rows laid out by `BatchBuilder`, prompt first) with the teacher rows added."""
        rows = [(torch.from_numpy(r.ids), torch.from_numpy(r.logprobs), start)
                for r, start in zip(scored, prompt_lengths)]
        batch = with_teacher_rows(batch, rows, self.k, self.vocab_size)
        token_logprobs = torch.zeros(batch["tokens"].shape, dtype=torch.float32)
        for b, (r, start) in enumerate(zip(scored, prompt_lengths)):
            length = max(0, min(len(r.token_logprobs), token_logprobs.shape[1] - (start - 1)))
            token_logprobs[b, start - 1:start - 1 + length] = torch.from_numpy(r.token_logprobs[:length])
        return {**batch, "teacher_token_logprobs": token_logprobs}

    def close(self) -> None:
        self.client.close()
