"""The `hf` engine and the shared rollout path, in process, on a tiny random GPT-2."""

from pathlib import Path

import pytest
import torch
from rollout_toys import first_char_in, save_broken_checkpoints, save_tiny_model, teacher_forced_logprobs, toy_problems

from nemo_paced.rollout.engines import SamplingParams, create_engine
from nemo_paced.rollout.engines.base import MIN_TEMPERATURE, CheckpointError
from nemo_paced.rollout.estimate import ProblemRollouts, rollout

PROMPTS = ["12+34=", "5=", "99+1-23+4="]  # different lengths, so batches are left-padded
EOS = 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {name: (str(root / name), save_tiny_model(root / name, seed=seed)) for name, seed in (("a", 0), ("b", 1))}


def check_logprobs(generations, model):
    for generation in generations:
        for sample in generation.samples:
            expected = teacher_forced_logprobs(model, generation.prompt_token_ids, sample.token_ids)
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize("batch_size", [2, 64])  # a call per prompt (n=3 > 2), or all prompts left-padded together
def test_samples_and_logprobs_match_teacher_forcing(models, batch_size):
    engine = create_engine("hf", models["a"][0], batch_size=batch_size)
    generations = engine.generate(PROMPTS, SamplingParams(n=3, max_tokens=10, seed=0))
    assert [g.prompt_token_ids for g in generations] == [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert [len(g.samples) for g in generations] == [3] * len(PROMPTS)
    for sample in (s for g in generations for s in g.samples):
        assert len(sample.token_ids) == len(sample.logprobs)
        assert EOS not in sample.token_ids[:-1]  # cut at the first end-of-sequence token, padding dropped
        if sample.finish_reason == "stop":
            assert sample.token_ids[-1] == EOS
        else:
            assert sample.finish_reason == "length" and len(sample.token_ids) == 10
        assert sample.text == engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    assert {s.finish_reason for g in generations for s in g.samples} == {"stop", "length"}
    check_logprobs(generations, models["a"][1])


def test_seed_reproduces_and_greedy_is_deterministic(models):
    engine = create_engine("hf", models["a"][0])
    params = SamplingParams(n=4, max_tokens=8, seed=3)
    assert engine.generate(PROMPTS, params) == engine.generate(PROMPTS, params)
    greedy = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.0, max_tokens=8))
    for generation in greedy:
        assert len({tuple(s.token_ids) for s in generation.samples}) == 1
        first = generation.samples[0]
        logits = models["a"][1](torch.tensor([generation.prompt_token_ids])).logits[0, -1]
        assert first.token_ids[0] == int(logits.argmax())


def test_load_weights_swaps_the_model(models):
    engine = create_engine("hf", models["a"][0])
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    before = engine.generate(PROMPTS, greedy)
    engine.load_weights(models["b"][0])
    assert engine.checkpoint == models["b"][0]
    after = engine.generate(PROMPTS, greedy)
    assert [g.samples[0].logprobs for g in after] != [g.samples[0].logprobs for g in before]
    check_logprobs(before, models["a"][1])
    check_logprobs(after, models["b"][1])
    with pytest.raises(CheckpointError, match="not a directory"):
        engine.load_weights(models["b"][0] + "-missing")
    assert engine.checkpoint == models["b"][0]


def test_broken_checkpoints_are_refused_and_the_weights_kept(models, tmp_path):
    """transformers loads a checkpoint missing half its tensors by initialising them randomly; the
    engine must refuse it (and every other broken one), name the keys, and keep serving the old weights."""
    engine = create_engine("hf", models["a"][0])
    params = SamplingParams(n=2, max_tokens=6, seed=5)
    before = engine.generate(PROMPTS, params)
    for name, (path, needle) in save_broken_checkpoints(Path(models["a"][0]), tmp_path).items():
        with pytest.raises(CheckpointError, match="refused|cannot read") as error:
            engine.load_weights(str(path))
        assert needle in str(error.value), (name, str(error.value))
        assert engine.checkpoint == models["a"][0]
        assert engine.generate(PROMPTS, params) == before, name
    engine.load_weights(models["b"][0])  # a good checkpoint still loads
    check_logprobs(engine.generate(PROMPTS, params), models["b"][1])


def test_a_broken_first_checkpoint_is_refused(models, tmp_path):
    path, needle = save_broken_checkpoints(Path(models["a"][0]), tmp_path)["missing"]
    with pytest.raises(CheckpointError, match="missing keys"):
        create_engine("hf", str(path))


@pytest.mark.parametrize("bad", [dict(temperature=1e-300), dict(temperature=MIN_TEMPERATURE / 2),
                                 dict(seed=2**64), dict(seed=-1), dict(temperature=float("nan"))])
def test_sampling_params_refuse_values_generation_cannot_take(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_smallest_temperature_generates(models):
    engine = create_engine("hf", models["a"][0])
    generations = engine.generate(PROMPTS, SamplingParams(n=2, temperature=MIN_TEMPERATURE, max_tokens=4,
                                                          seed=2**63 - 1))
    check_logprobs(generations, models["a"][1])


def test_rollout_grades_every_sample_and_round_trips_as_json(models):
    import json

    engine = create_engine("hf", models["a"][0])
    problems = toy_problems()
    results = rollout(engine, problems, first_char_in, SamplingParams(n=5, max_tokens=3, seed=0), template="raw")
    assert [r.problem_id for r in results] == [p.id for p in problems]
    for problem, result in zip(problems, results):
        assert result.prompt == problem.prompt and result.checkpoint == models["a"][0]
        assert [s.score for s in result.samples] == [int(first_char_in(s.text, problem.answer)) for s in result.samples]
        assert result.outcome().successes == sum(s.score for s in result.samples) and result.outcome().trials == 5
        assert ProblemRollouts.from_row(json.loads(json.dumps(result.to_row()))) == result


def test_engine_choice_errors():
    with pytest.raises(ValueError, match="engine must be 'hf', 'vllm' or 'openai'"):
        create_engine("tgi", "x")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_engine_names_the_missing_package(models):
    with pytest.raises(ImportError, match="needs the `vllm` package"):
        create_engine("vllm", models["a"][0])


def test_chat_prompts_get_no_second_bos(models, tmp_path):
    """A tokenizer that adds BOS, and a chat template that writes BOS itself: BOS must appear once."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    from nemo_paced.problems import Problem

    shutil.copytree(models["a"][0], tmp_path / "m", dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", EOS)])
    tokenizer.chat_template = "<eos>{% for m in messages %}{{ m['content'] }}{% endfor %}="
    tokenizer.save_pretrained(tmp_path / "m")
    engine = create_engine("hf", str(tmp_path / "m"))
    problem = Problem("q", "12+3", "5")
    params = SamplingParams(n=1, max_tokens=2, seed=0)
    raw = rollout(engine, [problem], first_char_in, params, template="raw")[0]
    chat = rollout(engine, [problem], first_char_in, params, template="chat")[0]
    digits = engine.tokenizer("12+3", add_special_tokens=False)["input_ids"]
    assert raw.prompt_token_ids == [EOS] + digits  # the tokenizer's BOS
    assert engine.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("<eos>")
    assert chat.prompt.startswith("12+3")  # the template's BOS text is left to the tokenizer
    assert chat.prompt_token_ids[:2] == [EOS, digits[0]]  # BOS once
