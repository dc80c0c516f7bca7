"""The demo's pieces: gradient SNR, equal budgets across methods, the report and its verdict, the
plots, the recipe, and (slow) the whole pipeline on a micro configuration over the loopback service."""

import dataclasses
import json

import numpy as np
import pytest

from nemo_paced.demo.experiment import METHODS, QUICK, DemoConfig, method_overrides
from nemo_paced.demo.report import build_report, format_table
from nemo_paced.demo.snr import snr
from nemo_paced.passrates import PassRateTable
from nemo_paced.references import Summary


def test_snr_is_signal_over_scatter():
    assert snr(np.array([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(4.0)  # |(2,0)|^2 / mean |(+-1,0)|^2
    assert snr(np.array([[1.0, 2.0], [-1.0, -2.0]])) == 0.0  # problems cancel out: no signal
    assert snr(np.array([[0.5, 0.5], [0.5, 0.5]])) == float("inf")  # perfect agreement


def test_every_method_gets_the_same_budget_and_its_own_weighting():
    config = DemoConfig()
    overrides = {m: method_overrides(m, config) for m in METHODS}
    assert {o["schedule"].total_steps for o in overrides.values()} == {config.steps}
    assert overrides["paced"]["schedule"].has_rkl and overrides["paced"]["weighting"].mode.value == "loss"
    assert not any(overrides[m]["schedule"].has_rkl for m in ("paced_fkl", "uniform", "filter"))
    assert overrides["uniform"]["weighting"].mode.value == "uniform"
    assert overrides["filter"]["weighting"].band == (0.2, 0.8)
    assert overrides["uniform"]["schedule"].refresh_every == 0  # unweighted: pass rates unused
    with pytest.raises(ValueError, match="unknown method 'akl'"):
        method_overrides("akl", config)


def _run(final: dict, start: dict) -> dict:
    passrates = [{"step": 0, "label": "start", "at_zero": 0.3, "at_one": 0.1, "histogram": [3, 1, 1, 0, 0, 0, 0, 0, 1],
                  "kept": 4, "ess": 3.0}]
    return {"history": {"evals": [{"step": 0, "accuracy": start}, {"step": 10, "accuracy": final}],
                        "passrates": passrates},
            "draws": {"distinct": 4, "total": 40, "per_drawn_problem": 10.0, "max": 12, "pool": 6},
            "tokens": 100, "sequences": 40, "config": {"schedule": {"total_steps": 10}, "tokens_per_step": 10}}


def test_report_states_per_seed_results_and_an_honest_verdict(tmp_path):
    start = {"L1": 50.0, "L2": 20.0, "retained": 80.0}
    runs = {"paced": {0: _run({"L1": 60.0, "L2": 30.0, "retained": 78.0}, start),
                      1: _run({"L1": 62.0, "L2": 26.0, "retained": 80.0}, start)},
            "uniform": {0: _run({"L1": 70.0, "L2": 40.0, "retained": 81.0}, start),
                        1: _run({"L1": 50.0, "L2": 20.0, "retained": 79.0}, start)}}
    table = PassRateTable()
    table.update([("a", 0, 8), ("b", 4, 8), ("c", 8, 8)])
    config = dataclasses.replace(DemoConfig(), methods=("paced", "uniform"), seeds=(0, 1))
    report = build_report(config, table, [{"pass_rate": 0.5, "snr": 1.0, "problems": 2, "available": 2,
                                           "grad_norm": 1.0}], runs, {"total": 1.0}, Summary(3, 3, [], 3))
    paced = report["methods"]["paced"]
    assert paced["final"]["mean"]["mean"] == pytest.approx((45 + 44) / 2)
    assert paced["final"]["L1"]["std"] == pytest.approx(np.std([60, 62], ddof=1))
    assert paced["per_seed"]["1"]["L2"] == 26.0
    assert paced["forgetting"]["mean"] == pytest.approx(1.0)
    assert report["start"]["at_zero"] == pytest.approx(1 / 3) and report["start"]["histogram"][4] == 1
    # paced 44.5 vs uniform 45.0 on the mean over levels: not a win, though it is ahead on seed 1
    assert report["verdict"].startswith("PACED (two-stage) did not beat uniform by -0.5 points")
    assert "(1 of 2 seeds better)" in report["verdict"]
    text = format_table(report)
    assert "paced" in text and "44.5" in text and "draws/kept" in text and report["verdict"] in text
    assert "budget of every run: 10 steps x 10 response tokens per step" in text
    json.dumps(report)  # the report is plain JSON

    from nemo_paced.demo.plots import write_plots

    paths = write_plots(report, tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy_vs_steps.png", "kernel_over_histogram.png",
                                             "passrate_histogram.png", "snr_by_pass_rate.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_tiny_cpu_recipe_splits_the_stages():
    from recipes.tiny_cpu import tiny_cpu

    fkl, rkl = tiny_cpu("fkl", work="w"), tiny_cpu("rkl", work="w")
    assert fkl.schedule.stage(0) == "fkl" and not fkl.schedule.has_rkl and fkl.student == "w/student"
    assert rkl.schedule.stage(0) == "rkl" and rkl.student == "w/fkl/final" and rkl.out_dir == "w/rkl"
    with pytest.raises(ValueError, match="stage must be fkl or rkl"):
        tiny_cpu("both")


@pytest.mark.slow
def test_micro_demo_runs_end_to_end_over_http(tmp_path):
    from nemo_paced.demo.experiment import run_demo
    from nemo_paced.tasks import ChainTask
    from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig

    micro = dataclasses.replace(
        QUICK, task=ChainTask(max_level=3), teacher=TinyModelConfig(2, 32, 2),
        teacher_pretrain=PretrainConfig(steps=150, batch_size=32, level_weights={1: 1, 2: 1, 3: 1}),
        student=TinyModelConfig(1, 32, 2),
        student_pretrain=PretrainConfig(steps=80, batch_size=32, level_weights={1: 1, 2: 1}),
        pool_per_level=16, test_per_level=8, retained_size=8, steps=4, batch_size=8, refresh_every=2,
        eval_every=2, snr_per_bin=4)
    report = run_demo(micro, tmp_path / "out", tmp_path / "cache", say=lambda _: None, progress=False)
    assert set(report["methods"]) == set(METHODS)
    for method in report["methods"].values():
        assert method["curve"]["steps"] == [0, 2, 4]
    budget = report["budget"]["tokens_per_step"]  # 8 sequences of the mean reference length
    for name in METHODS:
        steps = json.loads((tmp_path / "out" / "runs" / f"{name}-seed0" / "result.json").read_text())["history"]["steps"]
        assert all(abs(s["tokens"] - budget) <= 3 for s in steps), (name, budget, steps)
    assert (tmp_path / "out" / "report.json").exists() and (tmp_path / "out" / "prepared.json").exists()
    assert json.loads((tmp_path / "out" / "runs" / "paced-seed0" / "result.json").read_text())["status"] == "done"


def test_tiny_models_are_cached_by_content_and_learn(tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_paced.tasks import ChainTask
    from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig, cached_pretrained

    task, model = ChainTask(max_level=2), TinyModelConfig(1, 32, 2)
    training = PretrainConfig(steps=100, batch_size=32, level_weights={1: 1.0})
    first = cached_pretrained(tmp_path, "m", task, model, training)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_pretrained(tmp_path, "m", task, model, training) == first  # reused, not retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = cached_pretrained(tmp_path, "m", task, model, dataclasses.replace(training, seed=1))
    assert other != first and sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])
    meta = json.loads((first / "pretrain.json").read_text())
    assert meta["final_loss"] < 1.5  # an untrained model scores about ln(15) = 2.7 per answer token
    loaded = AutoModelForCausalLM.from_pretrained(first)
    assert loaded.config.vocab_size == 15 and loaded.config.num_hidden_layers == 1
