"""`nemo-paced eval`: n graded samples per problem through the shared rollout path, reported as mean
accuracy ± std over the samples, checked against exactly computable pass rates."""

import json
import logging
import math
import statistics

import pytest
from rollout_toys import TOY_PROBLEMS, exact_pass_rate, save_tiny_model

from nemo_paced.cli import main

N = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_model(root / "model", seed=0)
    halves = {"first": TOY_PROBLEMS[:3], "second": TOY_PROBLEMS[3:]}
    for name, rows in halves.items():
        with open(root / f"{name}.jsonl", "w") as f:
            for problem_id, prompt, answer in rows:
                f.write(json.dumps({"id": problem_id, "prompt": prompt, "answer": answer}) + "\n")
    return root, model, halves


def test_eval_reports_mean_and_std_over_samples(setup, capsys):
    root, model, halves = setup
    out = root / "report.json"
    code = main(["eval", "--model", str(root / "model"), "--benchmarks", f"one={root / 'first.jsonl'}",
                 str(root / "second.jsonl"), "--n", str(N), "--verifier", "rollout_toys:first_char_in",
                 "--template", "raw", "--max-tokens", "2", "--seed", "0", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["benchmarks"]) == ["one", "second"] and "one" in printed and "second" in printed
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    for name, rows in zip(["one", "second"], halves.values()):
        result = report["benchmarks"][name]
        assert result["problems"] == len(rows) and result["n"] == N and len(result["accuracy_per_sample"]) == N
        assert result["mean"] == pytest.approx(statistics.fmean(result["accuracy_per_sample"]))
        assert result["std"] == pytest.approx(statistics.stdev(result["accuracy_per_sample"]))
        assert result["mean"] == pytest.approx(100 * sum(result["successes"].values()) / (len(rows) * N))
        assert f"{result['mean']:6.2f} ± {result['std']:.2f}" in printed
        rates = [exact_pass_rate(model, tokenizer, prompt, answer) for _, prompt, answer in rows]
        expected = 100 * statistics.fmean(rates)
        sigma = 100 * math.sqrt(sum(p * (1 - p) for p in rates) / N) / len(rows)
        assert abs(result["mean"] - expected) <= 4.5 * sigma, (name, result["mean"], expected)


def test_eval_refuses_duplicate_benchmark_names(setup, capsys):
    root, _, _ = setup
    assert main(["eval", "--model", str(root / "model"), "--benchmarks", str(root / "first.jsonl"),
                 str(root / "first.jsonl"), "--out", str(root / "x.json")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_the_readme_flags_on_the_demo_models_warn_instead_of_silently_scoring_zero(tmp_path, capsys, caplog,
                                                                                  monkeypatch):
    """The README's example flags (template plain, verifier math_boxed, --max-tokens 1024) on a model shaped
    like the demo's (a 15-character vocabulary, a 15-token context): every prompt is mostly <unk>, every
    answer fails. The engine says why, eval that nothing was right; the right flags give neither warning."""
    from nemo_paced.rollout import estimate
    from nemo_paced.tasks import ChainTask
    from nemo_paced.tiny_models import TinyModelConfig, build_model

    task = ChainTask(max_level=2)
    model, tokenizer = build_model(task, TinyModelConfig(1, 16, 2))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "12=", "answer": "1"}) + "\n")
    context = model.config.max_position_embeddings
    monkeypatch.setattr(estimate, "_warned", set())
    assert main(["eval", "--model", str(tmp_path / "model"), "--benchmarks", str(tmp_path / "p.jsonl"), "--n", "1",
                 "--template", "plain", "--max-tokens", "1024", "--seed", "0", "--out", str(tmp_path / "e.json")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("of the prompt tokens are unknown to the model's tokenizer (template 'plain')" in w for w in warnings)
    assert any(f"plus --max-tokens 1024 exceed the model's context of {context} tokens" in w for w in warnings)
    assert "warning: every answer was graded wrong" in capsys.readouterr().err

    caplog.clear()
    monkeypatch.setattr(estimate, "_warned", set())
    main(["eval", "--model", str(tmp_path / "model"), "--benchmarks", str(tmp_path / "p.jsonl"), "--n", "1",
          "--verifier", "rollout_toys:first_char_in", "--template", "raw", "--max-tokens", "2", "--seed", "0",
          "--out", str(tmp_path / "raw.json")])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("nemo_paced")]
