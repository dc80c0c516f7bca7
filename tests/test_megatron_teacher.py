"""Teacher/student compatibility checks: vocabulary, tokenizer, parallel layout."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from nemo_paced.megatron.teacher import TeacherMismatchError, check_layout, check_tokenizers, check_vocab


def tokenizer(words: list[str], eos: str = "</s>") -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "<pad>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos, pad_token="<pad>")


def test_same_tokenizer_passes_and_differences_are_named():
    check_tokenizers(tokenizer(["a", "b", "c"]), tokenizer(["a", "b", "c"]))
    with pytest.raises(TeacherMismatchError, match=r"only in student: \['d'\]"):
        check_tokenizers(tokenizer(["a", "b", "c", "d"]), tokenizer(["a", "b", "c"]))
    with pytest.raises(TeacherMismatchError, match=r"different ids: \['b', 'c'\]"):
        check_tokenizers(tokenizer(["a", "b", "c"]), tokenizer(["a", "c", "b"]))
    with pytest.raises(TeacherMismatchError, match="eos_token_id"):
        check_tokenizers(tokenizer(["a"], eos="</s>"), tokenizer(["a"], eos="<pad>"))


def test_vocab_sizes_must_match():
    check_vocab(151936, 151936)
    with pytest.raises(TeacherMismatchError, match="student=151936, teacher=152064"):
        check_vocab(151936, 152064)


def _config(**overrides) -> TransformerConfig:
    settings = dict(num_layers=2, hidden_size=16, num_attention_heads=4, pipeline_dtype=torch.float32)
    return TransformerConfig(**{**settings, **overrides})


def test_layout_must_match():
    check_layout(_config(tensor_model_parallel_size=2), _config(tensor_model_parallel_size=2, hidden_size=32))
    with pytest.raises(TeacherMismatchError, match="tensor_model_parallel_size: student=2, teacher=1"):
        check_layout(_config(tensor_model_parallel_size=2), _config())
    with pytest.raises(TeacherMismatchError, match="pipeline_dtype"):
        check_layout(_config(), _config(pipeline_dtype=torch.bfloat16))


def test_check_frozen_names_a_trainable_teacher_parameter():
    from types import SimpleNamespace

    from nemo_paced.megatron.teacher import check_frozen, freeze

    teacher = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="teacher parameter weight is trainable"):
        check_frozen(SimpleNamespace(teacher_model=teacher))
    check_frozen(SimpleNamespace(teacher_model=freeze(teacher)))
    assert not teacher.training
    teacher.bias.grad = torch.zeros(2)
    with pytest.raises(RuntimeError, match="teacher parameter bias"):
        check_frozen(SimpleNamespace(teacher_model=teacher))
