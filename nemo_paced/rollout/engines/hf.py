"""The `hf` engine: batched sampling with Hugging Face transformers, on CPU or GPU.

Prompts are left-padded into batches of up to `batch_size` sequences (prompts x n). Log-probs come
from the raw logits `generate` returns for every step, so they are the model's own distribution at
the moment of sampling. Those logits are held for one batch: lower `batch_size` for large vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_paced.rollout.engines.base import CheckpointError, Generation, Sample, SamplingParams


class HFEngine:
    name = "hf"

    def __init__(self, model: str, tokenizer: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 64) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.load_weights(model)

    @property
    def tokenizer(self):
        return self._tokenizer

    def load_weights(self, path: str) -> None:
        """Load a checkpoint directory in Hugging Face format (safetensors only: nothing is unpickled).

        transformers fills tensors missing from a checkpoint with random values and skips unexpected
        ones; a checkpoint with either, with a shape mismatch, or whose tensors differ from the model
        being served is refused (CheckpointError), and the weights in use are kept."""
        from transformers import AutoModelForCausalLM

        if not Path(path).is_dir():
            raise CheckpointError(f"checkpoint {path!r} is not a directory")
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, use_safetensors=True,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
        except Exception as e:  # noqa: BLE001 - corrupt safetensors, bad config.json, no weights file, ...
            raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from e
        problems = [_keys(f"{kind} keys", sorted(info.get(name) or ())) for kind, name in
                    (("missing", "missing_keys"), ("unexpected", "unexpected_keys"))]
        problems.append(_keys("shape mismatches", sorted(f"{key} {tuple(got)} (config: {tuple(want)})"
                                                       for key, got, want in info.get("mismatched_keys") or ())))
        if getattr(self, "model", None) is not None:
            problems.append(_architecture_change(self.model, model))
        problems = [p for p in problems if p]
        if problems:
            raise CheckpointError(f"checkpoint {path!r} refused, the weights in use are kept: {'; '.join(problems)}")
        self.model = model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = self._tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.checkpoint = str(path)

    def close(self) -> None:
        pass  # nothing outlives the Python objects

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        encoded = [self._tokenizer(p)["input_ids"] for p in prompts]
        per_call = max(1, self.batch_size // params.n)
        generations: list[Generation] = []
        for start in range(0, len(encoded), per_call):
            generations += self._generate_batch(encoded[start:start + per_call], params)
        return generations

    def _generate_batch(self, encoded: list[list[int]], params: SamplingParams) -> list[Generation]:
        pad = self._tokenizer.pad_token_id
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(encoded):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        greedy = params.temperature == 0  # n identical samples: decode once, copy
        sampling = ({"do_sample": False} if greedy else
                    {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0})
        copies = 1 if greedy else params.n
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=params.max_tokens, num_return_sequences=copies,
                                  pad_token_id=pad, eos_token_id=sorted(self.eos_ids), output_logits=True,
                                  return_dict_in_generate=True, **sampling)
        tokens = out.sequences[:, width:]
        logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
                                for t, step in enumerate(out.logits)], dim=1)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        generations = []
        for i, prompt in enumerate(encoded):
            rows = [i * copies + (0 if greedy else j) for j in range(params.n)]
            samples = [self._sample(tokens[row], logprobs[row]) for row in rows]
            generations.append(Generation(prompt, samples))
        return generations

    def _sample(self, tokens: list[int], logprobs: list[float]) -> Sample:
        """Cut a row at its first end-of-sequence token (kept) and drop the padding after it."""
        end = next((t for t, token in enumerate(tokens) if token in self.eos_ids), None)
        length = len(tokens) if end is None else end + 1
        text = self._tokenizer.decode(tokens[:length], skip_special_tokens=True)
        return Sample(text, tokens[:length], logprobs[:length], "length" if end is None else "stop")


def _keys(what: str, keys: list[str], shown: int = 8) -> str:
    """'missing keys (3): a, b, c' (the first `shown` of them), or '' for none."""
    if not keys:
        return ""
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{what} ({len(keys)}): {', '.join(keys[:shown])}{more}"


def _architecture_change(old, new) -> str:
    """The tensors that differ between the served model and a new one ('' when none): a reload swaps
    weights, never the architecture."""
    old_shapes = {k: tuple(v.shape) for k, v in old.state_dict().items()}
    new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    changed = sorted(set(old_shapes) ^ set(new_shapes)) + sorted(
        f"{k} {new_shapes[k]} vs served {old_shapes[k]}" for k in set(old_shapes) & set(new_shapes)
        if old_shapes[k] != new_shapes[k])
    return _keys("tensors differing from the served model", changed)
