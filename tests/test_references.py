"""Teacher references with a real (tiny, random) transformers teacher on the hf engine."""

import importlib.util
import json

import numpy as np
import pytest
from rollout_toys import TOY_PROBLEMS, first_char_in, save_tiny_model, toy_problems

from nemo_paced.batches import BatchBuilder
from nemo_paced.cli import main
from nemo_paced.passrates import PassRateTable
from nemo_paced.references import (ReferenceBatches, ReferenceConfig, ReferenceFileError, load_references,
                                   make_references)
from nemo_paced.rollout.engines import create_engine
from nemo_paced.sampler import PacedSampler, SamplerConfig

GREEDY = ReferenceConfig(n=2, keep="verified", template="raw", temperature=0.0, max_tokens=4, batch_problems=2)


class Counting:
    """The real engine, counting the prompts it is asked to generate for."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, 0
        self.name, self.tokenizer = engine.name, engine.tokenizer

    @property
    def checkpoint(self):
        return self.engine.checkpoint

    def generate(self, prompts, params):
        self.prompts += len(prompts)
        return self.engine.generate(prompts, params)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    save_tiny_model(path, seed=3)
    return path, create_engine("hf", str(path))


def _rows(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_verified_references_are_kept_and_problems_without_are_reported(teacher, tmp_path):
    path, engine = teacher
    out = tmp_path / "refs.jsonl"
    summary = make_references(engine, toy_problems(), first_char_in, out, GREEDY)
    header, rows = _rows(out)
    assert [r["problem_id"] for r in rows] == [p[0] for p in TOY_PROBLEMS]
    assert "none" in summary.without and "all" not in summary.without  # pass rate 0 and 1 by construction
    assert summary.with_reference + len(summary.without) == len(TOY_PROBLEMS) == header["problems"]
    assert header["verified"] == summary.with_reference and header["settings"]["n"] == 2
    for row, (_, _, accepted) in zip(rows, TOY_PROBLEMS):
        assert row["tried"] == 2 and all(r["score"] == 1 for r in row["references"])
        assert all(first_char_in(r["text"], accepted) for r in row["references"])
        assert (row["verified"] > 0) == (row["problem_id"] not in summary.without)
    refs = load_references(out)
    assert set(refs) == {r["problem_id"] for r in rows if r["verified"]}
    ref = refs["all"][0]
    assert engine.tokenizer.decode(ref.token_ids, skip_special_tokens=True) == ref.text
    assert not (tmp_path / "refs.jsonl.partial").exists()
    assert "without (" in summary.report() and "none" in summary.report()


def test_keep_all_stores_every_response_with_its_score(teacher, tmp_path):
    _, engine = teacher
    config = ReferenceConfig(n=3, keep="all", template="raw", temperature=1.0, max_tokens=3, seed=0)
    make_references(engine, toy_problems(), first_char_in, tmp_path / "all.jsonl", config)
    _, rows = _rows(tmp_path / "all.jsonl")
    assert all(len(r["references"]) == 3 for r in rows)
    assert [r["score"] for r in rows[0]["references"]] == [0, 0, 0]  # "none" is never accepted
    assert load_references(tmp_path / "all.jsonl", verified_only=False).keys() == {p[0] for p in TOY_PROBLEMS}


def test_interrupted_run_resumes_where_it_stopped(teacher, tmp_path):
    _, engine = teacher
    complete = tmp_path / "complete.jsonl"
    make_references(engine, toy_problems(), first_char_in, complete, GREEDY)

    out = tmp_path / "refs.jsonl"
    journal = tmp_path / "refs.jsonl.partial"

    def stop_after_first_batch(done, total):
        raise KeyboardInterrupt

    counting = Counting(engine)
    with pytest.raises(KeyboardInterrupt):
        make_references(counting, toy_problems(), first_char_in, out, GREEDY, progress=stop_after_first_batch)
    assert not out.exists() and journal.exists() and counting.prompts == 2
    with open(journal, "a") as f:
        f.write('{"problem_id": "ops", "prompt": "77+')  # a crash in the middle of writing a row

    counting = Counting(engine)
    summary = make_references(counting, toy_problems(), first_char_in, out, GREEDY)
    assert counting.prompts == 4 and summary.generated == 4  # only the problems not yet journalled
    assert out.read_text() == complete.read_text()  # identical to the uninterrupted run
    assert not journal.exists()

    counting = Counting(engine)
    again = make_references(counting, toy_problems(), first_char_in, out, GREEDY)
    assert counting.prompts == 0 and again.generated == 0 and out.read_text() == complete.read_text()


def test_other_settings_or_problems_refuse_to_resume(teacher, tmp_path):
    _, engine = teacher
    out = tmp_path / "refs.jsonl"
    make_references(engine, toy_problems()[:2], first_char_in, out, GREEDY)
    other = ReferenceConfig(**{**GREEDY.__dict__, "max_tokens": 5})
    with pytest.raises(ReferenceFileError, match="other settings \\(max_tokens differ\\)"):
        make_references(engine, toy_problems(), first_char_in, out, other)
    with pytest.raises(ReferenceFileError, match="not in this problem set"):
        make_references(engine, toy_problems()[1:], first_char_in, out, GREEDY)


def test_cli_reports_problems_without_a_reference(teacher, tmp_path, capsys):
    path, _ = teacher
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": a}) + "\n" for i, p, a in TOY_PROBLEMS))
    out = tmp_path / "refs.jsonl"
    code = main(["make-references", "--teacher", str(path), "--problems", str(problems), "--out", str(out),
                 "--n", "1", "--verifier", "rollout_toys:first_char_in", "--template", "raw",
                 "--temperature", "0", "--max-tokens", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    header, rows = _rows(out)
    missing = [r["problem_id"] for r in rows if not r["verified"]]
    assert f"{len(rows) - len(missing)} with a verified reference, {len(missing)} without" in printed
    assert header["settings"]["teacher"] == str(path) and header["settings"]["verifier"] == "rollout_toys:first_char_in"


def test_cli_warns_when_no_problem_has_a_verified_reference(teacher, tmp_path, capsys):
    """The README's flags (template plain, verifier math_boxed) on a character-level model: nothing verifies."""
    path, _ = teacher
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": a}) + "\n" for i, p, a in TOY_PROBLEMS))
    assert main(["make-references", "--teacher", str(path), "--problems", str(problems), "--out",
                 str(tmp_path / "refs.jsonl"), "--max-tokens", "4", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert "0 with a verified reference" in captured.out
    assert "warning: no problem has a verified reference" in captured.err


def test_cli_names_the_bad_row_and_field(teacher, tmp_path, capsys):
    path, _ = teacher
    problems = tmp_path / "bad.jsonl"
    problems.write_text('{"id": "a", "prompt": "1+1=", "answer": "2"}\n{"id": "b", "prompt": "2+2="}\n')
    code = main(["make-references", "--teacher", str(path), "--problems", str(problems), "--out",
                 str(tmp_path / "refs.jsonl")])
    assert code == 2
    assert "row 2: field 'answer': missing" in capsys.readouterr().err
    assert not (tmp_path / "refs.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vllm is installed here, so its missing-package message cannot appear")
def test_cli_vllm_engine_without_vllm_names_the_package(teacher, tmp_path):
    path, _ = teacher
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "a", "prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ImportError, match="needs the `vllm` package"):
        main(["make-references", "--engine", "vllm", "--teacher", str(path), "--problems", str(problems),
              "--out", str(tmp_path / "refs.jsonl")])
    assert not (tmp_path / "refs.jsonl").exists()


def test_reference_batches_feed_the_sampler(teacher, tmp_path):
    _, engine = teacher
    out = tmp_path / "refs.jsonl"
    make_references(engine, toy_problems(), first_char_in, out, GREEDY)
    builder = BatchBuilder(engine.tokenizer, seq_length=16)
    batches = ReferenceBatches(toy_problems(), load_references(out), builder, template="raw")
    table = PassRateTable()
    table.update([(i, 4, 8) for i in batches.problem_ids])
    sampler = PacedSampler(batches.problem_ids, SamplerConfig(global_batch_size=4, micro_batch_size=2), table,
                           collate=batches)
    batch = next(sampler)
    assert batch["tokens"].shape == (2, 16)
    np.testing.assert_allclose(batch["sample_weight"].numpy(), 0.25)
    refs = load_references(out)
    for row, problem_id in enumerate(batch["problem_ids"]):
        trained = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        reference = refs[problem_id][0]
        expected = builder.response_ids(reference.text, finished=reference.finish_reason == "stop")
        assert trained == expected
