"""A shared cache entry appears whole or not at all, whichever of a sweep's workers builds it first."""
from __future__ import annotations

from importlib import import_module

import pytest

from ftlab.config import DataConfig
from ftlab.files import publishing

prepare_module = import_module("ftlab.data.prepare")  # the module; ftlab.data.prepare is also its function


def test_a_directory_appears_whole_and_the_first_of_two_builders_to_finish_wins(tmp_path):
    out = tmp_path / "models" / "converted"
    with publishing(out) as slower:  # two workers building at once
        with publishing(out) as faster:
            (slower / "config.json").write_text("slower")
            (faster / "config.json").write_text("faster")
            assert not out.exists()  # nothing half-built to read meanwhile
        assert (out / "config.json").read_text() == "faster"
    assert (out / "config.json").read_text() == "faster"
    assert [p.name for p in out.parent.iterdir()] == ["converted"]  # the loser's copy removed


def test_a_file_appears_whole_and_a_failed_build_leaves_nothing(tmp_path):
    out = tmp_path / "data.jsonl"
    with publishing(out, directory=False) as staged:
        staged.write_text("a\n")
        assert not out.exists()
    assert out.read_text() == "a\n"
    with pytest.raises(RuntimeError), publishing(tmp_path / "broken.jsonl", directory=False) as staged:
        staged.write_text("half")
        raise RuntimeError("the build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_generated_data_is_written_beside_its_place_and_moved_in(tmp_path, monkeypatch):
    """A second worker that finds the generated file reads all of it, not what has been written so far."""
    final = tmp_path / "data" / "support_tickets-n50-s7.jsonl"
    write_jsonl = prepare_module.write_jsonl

    def writing(records, path):
        assert path != final and not final.exists()
        return write_jsonl(records, path)

    monkeypatch.setattr(prepare_module, "write_jsonl", writing)
    source = prepare_module.resolve_source(DataConfig(num_records=50), tmp_path)
    assert source == str(final) and len(final.read_text().splitlines()) == 50


def test_a_checkpoints_weights_fingerprint_changes_with_its_weights_safetensors_or_pickled(tmp_path):
    """The registry refuses a base whose weights changed since training by this fingerprint; pickled
    weights (model.allow_pickle_weights) gave a constant one, so no change was ever seen."""
    from ftlab.files import weights_fingerprint

    for name in ("model.safetensors", "pytorch_model.bin"):
        checkpoint = tmp_path / name
        checkpoint.mkdir()
        (checkpoint / name).write_bytes(b"\x01" * (3 * 2**20))
        (checkpoint / "config.json").write_text("{}")
        before = weights_fingerprint(checkpoint)
        (checkpoint / "config.json").write_text('{"a": 1}')  # not weights
        assert weights_fingerprint(checkpoint) == before
        (checkpoint / name).write_bytes(b"\x01" * (3 * 2**20 - 1) + b"\x02")  # the last byte
        assert weights_fingerprint(checkpoint) != before, name
