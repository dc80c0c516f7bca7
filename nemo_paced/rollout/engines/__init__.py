"""Inference engines behind one interface (see `base.Engine`): `hf` (transformers, CPU or GPU),
`vllm` (in-process vllm.LLM, production) and `openai` (a separate `vllm serve`)."""

from nemo_paced.rollout.engines.base import Engine, Generation, Sample, SamplingParams, create_engine

__all__ = ["Engine", "Generation", "Sample", "SamplingParams", "create_engine"]
