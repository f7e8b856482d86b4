"""Manifest planning: defaults, stable ids and seeds, sanitised file names, bad rows and duplicates."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.manifest import (RowDefaults, RowInvalid, file_stem, normalize_row, read_manifest, seed_for,
                                stable_id)


def test_defaults_fill_missing_columns_only():
    given_id, params = normalize_row({"prompt": "dog", "duration": 2.0}, RowDefaults(duration=5.0, top_k=50))
    assert given_id is None
    assert params["duration"] == 2.0 and params["top_k"] == 50 and params["seed"] is None


@pytest.mark.parametrize("row,field", [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": None}, "prompt"),
    ({"prompt": b"\xff\xfe bad"}, "prompt"), ({"prompt": "a", "duration": -1.0}, "duration"),
    ({"prompt": "a", "duration": 0}, "duration"), ({"prompt": "a", "temperature": math.nan}, "temperature"),
    ({"prompt": "a", "top_p": math.inf}, "top_p"), ({"prompt": "a", "seed": -3}, "seed"),
    ({"prompt": "a", "top_k": 2.5}, "top_k"), ({"prompt": "a", "id": "  "}, "id"),
])
def test_bad_rows_name_the_field(row, field):
    with pytest.raises(RowInvalid) as info:
        normalize_row(row, RowDefaults())
    assert info.value.field == field


def test_ids_and_seeds_are_stable_and_parameter_sensitive():
    a = stable_id("dog", {"duration": 2.0, "seed": None})
    assert a == stable_id("dog", {"seed": None, "duration": 2.0})
    assert a != stable_id("dog", {"duration": 3.0, "seed": None})
    assert seed_for(a) == seed_for(a) and 0 <= seed_for(a) < 2**63


@pytest.mark.parametrize("row_id", ["../../etc/passwd", "a/b", ".hidden", "x" * 300, "ok-id_1.0", "ünïcode id"])
def test_file_stems_cannot_escape_the_prefix(row_id):
    stem = file_stem(row_id)
    assert "/" not in stem and not stem.startswith(".") and len(stem) <= 113
    assert all(ch.isalnum() or ch in "._-" for ch in stem)
    if row_id == "ok-id_1.0":
        assert stem == row_id
    assert file_stem("a/b") != file_stem("a_b")  # changed ids get a hash suffix: no collisions


def test_read_manifest_plans_rows_errors_and_duplicates(tmp_path):
    pq.write_table(pa.table({"id": ["x", None, "x", None], "prompt": ["dog", "cat", "bird", ""],
                             "duration": [1.0, None, 2.0, 1.0]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["y"], "prompt": ["rain"], "duration": [1.5]}), tmp_path / "b.parquet")
    plan = read_manifest(str(tmp_path), None, RowDefaults(duration=3.0))
    assert plan.rows_read == 5
    assert [r.prompt for r in plan.rows] == ["dog", "cat", "rain"]
    assert plan.rows[1].duration == 3.0 and plan.rows[1].id.startswith("r-")
    assert sorted(e.field for e in plan.errors) == ["id", "prompt"]
    duplicate = next(e for e in plan.errors if e.field == "id")
    assert duplicate.id == "x" and duplicate.row == 2 and "row 0" in duplicate.message


def test_manifest_without_prompt_column_or_files_fails_clearly(tmp_path):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        read_manifest(str(tmp_path / "m.parquet"), None, RowDefaults())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(str(tmp_path / "missing"), None, RowDefaults())
