import json

import pytest

from nemo_paced.problems import (
    PAPER_SUFFIX, FieldMap, Problem, ProblemFormatError, content_id, load_problems, render_prompt, save_problems,
)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_jsonl_with_ids_and_content_hash(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": 7, "question": "1+1?", "answer": 2}, {"prompt": "2+2?", "answer": "4"}])
    problems = load_problems(path)
    assert problems[0] == Problem("7", "1+1?", "2")
    assert problems[1].id == content_id("2+2?", "4") and len(problems[1].id) == 16
    assert load_problems(path)[1].id == problems[1].id  # stable across loads


def test_dapo_style_nested_fields_and_chat_prompts(tmp_path):
    row = {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Solve x."}],
           "reward_model": {"ground_truth": "42"}, "extra_info": {"index": "abc"}}
    (problem,) = load_problems(_jsonl(tmp_path / "d.jsonl", [row]))
    assert (problem.id, problem.prompt, problem.answer) == ("abc", "Solve x.", "42")


def test_parquet_and_custom_field_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uid": ["u1", "u2"], "q": ["a?", "b?"], "gold": ["1", "2"]}), tmp_path / "p.parquet")
    fields = FieldMap.parse("id=uid,prompt=q,answer=gold")
    problems = load_problems(tmp_path / "p.parquet", fields=fields, limit=1)
    assert problems == [Problem("u1", "a?", "1")]


def test_local_dataset_directory_through_datasets(tmp_path):
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "train.jsonl", [{"question": "q1", "answer": "a1"}])
    assert load_problems(tmp_path / "files")[0].answer == "a1"


@pytest.mark.parametrize("rows,message", [
    ([{"question": "q", "answer": "a"}, {"question": "q2"}], r"row 2: field 'answer': missing"),
    ([{"question": "", "answer": "a"}], r"row 1: field 'prompt': empty"),
    ([{"question": {"x": 1}, "answer": "a"}], r"row 1: field 'prompt': expected text"),
    ([{"id": "x", "question": "q", "answer": "a"}, {"id": "x", "question": "r", "answer": "b"}],
     r"row 2: field 'id': duplicate id 'x' \(first at row 1\)"),
    (["{broken"], r"row 1: not valid JSON"),
    (["[1]"], r"row 1: expected an object"),
])
def test_bad_rows_name_the_row_and_field(tmp_path, rows, message):
    with pytest.raises(ProblemFormatError, match=message):
        load_problems(_jsonl(tmp_path / "bad.jsonl", rows))


def test_empty_and_missing_sources(tmp_path):
    with pytest.raises(ProblemFormatError, match="no problems"):
        load_problems(_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(ProblemFormatError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")


def test_bad_field_map_spec():
    with pytest.raises(ValueError, match="bad field mapping 'question'"):
        FieldMap.parse("question")


def test_save_roundtrip(tmp_path):
    problems = [Problem("a", "q", "1", {"level": 2}), Problem("b", "r", "2")]
    save_problems(tmp_path / "out.jsonl", problems)
    assert load_problems(tmp_path / "out.jsonl") == problems


def test_render_prompt_templates():
    problem = Problem("a", "What is 2+2?", "4")
    assert render_prompt(problem, "raw") == "What is 2+2?"
    assert render_prompt(problem) == f"What is 2+2?\n{PAPER_SUFFIX}"
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(problem, "chat")
    with pytest.raises(ValueError, match="template must be one of"):
        render_prompt(problem, "fancy")


def test_render_chat_template_with_a_real_tokenizer():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = render_prompt(Problem("a", "Q?", "1"), "chat", tokenizer)
    assert text == f"<user>Q?\n{PAPER_SUFFIX}</user><assistant>"


def test_dedupe_drops_repeated_problems_keeping_the_first_id(tmp_path):
    rows = [{"id": "a", "question": "1+1?", "answer": "2"}, {"id": "b", "question": "1+1?", "answer": "2"},
            {"id": "c", "question": "1+1?", "answer": "3"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    assert [p.id for p in load_problems(path, dedupe=True)] == ["a", "c"]
    assert [p.id for p in load_problems(path)] == ["a", "b", "c"]


def test_prepare_command_writes_normalised_deduplicated_problems(tmp_path, capsys):
    from nemo_paced.cli import main

    rows = [{"prompt": [{"role": "user", "content": "Solve x."}], "reward_model": {"ground_truth": "4"},
             "extra_info": {"index": i}} for i in range(3)]
    source = _jsonl(tmp_path / "dapo.jsonl", rows)
    out = tmp_path / "out" / "problems.jsonl"
    assert main(["problems", "prepare", str(source), "--dedupe", "--out", str(out)]) == 0
    assert f"{out}: 1 problems" in capsys.readouterr().out
    assert load_problems(out) == [Problem("0", "Solve x.", "4")]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    assert main(["problems", "prepare", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "row 1: field 'answer': missing" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
