"""A character tokenizer over a task's alphabet, saved in the standard fast-tokenizer format.

Every character is one token, so a model's errors are digit-level and the verifier sees exactly
what was generated. Saving it as a `PreTrainedTokenizerFast` lets `AutoTokenizer.from_pretrained`
load it anywhere (the rollout service, the trainer) with no custom code.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """Token ids: 0 pad, 1 eos, 2 unk, then the alphabet's characters in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if len(set(alphabet)) != len(alphabet) or any(c.isspace() for c in alphabet):
        raise ValueError(f"alphabet must be distinct non-space characters, got {alphabet!r}")
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left")
