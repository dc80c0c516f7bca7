"""The demo's pieces: the bias-corrected gradient SNR with bootstrap intervals, paired statistics, the
evaluation's standard error, compute accounting, equal budgets and the ablation's weightings, a fresh
counting rollout service per run, the report and its verdict, the plots, the dose-response study's
table, the recipe, and (slow) the whole pipeline on a micro configuration over the loopback service."""

import dataclasses
import json
import math

import numpy as np
import pytest

from nemo_paced.demo.compute import run_compute
from nemo_paced.demo.experiment import COMPARISONS, METHODS, QUICK, DemoConfig, method_overrides
from nemo_paced.demo.report import format_table, method_summary, paired_rows, verdict
from nemo_paced.demo.snr import bin_statistics, naive_snr, snr
from nemo_paced.demo.stats import accuracy_with_se, paired_difference
from nemo_paced.weighting import WeightConfig


def _gaussian_gradients(rng, n, dim, mean_norm, sigma=1.0):
    mean = np.zeros(dim)
    mean[0] = mean_norm
    return rng.normal(0.0, sigma, size=(n, dim)) + mean, mean_norm**2 / (dim * sigma**2)


def test_snr_is_bias_corrected_where_the_naive_ratio_has_a_floor():
    rng = np.random.default_rng(0)
    n, dim = 32, 50
    for mean_norm in (0.0, 3.0, 7.0):
        draws = [_gaussian_gradients(rng, n, dim, mean_norm) for _ in range(400)]
        true = draws[0][1]
        corrected = np.mean([snr(g) for g, _ in draws])
        naive = np.mean([naive_snr(g) for g, _ in draws])
        # naive: E = SNR n/(n-1) + 1/(n-1) (a floor of 0.032 at n = 32); corrected: SNR
        assert naive == pytest.approx(true * n / (n - 1) + 1 / (n - 1), abs=0.01)
        assert corrected == pytest.approx(true, abs=0.01), (mean_norm, corrected, true)
    assert snr(np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])) == pytest.approx(4.0 - 1 / 3)  # |m|^2=4, S=1


def test_bin_statistics_bootstrap_interval_and_cosine_with_the_heldout_gradient():
    rng = np.random.default_rng(1)
    gradients, true = _gaussian_gradients(rng, 64, 40, 5.0)
    row = bin_statistics(gradients, heldout=np.eye(40)[0] * 3.0, seed=0, resamples=500)
    low, high = row["snr_ci95"]
    assert low < row["snr"] < high and low < true < high
    cos_low, cos_high = row["cosine_ci95"]
    # the estimate is pulled below the true cosine 1 by the noise in the bin's mean; the reflected
    # bootstrap interval corrects that shift and covers 1, where percentiles (all below 0.988) did not
    assert 0.5 < row["cosine_heldout"] < 1.0 and cos_low < 1.0 <= cos_high
    covered = 0
    for _ in range(100):  # the SNR interval covers the true SNR (~96 % measured; a percentile interval ~65 %)
        g, true = _gaussian_gradients(rng, 32, 40, 2.0)
        low, high = bin_statistics(g, None, resamples=300)["snr_ci95"]
        covered += low <= true <= high
    assert covered >= 85
    opposite = bin_statistics(gradients, heldout=-np.eye(40)[0], seed=0, resamples=200)
    assert opposite["cosine_heldout"] == pytest.approx(-row["cosine_heldout"])
    assert bin_statistics(gradients, None, resamples=50).keys() >= {"snr", "snr_ci95", "snr_naive", "grad_norm"}


def test_paired_difference_matches_the_paired_t_test_and_reports_its_intervals():
    from scipy import stats

    ours = {"0": 90.0, "1": 91.5, "2": 89.0, "3": 92.0, "4": 90.5}
    theirs = {"0": 89.0, "1": 90.0, "2": 89.5, "3": 90.0, "4": 89.0, "5": 99.0}  # seed 5 has no pair
    d = paired_difference(ours, theirs)
    diffs = np.array([1.0, 1.5, -0.5, 2.0, 1.5])
    assert d["seeds"] == ["0", "1", "2", "3", "4"] and d["diffs"] == diffs.tolist()
    assert d["mean"] == pytest.approx(diffs.mean()) and d["sd"] == pytest.approx(diffs.std(ddof=1))
    interval = stats.ttest_rel(list(ours.values()), [theirs[s] for s in ours]).confidence_interval(0.95)
    assert d["t_ci95"] == pytest.approx([interval.low, interval.high])
    assert d["bootstrap_ci95"][0] < d["mean"] < d["bootstrap_ci95"][1]
    assert d["better"] == 4 and d["worse"] == 1 and d["n"] == 5
    assert d["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    all_up = paired_difference({s: 1.0 + int(s) for s in "01234"}, {s: 0.0 for s in "01234"})
    assert all_up["wilcoxon_p"] == pytest.approx(0.0625)  # the smallest two-sided p five pairs allow
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({"0": 1.0}, {"1": 1.0})


def test_accuracy_with_se_is_the_sampling_error_of_the_fixed_test_set():
    rows = [("L1", 8, 8), ("L1", 4, 8), ("L2", 2, 8), ("L2", 6, 8), ("retained", 3, 4)]
    out = accuracy_with_se(rows)
    assert out["accuracy"]["L1"] == 75.0 and out["accuracy"]["L2"] == 50.0 and out["accuracy"]["mean"] == 62.5
    var_l1 = 1e4 * (0 + 0.25 / 7) / 4  # p(1-p)/(n-1) per problem, over problems^2
    var_l2 = 1e4 * (0.25 * 0.75 / 7 * 2) / 4
    assert out["se"]["L1"] == pytest.approx(math.sqrt(var_l1))
    assert out["se"]["mean"] == pytest.approx(math.sqrt((var_l1 + var_l2) / 4))
    assert out["se"]["retained"] == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 3))


def test_compute_counts_prompts_teacher_and_rollouts_in_one_flop_total():
    steps = [{"kept": 10, "tokens": 40}, {"kept": 12, "tokens": 38}]
    out = run_compute(steps, prompt_tokens=9, estimation={"samples": 80, "prompt_tokens": 720, "generated_tokens": 300},
                      onpolicy={"samples": 5, "prompt_tokens": 45, "generated_tokens": 20}, n_student=100,
                      n_teacher=1000)
    training = 78 + 22 * 9
    assert out["training_tokens"] == out["teacher_tokens"] == training and out["training_sequences"] == 22
    assert out["estimation_tokens"] == 1020 and out["onpolicy_tokens"] == 65
    assert out["total_flops"] == pytest.approx(6 * 100 * training + 2 * 1000 * training + 2 * 100 * (1020 + 65))


def test_every_method_gets_the_same_budget_and_its_own_weighting():
    config = DemoConfig()
    overrides = {m: method_overrides(m, config) for m in METHODS}
    assert {o["schedule"].total_steps for o in overrides.values()} == {config.steps}
    assert overrides["paced"]["schedule"].has_rkl and overrides["paced"]["weighting"].mode.value == "loss"
    assert not any(overrides[m]["schedule"].has_rkl for m in METHODS if m != "paced")
    assert overrides["paced_sample"]["weighting"].mode.value == "sample"
    assert overrides["uniform"]["weighting"].mode.value == "uniform"
    assert overrides["filter"]["weighting"].band == (0.2, 0.8)
    assert overrides["uniform"]["schedule"].refresh_every == 0  # unweighted: pass rates unused
    # drop extremes: weight 1 strictly inside (0, 1), 0 at the extremes: PACED's support without its shape
    weights = overrides["drop_extremes"]["weighting"].weights(np.array([0, 1, 4, 7, 8]), np.full(5, 8))
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    paced = WeightConfig(mode="loss").weights(np.array([0, 1, 4, 7, 8]), np.full(5, 8))
    assert paced[0] == paced[4] == 0 and paced[2] > paced[1] > 0
    with pytest.raises(ValueError, match="unknown method 'akl'"):
        method_overrides("akl", config)


def test_the_loopback_service_starts_fresh_and_counts_rollouts_by_purpose(tiny_models, tmp_path):
    from nemo_paced.demo.experiment import estimate_pool
    from nemo_paced.demo.service import Usage, loopback_service
    from nemo_paced.rollout.client import RolloutClient

    student, problems = tiny_models["student"], tiny_models["problems"]
    ids = [p.id for p in problems[:6]]
    state = tmp_path / "service"
    with loopback_service(student, problems, state, k=2, max_tokens=4) as url:
        estimate_pool(url, ids)
        with RolloutClient(url) as client:
            client.sample(ids[:3], n=1, seed=1, fold=True)  # 3 of the 6 pooled scores: not folded yet at K=2
    assert any(state.iterdir())
    usage = Usage()
    with loopback_service(student, problems, state, k=2, max_tokens=4, usage=usage) as url:
        with RolloutClient(url) as client:
            assert client.health()["estimated"] == 0 and client.health()["table_version"] == 0  # nothing resumed
            client.wait(client.estimate(ids), poll=0.05)
            client.sample(ids[:2], n=3, seed=1, fold=False)
            client.sample(ids[:1], n=1, seed=1, fold=True)
            version, records = client.table_since(0)
            assert len(records) == len(ids)  # only this service's estimate: no leftover on-policy scores
    estimate, evaluation, onpolicy = usage.total("estimate"), usage.total("eval"), usage.total("onpolicy")
    assert estimate["samples"] == 12 and evaluation["samples"] == 6 and onpolicy["samples"] == 1
    prompt = len(tiny_models["prompt_ids"])
    assert estimate["prompt_tokens"] == 12 * prompt and 12 <= estimate["generated_tokens"] <= 12 * 4
    assert usage.total("estimate", before_step=0) == estimate  # weights of the start (step None) count


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from dataclasses import replace

    import torch
    from transformers import AutoTokenizer

    from nemo_paced.batches import BatchBuilder
    from nemo_paced.tasks import ChainTask, make_splits
    from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig, cached_pretrained

    torch.set_num_threads(1)
    task = ChainTask(max_level=2)
    root = tmp_path_factory.mktemp("demo")
    student = cached_pretrained(root, "student", task, TinyModelConfig(1, 32, 2),
                                PretrainConfig(steps=30, batch_size=16, level_weights={1: 1.0}))
    splits = make_splits(task, pool_per_level=8, test_per_level=4, retained_size=4)
    problems = [replace(p, meta={**p.meta, "split": "train"}) for p in splits.pool]
    tokenizer = AutoTokenizer.from_pretrained(student)
    return {"student": str(student), "problems": problems,
            "prompt_ids": BatchBuilder(tokenizer, 16).prompt_ids(problems[0].prompt)}


def _run(final: dict, start: dict, seed_shift: float = 0.0) -> dict:
    passrates = [{"step": 0, "label": "start", "at_zero": 0.3, "at_one": 0.1, "histogram": [3, 1, 1, 0, 0, 0, 0, 0, 1],
                  "kept": 4, "ess": 3.0}]
    compute = run_compute([{"kept": 4, "tokens": 10}], 5, {"samples": 8, "prompt_tokens": 40, "generated_tokens": 16},
                          {"samples": 0, "prompt_tokens": 0, "generated_tokens": 0}, 100, 400)
    se = {name: 0.2 for name in list(final) + ["mean"]}
    return {"result": {"history": {"passrates": passrates, "steps": [{"step": 0, "kept": 4, "tokens": 10}]},
                       "draws": {"distinct": 4, "total": 40, "per_drawn_problem": 10.0, "max": 12, "pool": 6},
                       "tokens": 100, "sequences": 40},
            "final": {"accuracy": final, "se": se}, "compute": compute, "seconds": 1.0,
            "curve": {"steps": [0, 10], "accuracy": [start, final], "training_tokens": [0, 30],
                      "total_flops": [0.0, compute["total_flops"]]}}


def test_report_states_paired_differences_compute_and_an_honest_verdict(tmp_path):
    start = {"L1": 50.0, "L2": 20.0, "retained": 80.0}
    runs = {"paced": {0: _run({"L1": 60.0, "L2": 30.0, "retained": 78.0}, start),
                      1: _run({"L1": 62.0, "L2": 26.0, "retained": 80.0}, start),
                      2: _run({"L1": 61.0, "L2": 29.0, "retained": 79.0}, start)},
            "uniform": {0: _run({"L1": 70.0, "L2": 40.0, "retained": 81.0}, start),
                        1: _run({"L1": 50.0, "L2": 20.0, "retained": 79.0}, start),
                        2: _run({"L1": 60.0, "L2": 28.0, "retained": 79.0}, start)}}
    methods = {m: method_summary(by_seed, {**start, "mean": 35.0}) for m, by_seed in runs.items()}
    paced = methods["paced"]
    assert paced["final"]["mean"]["mean"] == pytest.approx((45 + 44 + 45) / 3)
    assert paced["final"]["L1"]["std"] == pytest.approx(np.std([60, 62, 61], ddof=1))
    assert paced["per_seed"]["1"]["L2"] == 26.0 and paced["forgetting"]["mean"] == pytest.approx(1.0)
    assert paced["compute"]["mean"]["training_tokens"] == 30 and paced["curve"]["training_tokens"] == [0, 30]
    paired = paired_rows(methods, COMPARISONS)
    mean_row = next(r for r in paired if r["benchmark"] == "mean")
    assert (mean_row["a"], mean_row["b"]) == ("paced", "uniform") and len(paired) == 2  # other methods not run
    assert mean_row["diffs"] == pytest.approx([-10.0, 9.0, 1.0]) and mean_row["better"] == 2
    text = verdict(paired)  # +0.0 points on average, an interval across 0: no verdict either way
    assert text.startswith("paced vs uniform: +0.00 points [") and text.endswith("no clear difference.")
    behind = verdict([{**mean_row, "mean": -2.0, "t_ci95": [-3.0, -1.0]}])
    assert behind.endswith("behind.")

    report = {"config": {"k": 8, "eval_samples": 4}, "methods": methods, "paired": paired, "verdict": text,
              "start": {"accuracy": {"L1": 50.0, "L2": 20.0, "mean": 35.0, "retained": 80.0}, "at_zero": 0.3,
                        "at_one": 0.1, "histogram": [3, 1, 1, 0, 0, 0, 0, 0, 1]},
              "evaluation": {"samples_per_problem": 64, "max_se_mean": 0.2},
              "compute": {"formula": "FLOPs = ..."},
              "budget": {"steps": 10, "tokens_per_step": 10, "pool": 6, "epochs": 1.5},
              "snr": {"model": "paced seed 0", **{label: {"parameters": 10, "bins": [
                  {"pass_rate": 0.5, "snr": 0.1, "snr_ci95": [0.0, 0.2], "cosine_heldout": 0.3,
                   "cosine_ci95": [0.1, 0.5]}]} for label in ("start", "switch", "end")}}}
    table = format_table(report)
    assert "paced - uniform" in table and "Wilcoxon" in table and "total GFLOP" in table and text in table
    assert "1.00x" in table  # uniform's compute against itself
    json.dumps(report)

    from nemo_paced.demo.plots import write_plots

    paths = write_plots(report, tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy_vs_compute.png", "accuracy_vs_tokens.png",
                                             "kernel_over_histogram.png", "passrate_histogram.png",
                                             "snr_by_pass_rate.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_study_table_orders_arms_by_polarisation(tmp_path):
    from nemo_paced.demo.study import STUDY_COMPARISONS, format_study, write_study_plot

    def arm(label, polarised, diff):
        rows = [{"a": a, "b": b, "benchmark": "mean", "mean": diff, "t_ci95": [diff - 1, diff + 1], "better": 3,
                 "n": 5} for a, b in STUDY_COMPARISONS]
        return {"label": label, "polarised": polarised, "start": {"accuracy": {"mean": 60.0}},
                "budget_epochs": 0.76, "paired": rows}

    report = {"config": {"steps": 24, "seeds": [0, 1, 2, 3, 4]},
              "arms": [arm("deep", 0.8, 2.0), arm("shallow", 0.15, -1.0), arm("medium", 0.5, 0.5)]}
    lines = format_study(report).splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["shallow", "medium", "deep"]
    assert "+2.00 [+1.00, +3.00] 3/5" in lines[4]
    assert write_study_plot(report, tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_tiny_cpu_recipe_splits_the_stages():
    from recipes.tiny_cpu import tiny_cpu

    from nemo_paced.train.local import stage_steps

    fkl, rkl = tiny_cpu("fkl", work="w"), tiny_cpu("rkl", work="w")
    assert fkl.stage == "fkl" and stage_steps(fkl) == (0, 150) and fkl.student == "w/student"
    assert rkl.stage == "rkl" and stage_steps(rkl) == (150, 300) and rkl.student == "w/fkl/final"
    assert rkl.out_dir == "w/rkl"
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
        eval_every=2, snr_per_bin=4, seeds=(0, 1), methods=("paced", "uniform"), final_eval_samples=4)
    report = run_demo(micro, tmp_path / "out", tmp_path / "cache", say=lambda _: None, progress=False,
                      workers=2)  # runs spread over two spawned processes
    assert set(report["methods"]) == {"paced", "uniform"}
    for method in report["methods"].values():
        assert method["curve"]["steps"] == [0, 2, 4]
    budget = report["budget"]["tokens_per_step"]  # 8 sequences of the mean reference length
    for name in ("paced", "uniform"):
        result = json.loads((tmp_path / "out" / "runs" / f"{name}-seed0" / "result.json").read_text())
        steps = result["history"]["steps"]
        assert all(abs(s["tokens"] - budget) <= 3 for s in steps), (name, budget, steps)
    paced, uniform = report["methods"]["paced"]["compute"]["mean"], report["methods"]["uniform"]["compute"]["mean"]
    assert paced["onpolicy_samples"] > 0 and uniform["onpolicy_samples"] == 0  # reverse KL samples its own
    assert paced["estimation_samples"] > uniform["estimation_samples"] == 0  # uniform pays no estimation
    assert paced["total_flops"] > uniform["total_flops"]
    assert {r["benchmark"] for r in report["paired"]} == {"mean", "retained"}
    assert report["paired"][0]["n"] == 2
    assert set(report["snr"]) >= {"start", "switch", "end"}
    assert report["snr"]["start"]["parameters"] > 10_000  # every student parameter, not the output layer
    assert all(len(r["snr_ci95"]) == 2 for r in report["snr"]["end"]["bins"])
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


@pytest.mark.parametrize("argv, message", [
    (["--study", "--quick"], "--study runs on its own"),
    (["--study", "--self-distillation"], "--study runs on its own"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_demo_command_refuses_conflicting_options(argv, message, tmp_path, capsys):
    from nemo_paced.cli import main

    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written
