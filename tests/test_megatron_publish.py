"""Atomic publication of exported student checkpoints."""

from __future__ import annotations

import pytest

from nemo_paced.megatron.publish import prepare, publish, step_dirs


def test_export_appears_whole_under_its_final_name(tmp_path):
    partial, final = step_dirs(tmp_path / "student_hf", 200)
    assert final.name == "step-0000200" and partial.parent == final.parent and partial.name.startswith(".")
    prepare(partial)
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "shards").mkdir()
    (partial / "shards" / "model-00001.safetensors").write_bytes(b"\0" * 16)
    assert publish(partial, final) == final
    assert not partial.exists()
    assert (final / "config.json").read_text() == "{}"
    assert (final / "shards" / "model-00001.safetensors").stat().st_size == 16


def test_leftovers_of_a_crash_are_cleared_and_published_exports_never_replaced(tmp_path):
    partial, final = step_dirs(tmp_path, 50)
    partial.mkdir()
    (partial / "half-written.bin").write_bytes(b"x")
    prepare(partial)
    assert not partial.exists() and not final.exists()
    partial.mkdir()
    publish(partial, final)
    partial.mkdir()
    with pytest.raises(FileExistsError, match="never replaces"):
        publish(partial, final)
