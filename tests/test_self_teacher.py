"""The privileged-context self-teacher: its prompt, the alignment of teacher and student rows on the
same response tokens, the missing-context policy, and self-distillation in the local trainer against
the real rollout service with real tiny models."""

import pytest
import torch

from nemo_paced.batches import BatchBuilder, Pair
from nemo_paced.problems import Problem, render_prompt
from nemo_paced.self_teacher import (MissingContext, SelfTeacher, SelfTeacherConfig, gather_aligned, parse_teacher,
                                     teacher_problem)
from nemo_paced.tasks import ALPHABET
from nemo_paced.tasks.tokenizer import char_tokenizer
from nemo_paced.train.local import train
from nemo_paced.weighting import WeightConfig
from test_train_local import _all_problems, _config, setup  # noqa: F401 - the module's fixture

CHAIN = SelfTeacherConfig(template="{context}={question}")


def test_parse_teacher():
    assert parse_teacher("self") == "current" and parse_teacher("self", default="initial") == "initial"
    assert parse_teacher("self:initial") == "initial" and parse_teacher("self:current") == "current"
    assert parse_teacher("runs/teacher") is None and parse_teacher("selfish/model") is None
    with pytest.raises(ValueError, match="current or initial"):
        parse_teacher("self:frozen")


def test_template_puts_the_context_in_the_question_only():
    problem = Problem("p1", "What is 2+3?", "5", {"solution": "2+3 = 5, so \\boxed{5}"})
    teacher = teacher_problem(problem, SelfTeacherConfig())
    assert teacher.prompt.startswith("What is 2+3?") and "2+3 = 5, so \\boxed{5}" in teacher.prompt
    assert "5" in teacher_problem(problem, SelfTeacherConfig(context=("answer",))).prompt
    assert render_prompt(teacher, "plain").endswith("\\boxed{}.")  # the stage's template still wraps it
    with pytest.raises(ValueError, match=r"\{context\}"):
        SelfTeacherConfig(template="{question} only")
    with pytest.raises(ValueError, match="takes only"):
        SelfTeacherConfig(template="{question} {context} {other}")


def test_missing_context_is_an_error_naming_the_problem_or_excluded_with_a_count():
    tokenizer = char_tokenizer(ALPHABET)
    builder = BatchBuilder(tokenizer, 12)
    problems = [Problem("has", "12.=", "1", {}), Problem("lacks", "34.=", "", {})]
    with pytest.raises(MissingContext, match="'lacks'"):
        SelfTeacher(problems, builder, lambda p: p.prompt, CHAIN)
    teacher = SelfTeacher(problems, builder, lambda p: p.prompt, SelfTeacherConfig(template=CHAIN.template,
                                                                                  missing="exclude"))
    assert teacher.problem_ids == ["has"] and teacher.excluded == ["lacks"]
    batch = builder.micro_batch([Pair("lacks", [3], [4])])
    with pytest.raises(MissingContext, match="'lacks'"):
        teacher.add_teacher_rows(batch, [Pair("lacks", [3], [4])])


def test_rows_align_on_the_same_response_tokens():
    tokenizer = char_tokenizer(ALPHABET)
    builder = BatchBuilder(tokenizer, 10)
    problems = [Problem("a", "12.=", "1"), Problem("b", "9876=", "8765")]
    teacher = SelfTeacher(problems, builder, lambda p: p.prompt, CHAIN)
    assert teacher.teacher_seq_length == 10 + 5  # "8765=" is the longest extra prompt
    pairs = [Pair("a", builder.prompt_ids("12.="), builder.response_ids("1")),
             Pair("b", builder.prompt_ids("9876="), builder.response_ids("8765"))]
    batch = teacher.add_teacher_rows(builder.micro_batch(pairs), pairs)
    mask = batch["loss_mask"] > 0
    assert mask.sum() == 2 + 5  # every response token (and eos), none dropped
    teacher_labels = torch.roll(batch["teacher_tokens"], -1, 1)
    assert torch.equal(torch.gather(teacher_labels, 1, batch["teacher_index"])[mask], batch["labels"][mask])
    text = tokenizer.decode(batch["teacher_tokens"][1][: len("8765=9876=")].tolist())
    assert text == "8765=9876="
    # the gathered teacher logits are the teacher row's at the aligned positions
    logits = torch.randn(2, teacher.teacher_seq_length, 7)
    aligned = gather_aligned(logits, batch["teacher_index"])
    b, t = mask.nonzero()[-1].tolist()
    assert torch.equal(aligned[b, t], logits[b, batch["teacher_index"][b, t]])


def test_tokens_without_room_in_the_teacher_row_leave_the_loss():
    tokenizer = char_tokenizer(ALPHABET)
    builder = BatchBuilder(tokenizer, 10)
    teacher = SelfTeacher([Problem("b", "9876=", "8765")], builder, lambda p: p.prompt, CHAIN, teacher_seq_length=10)
    pairs = [Pair("b", builder.prompt_ids("9876="), builder.response_ids("8765"))]
    student = builder.micro_batch(pairs)
    batch = teacher.add_teacher_rows(student, pairs)
    # the teacher row "8765=9876=" + response holds 10 positions: only the first response token is scored
    assert student["loss_mask"].sum() == 5 and batch["loss_mask"].sum() == 1
    assert teacher.dropped_tokens == 4 and batch["sample_weight"].item() == 1.0
    long_prompt = SelfTeacher([Problem("c", "98765432=", "1")], builder, lambda p: p.prompt, CHAIN,
                              teacher_seq_length=10)
    pairs = [Pair("c", builder.prompt_ids("98765432="), builder.response_ids("1"))]
    batch = long_prompt.add_teacher_rows(builder.micro_batch(pairs), pairs)
    assert batch["loss_mask"].sum() == 0 and batch["sample_weight"].item() == 0.0  # nothing left: weight 0


def test_local_self_distillation_current_follows_the_student_initial_stays(setup, tmp_path):
    """Same seeds, same samples: step 0's loss is the same for both teachers (the student has not moved
    yet); afterwards the current teacher has moved with the student and the initial one has not."""
    from dataclasses import replace as dc_replace

    from nemo_paced.demo.service import loopback_service
    from nemo_paced.schedule import TwoStageSchedule

    results = {}
    for spec in ("self", "self:initial"):
        with loopback_service(setup["student"], _all_problems(setup), tmp_path / spec / "service",
                              max_tokens=4) as url:
            config = _config(setup, tmp_path / spec / "run", url, teacher=spec, lr=0.05, final_estimate=False,
                             schedule=TwoStageSchedule(total_steps=3, fkl_fraction=0.0),
                             self_teacher=dc_replace(CHAIN, context=("answer",)))
            results[spec] = train(config)
    for result in results.values():
        assert result["status"] == "done" and [s["stage"] for s in result["history"]["steps"]] == ["rkl"] * 3
        assert all(s["tokens"] > 0 and s["loss"] > 0 for s in result["history"]["steps"])
    current, initial = ([s["loss"] for s in results[k]["history"]["steps"]] for k in ("self", "self:initial"))
    assert current[0] == pytest.approx(initial[0], rel=1e-6)
    assert current[2] != pytest.approx(initial[2], rel=1e-3)


def test_self_teacher_refuses_a_forward_kl_stage(setup, tmp_path):
    from nemo_paced.schedule import TwoStageSchedule

    with pytest.raises(ValueError, match="fkl_fraction=0"):
        _config(setup, tmp_path, "http://127.0.0.1:1", teacher="self", schedule=TwoStageSchedule(total_steps=4))



def test_on_policy_batches_carry_the_self_teacher_rows(setup, tmp_path):
    """The Megatron data stream: the service's own samples, and the same response after the privileged prompt."""
    from transformers import AutoTokenizer

    from nemo_paced.demo.service import loopback_service
    from nemo_paced.onpolicy import OnPolicyBatches
    from nemo_paced.rollout.client import RolloutClient
    from nemo_paced.sampler import PacedSampler, SamplerConfig

    tokenizer = AutoTokenizer.from_pretrained(setup["student"])
    seq = len(setup["pool"][0].prompt) + 4
    builder = BatchBuilder(tokenizer, seq)
    by_id = {p.id: p for p in setup["pool"]}
    ids = list(by_id)[:8]
    teacher = SelfTeacher([by_id[i] for i in ids], builder, lambda p: p.prompt, CHAIN, teacher_seq_length=seq)
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        with RolloutClient(url) as client:
            sampler = PacedSampler(ids, SamplerConfig(4, 2, weighting=WeightConfig(mode="uniform")), lambda: setup["table"])
            source = OnPolicyBatches(sampler, client, builder, prefetch=1, self_teacher=teacher)
            batches = [next(source) for _ in range(2)]
            source.close()
    for batch in batches:
        assert batch["teacher_tokens"].shape == batch["tokens"].shape  # equal lengths, as pipelines need
        for row, problem_id in enumerate(batch["problem_ids"]):
            problem = by_id[problem_id]
            privileged = f"{problem.answer}={problem.prompt}"
            assert tokenizer.decode(batch["teacher_tokens"][row][: len(privileged)]) == privileged
            # the teacher row's tokens hold the label of every aligned position but its last one
            index = batch["teacher_index"][row]
            mask = (batch["loss_mask"][row] > 0) & (index < seq - 1)
            labels = torch.roll(batch["teacher_tokens"][row], -1)[index]
            assert mask.any() and torch.equal(labels[mask], batch["labels"][row][mask])


def test_tiny_recipe_and_cli_take_a_self_teacher():
    from recipes import StageFiles
    from recipes.tiny_cpu import tiny_cpu

    config = tiny_cpu("rkl", StageFiles(teacher="self:initial"))
    assert config.self_teacher_weights == "initial" and config.student == "runs/tiny/student"
    assert config.schedule.switch_step == 0 and config.references is None
    assert tiny_cpu("rkl", StageFiles(teacher="self")).self_teacher_weights == "current"
    assert tiny_cpu("rkl", StageFiles(teacher="runs/tiny/teacher")).self_teacher_weights is None
    with pytest.raises(ValueError, match="self-distillation is stage rkl"):
        tiny_cpu("fkl", StageFiles(teacher="self"))
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert "self[:current|:initial]" in shown and "--stage rkl --teacher self" in shown


def _other_trainer(stage, files):
    """A recipe whose config is not the local trainer's (as a Bridge recipe's is not)."""
    from dataclasses import make_dataclass

    return make_dataclass("Other", [("steps", int)])(steps=1)


def test_a_recipe_without_a_self_teacher_refuses_teacher_self():
    from nemo_paced.cli.train import build
    from recipes import StageFiles

    with pytest.raises(ValueError, match="does not take a self-teacher"):
        build("test_self_teacher:_other_trainer", "rkl", [], StageFiles(teacher="self:initial"))
    assert build("test_self_teacher:_other_trainer", "rkl", [], StageFiles(teacher="runs/t")).steps == 1
