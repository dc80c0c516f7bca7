"""The chain task: answers are right, splits are disjoint and reproducible, the tokenizer round-trips,
and the tiny-model cache reuses a trained model only under the same key."""

import random

import pytest

from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.tasks import ALPHABET, ChainTask, make_splits
from nemo_paced.tasks.tokenizer import char_tokenizer


def _decode(task: ChainTask, text: str) -> int:
    return int(text[::-1])


def test_answer_is_every_running_result_mod_10_pow_digits():
    task = ChainTask(max_level=3, digits=2)
    problem = task.make([12, 45, 30], "+-")
    assert problem.prompt == "21+54-03...="
    assert problem.answer == "75,72"  # 57, then 27, least-significant digit first
    assert problem.meta == {"level": 2}
    wrap = task.make([5, 7], "-")
    assert _decode(task, wrap.answer) == (5 - 7) % 100


@pytest.mark.parametrize("digits", [1, 2])
def test_random_problems_match_python_arithmetic(digits):
    task = ChainTask(max_level=5, digits=digits)
    rng = random.Random(3)
    for _ in range(200):
        level = rng.randint(1, 5)
        problem = task.sample(level, rng)
        body = problem.prompt.rstrip("=").rstrip(".")
        numbers = [int(body[i:i + digits][::-1]) for i in range(0, len(body), digits + 1)]
        ops = body[digits::digits + 1]
        total, expected = numbers[0], []
        for op, n in zip(ops, numbers[1:]):
            total = (total + n if op == "+" else total - n) % 10**digits
            expected.append(total)
        assert [_decode(task, r) for r in problem.answer.split(",")] == expected
        assert len(problem.prompt) == task.prompt_width
        assert len(problem.answer) == task.answer_length(level)
        assert task.level_of(problem.prompt) == level == problem.meta["level"]


def test_splits_are_disjoint_reproducible_and_sized():
    task = ChainTask(max_level=4, digits=1)
    a = make_splits(task, pool_per_level=30, test_per_level=20, retained_size=40, seed=7)
    b = make_splits(task, pool_per_level=30, test_per_level=20, retained_size=40, seed=7)
    assert a == b
    test_prompts = {p.prompt for level in a.test.values() for p in level}
    pool_prompts = {p.prompt for p in a.pool}
    retained_prompts = {p.prompt for p in a.retained}
    assert len(test_prompts) == 4 * 20 and len(pool_prompts) == 4 * 30 and len(retained_prompts) == 40
    assert not test_prompts & pool_prompts and not test_prompts & retained_prompts
    assert not pool_prompts & retained_prompts
    assert {p.meta["level"] for p in a.retained} == {1}
    other = make_splits(task, pool_per_level=30, test_per_level=20, retained_size=40, seed=8)
    assert {p.prompt for p in other.pool} != pool_prompts


def test_generate_refuses_more_problems_than_a_level_has():
    task = ChainTask(max_level=2, digits=1, ops="+")
    assert len(task.generate(1, 100, seed=0)) == 100  # all 10 x 10 one-step problems
    with pytest.raises(ValueError, match="level 1 has 100 distinct problems left; asked for 101"):
        task.generate(1, 101, seed=0)
    taken = {p.prompt for p in task.generate(1, 60, seed=1)}
    with pytest.raises(ValueError, match="level 1 has 40 distinct problems left"):
        task.generate(1, 41, seed=2, exclude=taken)


@pytest.mark.parametrize("bad", [dict(max_level=0), dict(digits=0), dict(ops="*"), dict(ops="")])
def test_bad_task_settings_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        ChainTask(**bad)


def test_tokenizer_is_one_token_per_character_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = char_tokenizer(ALPHABET)
    text = "3+4-1.=7,6"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    assert loaded.eos_token_id == 1 and loaded.pad_token_id == 0
    with pytest.raises(ValueError, match="alphabet"):
        char_tokenizer("aa")


def test_schedule_stages_and_reestimation_points():
    schedule = TwoStageSchedule(total_steps=10, fkl_fraction=0.6, refresh_every=2)
    assert [schedule.stage(s) for s in range(10)] == ["fkl"] * 6 + ["rkl"] * 4
    assert [s for s in range(12) if schedule.reestimate_before(s)] == [2, 4, 6, 8]
    no_refresh = TwoStageSchedule(total_steps=10, fkl_fraction=0.5, reestimate_at_switch=False)
    assert [s for s in range(10) if no_refresh.reestimate_before(s)] == []
    fkl_only = TwoStageSchedule(total_steps=8, fkl_fraction=1.0, refresh_every=3)
    assert not fkl_only.has_rkl and fkl_only.switch_step == 8
    assert [s for s in range(8) if fkl_only.reestimate_before(s)] == [3, 6]
    odd = TwoStageSchedule(total_steps=10, fkl_fraction=0.3, refresh_every=4)
    assert [s for s in range(10) if odd.reestimate_before(s)] == [3, 7]
    with pytest.raises(ValueError, match="step 10 is outside"):
        schedule.stage(10)
    with pytest.raises(ValueError, match="fkl_fraction"):
        TwoStageSchedule(total_steps=10, fkl_fraction=1.5)
