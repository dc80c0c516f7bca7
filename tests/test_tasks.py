"""The running-mean task: answers are right, splits are disjoint and reproducible, the tokenizer
round-trips, and the two-stage schedule switches and re-estimates where it should."""

import random

import pytest

from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.tasks import ALPHABET, ChainTask, make_splits
from nemo_paced.tasks.tokenizer import char_tokenizer


def test_answer_is_every_running_floor_mean():
    task = ChainTask(max_level=3)
    problem = task.make([4, 7, 5])
    assert problem.prompt == "475.="
    assert problem.answer == "55"  # (4 + 7) // 2 = 5, then (5 + 5) // 2 = 5
    assert problem.meta == {"level": 2}
    assert task.make([9, 0, 9, 9]).answer == "467"
    with pytest.raises(ValueError, match="need 2..4 digits"):
        task.make([1, 2, 3, 4, 5])


def test_random_problems_match_python_arithmetic():
    task = ChainTask(max_level=6)
    rng = random.Random(3)
    for _ in range(300):
        level = rng.randint(1, 6)
        problem = task.sample(level, rng)
        digits = [int(c) for c in problem.prompt.rstrip("=").rstrip(".")]
        mean, expected = digits[0], ""
        for d in digits[1:]:
            mean = (mean + d) // 2
            expected += str(mean)
        assert problem.answer == expected
        assert len(problem.prompt) == task.prompt_width
        assert len(problem.answer) == task.answer_length(level)
        assert task.level_of(problem.prompt) == level == problem.meta["level"]


def test_splits_are_disjoint_reproducible_and_sized():
    task = ChainTask(max_level=4)
    a = make_splits(task, pool_per_level=30, test_per_level=20, retained_size=40, seed=7)
    b = make_splits(task, pool_per_level=30, test_per_level=20, retained_size=40, seed=7)
    assert a == b
    test_prompts = {p.prompt for level in a.test.values() for p in level}
    pool_prompts = {p.prompt for p in a.pool}
    retained_prompts = {p.prompt for p in a.retained}
    assert len(test_prompts) == 4 * 20 and len(pool_prompts) == 4 * 30 and len(retained_prompts) == 40
    assert not test_prompts & pool_prompts and not test_prompts & retained_prompts
    assert not pool_prompts & retained_prompts
    assert sorted(p.meta["level"] for p in a.retained) == [1] * 20 + [2] * 20
    small = make_splits(task, pool_per_level=100, test_per_level=50, retained_size=40, seed=7)
    assert sum(p.meta["level"] == 1 for p in small.pool) == 100 - 50 - 20  # what level 1 has left
    other = make_splits(task, pool_per_level=30, test_per_level=20, retained_size=40, seed=8)
    assert {p.prompt for p in other.pool} != pool_prompts


def test_generate_refuses_more_problems_than_a_level_has():
    task = ChainTask(max_level=2)
    assert len(task.generate(1, 100, seed=0)) == 100  # all 10 x 10 one-step problems
    with pytest.raises(ValueError, match="level 1 has 100 distinct problems left; asked for 101"):
        task.generate(1, 101, seed=0)
    taken = {p.prompt for p in task.generate(1, 60, seed=1)}
    with pytest.raises(ValueError, match="level 1 has 40 distinct problems left"):
        task.generate(1, 41, seed=2, exclude=taken)


def test_bad_task_settings_are_named():
    with pytest.raises(ValueError, match="max_level must be >= 1"):
        ChainTask(max_level=0)
    with pytest.raises(ValueError, match="level must lie in 1..3"):
        ChainTask(max_level=3).generate(4, 1, seed=0)


def test_tokenizer_is_one_token_per_character_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = char_tokenizer(ALPHABET)
    text = "3417..=32"
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
