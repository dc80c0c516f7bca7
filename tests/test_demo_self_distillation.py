"""The demo's self-distillation comparison at test scale: the instruction-tuned-like student really
uses privileged context, and every method trains from it on the same budget and is summarised."""

import pytest
import torch

from dataclasses import replace

from nemo_paced.demo.experiment import QUICK
from nemo_paced.demo.self_distillation import (SELF_METHODS, SelfDistillationConfig, format_summary,
                                               instruction_tuned_student, run_self_distillation, summary)
from nemo_paced.tasks import ChainTask
from nemo_paced.tiny_models import PretrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # pretrains three tiny models, trains three runs

TINY = replace(QUICK, task=ChainTask(max_level=3),
               teacher_pretrain=PretrainConfig(steps=100, level_weights={1: 1.0, 2: 1.0, 3: 1.0}, seed=1),
               student_pretrain=PretrainConfig(steps=200, level_weights={1: 0.5, 2: 0.3, 3: 0.2}, seed=2),
               pool_per_level=12, test_per_level=6, retained_size=6, steps=4, batch_size=8, refresh_every=2,
               eval_every=4, seeds=(0,), k=4, eval_samples=2, final_eval_samples=2)


def _answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    ids = tokenizer(prompt + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
    targets = ids[0, 1:]
    start = len(prompt) - 1
    return logp[torch.arange(start, len(targets)), targets[start:]].sum().item()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_the_student_uses_privileged_context(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = TINY
    path = instruction_tuned_student(config, SelfDistillationConfig(), cache)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    problems = config.task.generate(3, 20, seed=9)  # level 3, the hardest
    bare = sum(_answer_logprob(model, tokenizer, p.prompt, p.answer) for p in problems) / len(problems)
    hinted = sum(_answer_logprob(model, tokenizer, f"{p.answer}={p.prompt}", p.answer) for p in problems) / len(problems)
    assert hinted > bare + 0.2, (hinted, bare)  # the answer in front makes it more likely (nats per answer)
    assert instruction_tuned_student(config, SelfDistillationConfig(), cache) == path  # cached


def test_comparison_runs_every_method_on_the_same_budget(cache, tmp_path):
    config = TINY
    comparison = run_self_distillation(config, tmp_path / "out", cache, progress=False,
                                       say=lambda _: None)
    assert [(r["method"], r["seed"]) for r in comparison["rows"]] == [(m, 0) for m in SELF_METHODS]
    budget = comparison["setting"].tokens_per_step
    for method, by_seed in comparison["runs"].items():
        steps = by_seed[0]["result"]["history"]["steps"]
        assert steps and all(s["stage"] == "rkl" for s in steps)
        assert all(abs(s["tokens"] - budget) <= 4 for s in steps)  # the same response tokens per step (±1 row)
        assert by_seed[0]["result"]["config"]["teacher"] == "self"
    block = summary(comparison)
    assert set(block["methods"]) == set(SELF_METHODS)
    assert {(p["a"], p["b"]) for p in block["paired"]} == {("self_paced", "self_uniform"), ("self_paced", "self_filter")}
    text = format_summary(block)  # what `nemo-paced demo --self-distillation` prints
    flops = {m: block["methods"][m]["compute"]["mean"]["total_flops"] for m in SELF_METHODS}
    assert all(f > 0 for f in flops.values())
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()[:1] and line.split()[0] in flops}
    for method in SELF_METHODS:  # each method's compute row ends with its FLOPs over unweighted's
        assert rows[method].endswith(f"{flops[method] / flops['self_uniform']:.2f}x")
    assert "self_paced - self_uniform" in text


def test_only_weighted_methods_refresh_pass_rates():
    """Unweighted self-distillation never reads pass rates, so it must not pay for refreshing them
    (the first 5-seed run charged it 626k estimation tokens it did not use)."""
    from nemo_paced.demo.experiment import DemoConfig
    from nemo_paced.demo.self_distillation import self_method_schedule

    config = DemoConfig()
    for method in SELF_METHODS:
        schedule = self_method_schedule(method, config)
        assert schedule.switch_step == 0 and schedule.total_steps == config.steps  # reverse KL throughout
        refreshes = [s for s in range(config.steps) if schedule.reestimate_before(s)]
        expected = [] if method == "self_uniform" else list(range(config.refresh_every, config.steps,
                                                                   config.refresh_every))
        assert refreshes == expected, method
