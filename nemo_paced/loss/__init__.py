"""Distillation losses: exact vocab-parallel divergences and the PACED per-problem reduction."""

from nemo_paced.loss.fused import fused_linear_kl
from nemo_paced.loss.reduce import paced_reduce
from nemo_paced.loss.sampled import sampled_reverse_kl
from nemo_paced.loss.topk import topk_kl
from nemo_paced.loss.vocab_parallel import vocab_parallel_akl, vocab_parallel_jsd, vocab_parallel_kl

__all__ = ["fused_linear_kl", "paced_reduce", "sampled_reverse_kl", "topk_kl", "vocab_parallel_akl",
           "vocab_parallel_jsd", "vocab_parallel_kl"]
