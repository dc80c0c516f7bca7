import json
import subprocess
import sys

import pytest

from nemo_paced.cli import main
from nemo_paced.passrates import PassRateTable


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "nemo_paced", "--help"], capture_output=True, text=True, check=True)
    assert "PACED" in out.stdout
    for command in ("kernel", "passrates"):
        assert command in out.stdout


def test_kernel_prints_values_and_peak(capsys):
    assert main(["kernel", "--alpha", "2", "--beta", "1", "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert " 0.500    0.125000" in out
    assert "peak: p = 0.6667, w = 0.148148" in out


def test_kernel_flat_and_bad_settings(capsys):
    main(["kernel", "--alpha", "0", "--beta", "0"])
    assert "flat kernel" in capsys.readouterr().out
    assert main(["kernel", "--alpha", "-1"]) == 2
    assert "alpha must be" in capsys.readouterr().err


def test_passrates_show(tmp_path, capsys):
    table = PassRateTable()
    table.update([("a", 0, 8), ("b", 4, 8), ("c", 8, 8), ("d", 2, 8)], checkpoint="step-3")
    table.save(tmp_path / "t.jsonl")
    assert main(["passrates", "show", str(tmp_path / "t.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "4 problems, table version 1, K = 8, checkpoints: step-3" in out
    assert "at p=0: 25.0%, at p=1: 25.0%" in out
    assert "kept 2/4" in out
    main(["passrates", "show", str(tmp_path / "t.jsonl"), "--json", "--mode", "filter"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["histogram"] == [1, 0, 1, 0, 1, 0, 0, 0, 1]
    assert summary["weights"]["kept"] == 2 and summary["weights"]["ess"] == pytest.approx(2.0)


def test_passrates_show_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "nemo-paced.passrates", "schema": 1, "version": 1}\n{"problem_id": 3}\n')
    assert main(["passrates", "show", str(bad)]) == 2
    assert "bad.jsonl:2: field 'problem_id'" in capsys.readouterr().err


def test_passrates_show_warns_when_every_pass_rate_is_0_or_1(tmp_path, capsys):
    table = PassRateTable()
    table.update([("a", 0, 8), ("b", 0, 8), ("c", 8, 8)], checkpoint="c")
    table.save(tmp_path / "t.jsonl")
    assert main(["passrates", "show", str(tmp_path / "t.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "kept 0/3, ESS 0.0" in captured.out
    assert "warning: every pass rate is 0 or 1 (2 of 3 at 0)" in captured.err
