"""The single-machine trainer against the real rollout service on loopback, with real tiny models:
two stages, pass-rate refreshes, weighting, checkpoints, preemption by signal and exact resume."""

import json
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nemo_paced.demo.service import loopback_service
from nemo_paced.passrates import PassRateTable
from nemo_paced.problems import save_problems
from nemo_paced.schedule import TwoStageSchedule
from nemo_paced.tasks import ChainTask, make_splits
from nemo_paced.tiny_models import PretrainConfig, TinyModelConfig, cached_pretrained
from nemo_paced.train.local import LocalTrainConfig, train
from nemo_paced.weighting import WeightConfig

TASK = ChainTask(max_level=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher and student, problem files, verified references and a starting pass-rate table."""
    from nemo_paced.references import ReferenceConfig, make_references
    from nemo_paced.rollout.client import RolloutClient
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.verifiers import resolve

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("local")
    teacher = cached_pretrained(root / "cache", "teacher", TASK, TinyModelConfig(2, 32, 2),
                                PretrainConfig(steps=200, batch_size=32, level_weights={1: 1, 2: 1, 3: 1}))
    student = cached_pretrained(root / "cache", "student", TASK, TinyModelConfig(1, 32, 2),
                                PretrainConfig(steps=120, batch_size=32, level_weights={1: 1, 2: 1}))
    splits = make_splits(TASK, pool_per_level=16, test_per_level=8, retained_size=8)
    pool = [replace(p, meta={**p.meta, "split": "train"}) for p in splits.pool]
    tests = [replace(p, meta={**p.meta, "split": "test", "benchmark": f"L{level}"})
             for level, ps in splits.test.items() for p in ps]
    problems = root / "problems.jsonl"
    save_problems(problems, pool + tests)
    refs = root / "references.jsonl"
    make_references(HFEngine(str(teacher), device="cpu"), pool, resolve("exact"), refs,
                    ReferenceConfig(n=1, template="raw", temperature=0.0, max_tokens=4))
    with loopback_service(str(student), pool + tests, root / "service", max_tokens=4) as url:
        with RolloutClient(url) as client:
            client.wait(client.estimate([p.id for p in pool]), poll=0.05)
            table = PassRateTable()
            table.merge(*reversed(client.table_since(0)))
    table.save(root / "passrates.jsonl")
    return {"root": root, "teacher": str(teacher), "student": str(student), "problems": str(problems),
            "references": str(refs), "passrates": str(root / "passrates.jsonl"), "pool": pool, "table": table}


def _config(setup, out, url, **overrides):
    base = dict(student=setup["student"], teacher=setup["teacher"], problems=setup["problems"],
                references=setup["references"], passrates=setup["passrates"], rollout=url, out_dir=str(out),
                batch_size=8, seq_length=TASK.prompt_width + 4, checkpoint_every=2, progress=False)
    return LocalTrainConfig(**{**base, **overrides})



def test_two_stage_run_refreshes_pass_rates_and_evaluates(setup, tmp_path):
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        schedule = TwoStageSchedule(total_steps=6, fkl_fraction=0.5, refresh_every=2)
        result = train(_config(setup, tmp_path / "run", url, schedule=schedule))
    assert result["status"] == "done" and result["step"] == 6
    stages = [s["stage"] for s in result["history"]["steps"]]
    assert stages == ["fkl"] * 3 + ["rkl"] * 3
    refreshes = [(e["label"], e["step"]) for e in result["history"]["passrates"]]
    assert refreshes == [("start", 0), ("refresh", 2), ("refresh", 3), ("refresh", 5), ("end", 6)]
    assert all(e["estimated"] == len(setup["pool"]) for e in result["history"]["passrates"])
    evals = result["history"]["evals"]
    assert [e["step"] for e in evals] == [0, 6] and set(evals[0]["accuracy"]) == {"L1", "L2", "L3"}
    assert all(s["tokens"] > 0 and torch.isfinite(torch.tensor(s["loss"])) for s in result["history"]["steps"])
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "done"
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    start = AutoModelForCausalLM.from_pretrained(setup["student"])
    assert any(not torch.equal(a, b) for a, b in zip(final.parameters(), start.parameters()))


def test_paced_weights_decide_which_problems_are_trained(setup, tmp_path):
    """Without refreshes, PACED draws only problems with 0 < p < 1 and the filter only 0.2 < p < 0.8."""
    table = setup["table"]
    rates = dict(zip([p.id for p in setup["pool"]], table.pass_rates([p.id for p in setup["pool"]])))
    schedule = TwoStageSchedule(total_steps=4, fkl_fraction=1.0)
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        paced = train(_config(setup, tmp_path / "paced", url, schedule=schedule, final_estimate=False))
        band = train(_config(setup, tmp_path / "filter", url, schedule=schedule, final_estimate=False,
                             weighting=WeightConfig(mode="filter")))
    paced_ids = _drawn(tmp_path / "paced")
    filter_ids = _drawn(tmp_path / "filter")
    assert paced_ids and all(0 < rates[i] < 1 for i in paced_ids)
    assert filter_ids and all(0.2 < rates[i] < 0.8 for i in filter_ids)
    assert paced["draws"]["total"] == band["draws"]["total"] == 4 * 8  # same budget in sequences


def test_a_token_budget_per_step_gives_every_step_the_same_tokens(setup, tmp_path):
    """With tokens_per_step, both stages train each step on the leading drawn sequences that hold
    the budget (to within half a sequence), whatever the lengths of references and samples."""
    schedule = TwoStageSchedule(total_steps=4, fkl_fraction=0.5)
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        result = train(_config(setup, tmp_path / "run", url, schedule=schedule, batch_size=16, tokens_per_step=12,
                               final_estimate=False))
    steps = result["history"]["steps"]
    assert [s["stage"] for s in steps] == ["fkl", "fkl", "rkl", "rkl"]
    longest = 4 + 1  # max_tokens and EOS
    assert all(abs(s["tokens"] - 12) <= longest / 2 for s in steps), steps
    assert all(s["kept"] < 16 for s in steps)  # trimmed: 16 sequences of >= 1 token would overshoot
    assert result["tokens"] == sum(s["tokens"] for s in steps)
    assert result["draws"]["total"] == result["sequences"] == sum(s["kept"] for s in steps)  # only used rows


def test_signal_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(setup, tmp_path):
    schedule = TwoStageSchedule(total_steps=6, fkl_fraction=0.5)
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "a", max_tokens=4) as url:
        whole = train(_config(setup, tmp_path / "whole", url, schedule=schedule, final_estimate=False))
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "b", max_tokens=4) as url:
        config = _config(setup, tmp_path / "split", url, schedule=schedule, final_estimate=False)
        watcher = threading.Thread(target=_signal_when, args=(tmp_path / "split" / "checkpoint.pt",), daemon=True)
        watcher.start()
        first = train(config)
        watcher.join()
        assert first["status"] == "preempted" and 2 <= first["step"] < 6
        assert not (tmp_path / "split" / "final").exists()
        second = train(config)
    assert second["status"] == "done" and second["step"] == 6
    assert [s["loss"] for s in second["history"]["steps"]] == [s["loss"] for s in whole["history"]["steps"]]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["student"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_with_no_weight_left_ends_early_and_says_why(setup, tmp_path):
    schedule = TwoStageSchedule(total_steps=4, fkl_fraction=1.0)
    nothing = WeightConfig(mode="filter", band=(0.999, 1.0))  # no 8-sample estimate lies inside
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        result = train(_config(setup, tmp_path / "run", url, schedule=schedule, weighting=nothing,
                               final_estimate=False))
    assert result["status"] == "done" and result["history"]["steps"] == []
    (stopped,) = result["history"]["stopped"]
    assert stopped["step"] == 0 and stopped["skipped"] == 4 and "weight 0" in stopped["reason"]


def test_bad_settings_are_named(setup, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _config(setup, tmp_path, "http://127.0.0.1:1", batch_size=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        _config(setup, tmp_path, "http://127.0.0.1:1", lr=0.0)


def _all_problems(setup):
    from nemo_paced.problems import load_problems

    return load_problems(setup["problems"])


def _drawn(run_dir: Path) -> set[str]:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return set(state["draws"])


def _signal_when(path: Path, signum: int = signal.SIGUSR1, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_train_command_exits_non_zero_while_a_signalled_stage_is_unfinished(setup, tmp_path, signum):
    """SIGTERM (preemption, scancel) and SIGUSR1 (the time-limit warning) both leave the stage
    unfinished: non-zero, so afterok dependents wait and NeMo-Run's template requeues the job."""
    from nemo_paced.cli.train import EXIT_PREEMPTED, run

    schedule = TwoStageSchedule(total_steps=12, fkl_fraction=1.0)  # long enough to stop well before the end
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        config = _config(setup, tmp_path / "run", url, schedule=schedule, final_estimate=False)
        watcher = threading.Thread(target=_signal_when, args=(tmp_path / "run" / "checkpoint.pt", signum),
                                   daemon=True)
        watcher.start()
        assert run(config) == EXIT_PREEMPTED  # SLURM's afterok dependents must not start
        watcher.join()
        assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "preempted"
        assert run(config) == 0  # the resumed stage finishes
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "done"


def test_two_stages_share_one_schedule_and_rkl_needs_no_references_or_table_file(setup, tmp_path, caplog):
    """The chain's two runs: fkl trains steps [0, switch), rkl [switch, total) from fkl's final student,
    both starting from the service's table (no passrates file), rkl without references; each records
    its stage, logs progress lines (not a bar: the output is no terminal) and a closing summary."""
    caplog.set_level(logging.INFO, logger="nemo_paced")
    schedule = TwoStageSchedule(total_steps=5, fkl_fraction=0.6, refresh_every=0)
    from nemo_paced.rollout.client import RolloutClient

    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        with RolloutClient(url) as client:  # the chain's estimate0
            client.wait(client.estimate([p.id for p in setup["pool"]]), poll=0.05)
        common = dict(schedule=schedule, passrates=None, progress=True, progress_every=0.0)
        fkl = train(_config(setup, tmp_path / "fkl", url, stage="fkl", **common))
        rkl = train(_config(setup, tmp_path / "rkl", url, stage="rkl", references=None,
                            student=str(tmp_path / "fkl" / "final"), **common))
    assert (fkl["stage"], fkl["stage_steps"]) == ("fkl", [0, 3]) and (rkl["stage"], rkl["stage_steps"]) == ("rkl", [3, 5])
    assert [s["step"] for s in fkl["history"]["steps"]] == [0, 1, 2]
    assert [(s["step"], s["stage"]) for s in rkl["history"]["steps"]] == [(3, "rkl"), (4, "rkl")]
    assert fkl["history"]["passrates"][0]["estimated"] == len(setup["pool"])  # the service's table
    messages = [r.getMessage() for r in caplog.records]
    assert "stage fkl: 3/3 steps (100%)" in "\n".join(messages) and "stage rkl: 2/2 steps" in "\n".join(messages)
    n = len(setup["pool"])
    assert any(m.startswith(f"pass rates (end at step 5): {n}/{n} problems") for m in messages), messages
    assert f"stage rkl done: 2 steps trained (steps 3-5), final student {tmp_path / 'rkl' / 'final'}" in messages
    assert any(m.startswith("accuracy: L1 ") and "(before: L1 " in m for m in messages)


def test_a_checkpoint_of_another_stage_is_refused_and_a_resume_says_from_where(setup, tmp_path, caplog):
    from nemo_paced.train.local import RunMismatch

    caplog.set_level(logging.INFO, logger="nemo_paced")
    schedule = TwoStageSchedule(total_steps=4, fkl_fraction=0.5)
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        fkl = train(_config(setup, tmp_path / "out", url, schedule=schedule, stage="fkl", final_estimate=False))
        assert fkl["status"] == "done"
        with pytest.raises(RunMismatch, match=r"checkpoint.pt is stage fkl \(steps \[0, 2\]\), stopped at step 2; "
                                              r"this run is stage rkl"):
            train(_config(setup, tmp_path / "out", url, schedule=schedule, stage="rkl", references=None,
                          student=str(tmp_path / "out" / "final")))
        again = train(_config(setup, tmp_path / "out", url, schedule=schedule, stage="fkl", final_estimate=False))
    assert again["status"] == "done" and len(again["history"]["steps"]) == 2  # nothing retrained
    assert any(r.getMessage().startswith("resumed from step 2 of stage fkl") for r in caplog.records)


def test_degenerate_inputs_warn(setup, tmp_path, caplog):
    """A table where every pass rate is 0 (wrong template/verifier) and a problem file without test
    problems both say so, instead of training on nothing and reporting an empty accuracy."""
    from nemo_paced.problems import save_problems

    zeros = PassRateTable()
    zeros.update([(p.id, 0, 8) for p in setup["pool"]], checkpoint="c")
    zeros.save(tmp_path / "zeros.jsonl")
    save_problems(tmp_path / "pool.jsonl", setup["pool"])
    schedule = TwoStageSchedule(total_steps=2, fkl_fraction=1.0)
    with loopback_service(setup["student"], _all_problems(setup), tmp_path / "service", max_tokens=4) as url:
        result = train(_config(setup, tmp_path / "run", url, schedule=schedule, passrates=str(tmp_path / "zeros.jsonl"),
                               problems=str(tmp_path / "pool.jsonl"), final_estimate=False))
    assert result["history"]["steps"] == [] and result["history"]["evals"][-1]["accuracy"] == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("has no problem with meta.split = \"test\"" in w for w in warnings)
    assert any(w.startswith("every pass rate is 0 or 1 (start at step 0: 100% at 0") for w in warnings)


def test_train_command_reports_a_stopped_service_in_one_line(setup, tmp_path, capsys):
    from gloo_ranks import free_port

    from nemo_paced.cli import main

    status = main(["train", "--recipe", "tiny_cpu", "--stage", "fkl", "--init", setup["student"],
                   "--teacher", setup["teacher"], "--problems", setup["problems"], "--references", setup["references"],
                   "--service", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "out"),
                   f"seq_length={TASK.prompt_width + 4}", "batch_size=8"])
    err = capsys.readouterr().err
    assert status == 3 and "Traceback" not in err
    assert "nemo-paced train: error: cannot reach the rollout service at http://127.0.0.1:" in err
