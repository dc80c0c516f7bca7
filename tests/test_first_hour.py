"""A new user's documented mistakes (issue 17): each ends in one line naming the problem and the exit
status `--help` documents, fast, without a traceback or a detour through the Hugging Face Hub; and
degenerate results (all pass rates 0, no verified reference, prompts the model cannot read) warn."""

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_paced.cli import main
from nemo_paced.passrates import PassRateTable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch):
    """As on a machine with no route to the Hub: any attempt would fail (after retries)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"nemo-paced {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_help_documents_the_exit_statuses():
    out = " ".join(subprocess.run([sys.executable, "-m", "nemo_paced", "--help"], capture_output=True, text=True,
                                  check=True).stdout.split())
    assert "2 bad input" in out and "3 the rollout service could not be reached" in out


def test_a_missing_local_dataset_directory_is_named_without_asking_the_hub(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    started = time.perf_counter()
    assert main(["problems", "prepare", "data/missing_dir", "--out", "p.jsonl"]) == 2
    assert time.perf_counter() - started < 5
    assert "problems data/missing_dir: no such file or directory" in _one_line_error(capsys, "problems")


@pytest.mark.parametrize("command", [["eval", "--benchmarks", "p.jsonl", "--out", "e.json", "--model"],
                                     ["make-references", "--problems", "p.jsonl", "--out", "r.jsonl", "--teacher"],
                                     ["serve-rollouts", "--problems", "p.jsonl", "--state-dir", "s", "--model"]])
def test_a_mistyped_model_directory_is_named_without_asking_the_hub(tmp_path, monkeypatch, capsys, offline, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1=", "answer": "2"}) + "\n")
    started = time.perf_counter()
    assert main([*command, "demo/teachr"]) == 2
    assert time.perf_counter() - started < 5
    assert "model demo/teachr: no such directory" in _one_line_error(capsys, command[0])


def test_a_hub_name_is_not_mistaken_for_a_local_path(tmp_path, monkeypatch):
    from nemo_paced.localpaths import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert not looks_local("Qwen/Qwen3-8B") and not looks_local("BytedTsinghua-SIA/DAPO-Math-17k")
    assert looks_local("runs/student") and looks_local("./student") and looks_local("a/b/c")
    assert looks_local("data/train.jsonl") and looks_local("/abs/model")


def _tiny_cpu_files(tmp_path: Path) -> dict[str, Path]:
    """Everything stage fkl of tiny_cpu reads, as empty stand-ins (the checks run before any load)."""
    files = {"init": tmp_path / "student", "teacher": tmp_path / "teacher"}
    for directory in files.values():
        directory.mkdir()
    for name in ("problems", "references", "passrates", "service"):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text("{}")
    return files


def _train(stage: str, files: dict[str, Path], *extra: str) -> int:
    args = ["train", "--recipe", "tiny_cpu", "--stage", stage]
    for name, path in files.items():
        args += [f"--{name}", str(path)]
    return main([*args, *extra])


@pytest.mark.parametrize("missing, message", [
    ("problems", "problems {}: no such file"), ("references", "references {}: no such file"),
    ("passrates", "pass-rate table {}: no such file (leave it unset"),
    ("service", "rollout service address file {}: no such file"), ("teacher", "teacher {}: no such directory")])
def test_train_names_a_missing_input_in_one_line(tmp_path, capsys, missing, message):
    files = _tiny_cpu_files(tmp_path)
    files[missing] = tmp_path / "gone" / "x"
    assert _train("fkl", files, "--out", str(tmp_path / "out")) == 2
    assert message.format(files[missing]) in _one_line_error(capsys, "train")


def test_train_rkl_without_init_says_to_run_fkl_first(tmp_path, monkeypatch, capsys):
    files = _tiny_cpu_files(tmp_path)
    del files["init"], files["references"]  # rkl needs no references
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert _train("rkl", files) == 2
    line = _one_line_error(capsys, "train")
    assert "student runs/tiny/fkl/final: no such directory" in line and "train --stage fkl first" in line


def test_print_config_is_indented_json(capsys):
    assert main(["train", "--recipe", "tiny_cpu", "--stage", "rkl", "--split", "0.8", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["stage"] == "rkl" and config["references"] is None and config["passrates"] is None
    assert config["schedule"]["fkl_fraction"] == 0.8 and config["weighting"]["mode"] == "loss"


def test_stage_split_divides_one_schedule_of_total_steps():
    from nemo_paced.overrides import apply_overrides
    from nemo_paced.train.local import stage_steps
    from recipes import StageFiles
    from recipes.tiny_cpu import tiny_cpu

    fkl, rkl = (apply_overrides(tiny_cpu(stage, StageFiles(split=0.8)), ["schedule.total_steps=50"])
                for stage in ("fkl", "rkl"))
    assert stage_steps(fkl) == (0, 40) and stage_steps(rkl) == (40, 50)
    assert stage_steps(tiny_cpu("fkl")) == (0, 150) and stage_steps(tiny_cpu("rkl")) == (150, 300)


def test_passrates_show_into_a_closed_pipe_has_no_traceback(tmp_path):
    table = PassRateTable()
    table.update([(f"p{i}", i % 9, 8) for i in range(50)], checkpoint="c")
    table.save(tmp_path / "t.jsonl")
    process = subprocess.Popen([sys.executable, "-m", "nemo_paced", "passrates", "show", str(tmp_path / "t.jsonl")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head` that has already exited
    err = process.stderr.read().decode()
    process.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_third_party_warnings_are_hidden_on_the_command_line_only():
    code = ("import warnings; from nemo_paced.console import quiet_third_party; {}"
            "warnings.warn_explicit('noise', FutureWarning, 'x.py', 1, module='transformers.modeling_utils'); "
            "warnings.warn_explicit('ours', UserWarning, 'y.py', 1, module='nemo_paced.sampler')")
    quiet = subprocess.run([sys.executable, "-c", code.format("quiet_third_party(); ")], capture_output=True,
                           text=True, check=True).stderr
    loud = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, check=True).stderr
    assert "noise" not in quiet and "ours" in quiet
    assert "noise" in loud


def test_progress_is_one_log_line_per_interval_off_a_terminal(caplog):
    from nemo_paced.progress import Progress

    caplog.set_level(logging.INFO, logger="nemo_paced")
    progress = Progress(4, "stage fkl", every=0.0)
    for _ in range(4):
        progress.update(1, loss="0.5")
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "nemo_paced.progress"]
    assert lines[0].startswith("stage fkl: 1/4 steps (25%), loss 0.5") and lines[-1].startswith("stage fkl: 4/4")
    assert all("\r" not in line and len(line) < 200 for line in lines)


def test_a_service_restarted_with_other_settings_refuses_the_old_table(tmp_path, capsys, caplog):
    """The first start (README flags: template plain) wrote an all-zero table; a restart with the right
    flags on the same --state-dir must not resume it as if comparable."""
    from nemo_paced.rollout.settings import SettingsChanged, check_resumed

    state = tmp_path / "state"
    first = {"model": "m", "template": "plain", "verifier": "math_boxed", "k": 8, "max_tokens": 1024}
    check_resumed(state, first)
    zeros = PassRateTable()
    zeros.update([("a", 0, 8)], checkpoint="m")
    zeros.save(state / "passrates.jsonl")
    check_resumed(state, first)  # same settings: resumed
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1=", "answer": "2"}) + "\n")
    assert main(["serve-rollouts", "--model", "m", "--problems", str(tmp_path / "p.jsonl"), "--state-dir", str(state),
                 "--template", "raw", "--verifier", "exact", "--max-tokens", "8"]) == 2
    line = _one_line_error(capsys, "serve-rollouts")
    assert "max_tokens 1024 -> 8, template 'plain' -> 'raw', verifier 'math_boxed' -> 'exact'" in line
    assert "--allow-settings-change" in line
    right = {**first, "template": "raw", "verifier": "exact", "max_tokens": 8}
    with pytest.raises(SettingsChanged):
        check_resumed(state, right)
    check_resumed(state, right, allow_change=True)  # told to: kept, with a warning, and recorded
    assert any("kept because --allow-settings-change" in r.getMessage() for r in caplog.records)
    check_resumed(state, right)


def test_estimate_warns_when_every_pass_rate_is_zero(tmp_path, capsys):
    from rollout_toys import save_tiny_model, toy_problems

    from nemo_paced.demo.service import loopback_service

    save_tiny_model(tmp_path / "model")
    unreachable = [p.__class__(p.id, p.prompt, "#") for p in toy_problems()]  # "#" is not in the vocabulary
    with loopback_service(str(tmp_path / "model"), unreachable, tmp_path / "state", k=2, max_tokens=2) as url:
        assert main(["estimate", "--service", url, "--wait", "--poll", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "mean pass rate 0.000" in err
    assert f"warning: every pass rate is 0 or 1 ({len(unreachable)} of {len(unreachable)} at 0)" in err


@pytest.mark.slow
def test_the_cpu_chain_in_launch_readme_runs_as_written(tmp_path):
    """launch/README.md's CPU walk through the chain, run verbatim (models cached as for the demo)."""
    text = (REPO / "launch" / "README.md").read_text()
    script = text.split("<!-- cpu-chain -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (tmp_path / ".cache").symlink_to(REPO / ".cache", target_is_directory=True)
    (REPO / ".cache").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "warning" not in done.stderr.lower(), done.stderr[-4000:]
    mean = float(re.search(r"mean pass rate (\d\.\d+)", done.stderr).group(1))
    assert 0 < mean < 1
    assert "stage fkl done: 10 steps trained (steps 0-10)" in done.stderr
    assert "stage rkl done: 10 steps trained (steps 10-20)" in done.stderr
    assert re.search(r"accuracy: L1 \d+\.\d%.*\(before: L1 ", done.stderr)
    rkl = json.loads((tmp_path / "runs" / "tiny" / "rkl" / "result.json").read_text())
    assert rkl["stage"] == "rkl" and [s["stage"] for s in rkl["history"]["steps"]] == ["rkl"] * 10


def test_make_references_help_names_only_flags_it_has():
    out = subprocess.run([sys.executable, "-m", "nemo_paced", "make-references", "--help"], capture_output=True,
                         text=True, check=True).stdout
    flags = set(re.findall(r"(--[a-z][a-z-]+)", out))
    assert "--model" not in flags and "--teacher" in flags
    assert "(default: --teacher)" in " ".join(out.split())


def test_a_log_file_gets_no_progress_bars_from_hugging_face_libraries(tmp_path):
    """In a SLURM log, transformers' "Loading weights" bar is a carriage-return line; the command turns it off."""
    from rollout_toys import save_tiny_model

    save_tiny_model(tmp_path / "model")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1=", "answer": "2"}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-m", "nemo_paced", "eval", "--model", str(tmp_path / "model"),
                           "--benchmarks", str(tmp_path / "p.jsonl"), "--n", "1", "--template", "raw",
                           "--verifier", "exact", "--max-tokens", "2", "--out", str(tmp_path / "e.json")],
                          capture_output=True, text=True, env=env, check=True)
    assert "Loading weights" not in done.stderr and "\r" not in done.stderr, done.stderr
