"""Tiny Qwen3-shaped teacher and student written as Hugging Face directories, and a stage's input files.

The tokenizer is the demo's character tokenizer over the rollout toys' alphabet (17 tokens) while the
models keep VOCAB = 320 rows, like Qwen3's 151669-token tokenizer under a 151936-row checkpoint. Bridge's
tokenizer-derived vocabulary (bug 1 of issue 11) would pad 17 to 256 at TP=2 (fewer rows than the
checkpoint) and to 512 at TP=4 (dummy logits); the recipes must keep 320 at every TP.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rollout_toys import ALPHABET

VOCAB = 320


def write_qwen3(path: Path, layers: int, hidden: int, seed: int, vocab: int = VOCAB) -> Path:
    """A randomly initialised Qwen3ForCausalLM (4 heads, 2 key/value groups) with the tokenizer, saved to `path`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from nemo_paced.tasks.tokenizer import char_tokenizer

    tokenizer = char_tokenizer(ALPHABET)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the output so pass rates spread over (0, 1)
        model.model.embed_tokens.weight.mul_(4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_problems(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Problems for the toy verifier `rollout_toys:first_char_in` (answer = the accepted first characters)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = "".join(rng.choice(ALPHABET[:10]) for _ in range(rng.randint(2, 6))) + "="
            answer = "".join(sorted(rng.sample(ALPHABET, rng.randint(1, 10))))
            f.write(json.dumps({"id": f"p{i:03d}", "prompt": prompt, "answer": answer}) + "\n")
    return path


def write_references(path: Path, problems: Path, seed: int = 0) -> Path:
    """One verified teacher reference per problem: an accepted first character, then a few more."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in problems.read_text().splitlines()]
    with open(path, "w") as f:
        f.write(json.dumps({"format": "nemo-paced.references", "schema": 1}) + "\n")
        for row in rows:
            text = rng.choice(row["answer"]) + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 8)))
            f.write(json.dumps({"problem_id": row["id"], "prompt": row["prompt"], "tried": 1, "references": [
                {"text": text, "token_ids": [], "finish_reason": "stop", "score": 1}]}) + "\n")
    return path


def write_qwen2(path: Path, layers: int, hidden: int, seed: int, vocab: int = VOCAB) -> Path:
    """A randomly initialised Qwen2ForCausalLM (Qwen2.5's class: q/k/v bias, no q/k norm; 4 heads, 2
    key/value groups) with the tokenizer, saved to `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nemo_paced.tasks.tokenizer import char_tokenizer

    tokenizer = char_tokenizer(ALPHABET)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="float32")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the output so pass rates spread over (0, 1); give the q/k/v biases values
        model.model.embed_tokens.weight.mul_(4)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
