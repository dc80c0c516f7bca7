import logging

import numpy as np
import pytest
import torch

from nemo_paced.batches import BatchBuilder, Pair, SequenceTooLong, collate, encode_row, leading_rows_for_tokens
from nemo_paced.tasks.tokenizer import char_tokenizer

PAD = 0


def test_row_layout_shifts_labels_and_masks_only_response_tokens():
    row = encode_row([10, 11, 12], [20, 21], seq_length=8, pad_id=PAD)
    assert row.tokens.tolist() == [10, 11, 12, 20, 21, PAD, PAD, PAD]
    assert row.labels.tolist() == [11, 12, 20, 21, PAD, PAD, PAD, PAD]
    # positions 2 and 3 predict the response tokens 20 and 21; nothing else is trained
    assert row.loss_mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert row.tokens_cut == 0 and not row.empty


def test_exact_fit_uses_every_position():
    row = encode_row([1, 2], [3, 4, 5], seq_length=4, pad_id=PAD)
    assert row.tokens.tolist() == [1, 2, 3, 4]
    assert row.labels.tolist() == [2, 3, 4, 5]
    assert row.loss_mask.tolist() == [0, 1, 1, 1]
    assert row.tokens_cut == 0


def test_long_response_loses_its_tail_and_is_counted():
    builder = BatchBuilder(char_tokenizer("0123456789"), seq_length=5)
    batch = builder.micro_batch([Pair("a", [3, 4], [5, 6, 7, 8, 9, 1]), Pair("b", [3], [5, 1])])
    assert batch["tokens"][0].tolist() == [3, 4, 5, 6, 7]
    assert batch["labels"][0].tolist() == [4, 5, 6, 7, 8]  # 9 and the EOS (1) are cut
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 1, 1]
    assert builder.stats.rows == 2 and builder.stats.truncated == 1 and builder.stats.tokens_cut == 2
    assert batch["sample_weight"].tolist() == [1.0, 1.0]


def test_prompt_that_fills_the_sequence_gives_a_zero_row(caplog):
    builder = BatchBuilder(char_tokenizer("0123456789"), seq_length=4)
    with caplog.at_level(logging.WARNING):
        batch = builder.micro_batch([Pair("long", [3, 4, 5, 6, 7, 8], [9, 1], weight=0.25),
                                     Pair("ok", [3], [9, 1], weight=0.5)])
    assert batch["loss_mask"][0].sum() == 0
    assert batch["sample_weight"].tolist() == [0.0, 0.5]  # adds nothing to sum(w) either
    assert builder.stats.empty == 1 and builder.stats.empty_ids == ["long"]
    assert "'long'" in caplog.text and "no room" in caplog.text


def test_error_policy_names_the_problem():
    builder = BatchBuilder(char_tokenizer("0123456789"), seq_length=4, truncation="error")
    with pytest.raises(SequenceTooLong, match="problem 'p7'.*needs 6 positions"):
        builder.micro_batch([Pair("p7", [3, 4, 5], [6, 7, 8, 1])])


def test_bad_settings_are_refused():
    tokenizer = char_tokenizer("01")
    with pytest.raises(ValueError, match="truncation must be one of"):
        BatchBuilder(tokenizer, 8, truncation="left")
    with pytest.raises(ValueError, match="seq_length"):
        BatchBuilder(tokenizer, 1)
    with pytest.raises(ValueError, match="at least one token"):
        encode_row([], [1], 4, PAD)


def test_text_round_trip_with_a_real_tokenizer():
    tokenizer = char_tokenizer("0123456789+=")
    builder = BatchBuilder(tokenizer, seq_length=12)
    prompt, response = builder.prompt_ids("12+30="), builder.response_ids("42")
    assert response[-1] == tokenizer.eos_token_id
    assert builder.response_ids("42", finished=False) == response[:-1]
    batch = builder.micro_batch([Pair("x", prompt, response, weight=0.75)])
    trained = batch["labels"][0][batch["loss_mask"][0].bool()].tolist()
    assert tokenizer.decode(trained[:-1]) == "42" and trained[-1] == tokenizer.eos_token_id
    assert batch["position_ids"].tolist() == [list(range(12))]
    assert batch["tokens"].dtype == torch.int64 and batch["sample_weight"].dtype == torch.float32
    assert batch["problem_ids"] == ["x"]


def test_layout_gives_the_same_loss_as_transformers_labels():
    """Masked next-token loss on our (tokens, labels, loss_mask) equals HF's shifted-label loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = char_tokenizer("0123456789+=")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, pad_token_id=0))
    builder = BatchBuilder(tokenizer, seq_length=10)
    pairs = [Pair("a", builder.prompt_ids("1+2="), builder.response_ids("3")),
             Pair("b", builder.prompt_ids("12+30="), builder.response_ids("42"))]
    batch = builder.micro_batch(pairs)
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"]).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        ours = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        expected = []
        for pair in pairs:
            ids = torch.tensor([[*pair.prompt_ids, *pair.response_ids]])
            labels = ids.clone()
            labels[0, : len(pair.prompt_ids)] = -100
            expected.append((model(input_ids=ids, labels=labels).loss, len(pair.response_ids)))
    reference = sum(loss * n for loss, n in expected) / sum(n for _, n in expected)
    assert np.isclose(ours.item(), reference.item(), rtol=1e-5)


def test_a_token_budget_keeps_the_leading_rows_closest_to_it():
    rows = [encode_row([2, 3], list(range(4, 4 + n)), seq_length=8, pad_id=0) for n in (3, 2, 4, 1)]
    batch = collate(rows, [1.0, 0.0, 1.0, 1.0], ["a", "b", "c", "d"])  # weighted tokens 3, 0, 4, 1: 3, 3, 7, 8
    assert leading_rows_for_tokens(batch, 6)["problem_ids"] == ["a", "b", "c"]  # 7 is nearer 6 than 3
    assert leading_rows_for_tokens(batch, 8)["tokens"].shape == (4, 8)
    assert leading_rows_for_tokens(batch, 100)["problem_ids"] == ["a", "b", "c", "d"]  # never more than drawn
    one = leading_rows_for_tokens(batch, 1)
    assert one["problem_ids"] == ["a"] and one["sample_weight"].tolist() == [1.0]  # never an empty step
