"""Synthetic verifiable tasks for the single-machine demo: generators, splits and a character tokenizer."""

from nemo_paced.tasks.chain import ALPHABET, ChainTask, TaskSplits, make_splits

__all__ = ["ALPHABET", "ChainTask", "TaskSplits", "make_splits"]
