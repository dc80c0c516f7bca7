import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_paced.passrates import Outcome, PassRateFileError, PassRateTable, UnknownPolicy
from nemo_paced.weighting import WeightConfig


def test_update_replaces_and_bumps_version():
    table = PassRateTable()
    assert table.version == 0
    v1 = table.update([("a", 2, 8), Outcome("b", 8, 8)], checkpoint="ckpt-1", step=10, now=100.0)
    assert v1 == 1 == table.version
    v2 = table.update([{"problem_id": "a", "successes": 6, "trials": 8}], checkpoint="ckpt-2", step=20)
    assert v2 == 2
    a = table["a"]
    assert (a.successes, a.trials, a.checkpoint, a.step, a.version) == (6, 8, "ckpt-2", 20, 2)
    assert table["b"].checkpoint == "ckpt-1" and table["b"].updated_at == 100.0
    assert [r.problem_id for r in table.since(1)] == ["a"]
    assert {r.problem_id for r in table.since(0)} == {"a", "b"}


def test_empty_update_does_not_bump_version():
    table = PassRateTable()
    assert table.update([]) == 0


def test_accumulate_decays_old_evidence():
    table = PassRateTable(update_mode="accumulate", decay=0.5)
    table.update([("a", 8, 8)])
    table.update([("a", 0, 8)])
    assert (table["a"].successes, table["a"].trials) == (4.0, 12.0)
    table.update([("a", 8, 8)])
    assert (table["a"].successes, table["a"].trials) == (10.0, 14.0)


@pytest.mark.parametrize("bad,field", [(("a", 9, 8), "successes"), (("a", -1, 8), "successes"),
                                       (("", 1, 8), "problem_id"), (("a", 1.5, 8), "successes"),
                                       (("a", 0, 0), "trials"), ({"problem_id": "a", "trials": 8}, "successes")])
def test_bad_outcomes_are_rejected_and_leave_table_unchanged(bad, field):
    table = PassRateTable()
    table.update([("ok", 1, 2)])
    with pytest.raises(ValueError, match=field):
        table.update([("fine", 1, 2), bad])
    assert table.version == 1 and "fine" not in table


def test_weights_with_unknown_policies():
    table = PassRateTable()
    table.update([("a", 4, 8), ("b", 0, 8), ("c", 2, 8)])
    config = WeightConfig()
    ids = ["a", "b", "c", "new"]
    np.testing.assert_allclose(table.weights(ids, config), [0.25, 0.0, 0.1875, 0.0])
    np.testing.assert_allclose(table.weights(ids, config, UnknownPolicy.PEAK)[-1], 0.25)
    np.testing.assert_allclose(table.weights(ids, config, "mean")[-1], (0.25 + 0 + 0.1875) / 3)
    assert np.isnan(table.pass_rates(ids)[-1]) and table.pass_rates(ids)[0] == 0.5
    with pytest.raises(ValueError, match="unknown"):
        table.weights(ids, config, "guess")


def test_unknown_mean_stays_unweighted_in_filter_mode():
    """Filter mode is unweighted: an unestimated problem under unknown="mean" gets 0 or 1 (the mean
    rounded), never the fraction of estimated problems inside the band."""
    config = WeightConfig(mode="filter", band=(0.2, 0.8))
    table = PassRateTable()
    table.update([("a", 4, 8), ("b", 0, 8), ("c", 2, 8)])  # a and c in the band: mean 2/3
    weights = table.weights(["a", "b", "c", "new"], config, "mean")
    np.testing.assert_array_equal(weights, [1.0, 0.0, 1.0, 1.0])
    table.update([("c", 8, 8)])  # only a in the band: mean 1/3
    np.testing.assert_array_equal(table.weights(["a", "b", "c", "new"], config, "mean"), [1.0, 0.0, 0.0, 0.0])
    table.update([("b", 4, 8)])  # a and b of three: 2/3 again; a 2-2 tie keeps it
    assert table.weights(["a", "b", "c", "new"], config, "mean")[-1] == 1.0
    assert table.weights(["a", "c", "new"], config, "mean")[-1] == 1.0  # one of two: exactly 0.5
    uniform = table.weights(["a", "new"], WeightConfig(mode="uniform"), "mean")
    np.testing.assert_array_equal(uniform, [1.0, 1.0])


def test_save_load_roundtrip(tmp_path):
    table = PassRateTable(update_mode="accumulate", decay=0.25)
    table.update([("a", 1, 8), ("b", 3, 8)], checkpoint="c1", step=5)
    table.update([("a", 2, 8)], checkpoint=None, step=None)
    path = tmp_path / "sub" / "table.jsonl"
    table.save(path)
    loaded = PassRateTable.load(path)
    assert loaded.version == 2 and loaded.update_mode.value == "accumulate" and loaded.decay == 0.25
    assert loaded.records() == table.records()
    assert [p.name for p in path.parent.iterdir()] == ["table.jsonl"]  # no temp files left behind


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "table.jsonl"
    table = PassRateTable()
    table.update([("a", 1, 8)])
    table.save(path)
    before = path.read_text()
    table.update([("b", 1, 8)])

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        table.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["table.jsonl"]


def _write(path, header, *rows):
    lines = [header if isinstance(header, str) else json.dumps(header)]
    lines += [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


HEADER = {"format": "nemo-paced.passrates", "schema": 1, "version": 3}
ROW = {"problem_id": "a", "successes": 1, "trials": 8, "checkpoint": None, "step": None, "updated_at": 1.0,
       "version": 3}


@pytest.mark.parametrize("header,rows,message", [
    ("not json", [], r":1: not valid JSON"),
    ({**HEADER, "format": "other"}, [], r":1: field 'format'"),
    ({**HEADER, "schema": 9}, [], r":1: field 'schema'"),
    ({**HEADER, "version": -1}, [], r":1: field 'version'"),
    (HEADER, [ROW, {**ROW, "successes": 9}], r":3: field 'successes'"),
    (HEADER, [{k: v for k, v in ROW.items() if k != "trials"}], r":2: field 'trials': missing"),
    (HEADER, [{**ROW, "version": 4}], r":2: field 'version'"),
    (HEADER, [{**ROW, "step": "x"}], r":2: field 'step'"),
    (HEADER, [{**ROW, "problem_id": ""}], r":2: field 'problem_id'"),
    (HEADER, [ROW, ROW], r":3: field 'problem_id': duplicate"),
    (HEADER, ["[1, 2]"], r":2: expected a JSON object"),
])
def test_malformed_files_name_file_line_and_field(tmp_path, header, rows, message):
    path = tmp_path / "t.jsonl"
    _write(path, header, *rows)
    with pytest.raises(PassRateFileError, match=str(path).replace(".", r"\.") + message):
        PassRateTable.load(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PassRateFileError, match="cannot read"):
        PassRateTable.load(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PassRateFileError, match="empty"):
        PassRateTable.load(tmp_path / "empty.jsonl")


def test_merge_adopts_newer_records():
    service = PassRateTable()
    service.update([("a", 1, 8)])
    service.update([("b", 2, 8)])
    local = PassRateTable()
    local.merge([PassRateTable.record_from_row(r) for r in service.to_rows(since=0)], service.version)
    assert local.version == 2 and local.records() == service.records()
    with pytest.raises(PassRateFileError, match="field 'trials'"):
        PassRateTable.record_from_row({**ROW, "trials": 0}, where="response")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 8)), min_size=1, max_size=6),
                min_size=1, max_size=5))
def test_replace_mode_keeps_latest_evidence(batches):
    table = PassRateTable()
    latest = {}
    for batch in batches:
        table.update([(pid, k, 8) for pid, k in batch])
        latest.update({pid: k for pid, k in batch})
    assert table.version == len(batches)
    assert {r.problem_id: r.successes for r in table.records()} == latest
