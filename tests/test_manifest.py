"""Manifest planning: defaults, stable ids and seeds, sanitised file names, bad rows, duplicates and done rows."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiogen.errors import InvalidRequestError
from audiogen.sampling_params import SamplingParams
from pipelines.manifest import (check_manifest, file_stem, normalize_row, normalize_table, plan_manifest, seed_for,
                                stable_id)
from audiogen.data.manifest import expand_inputs


def test_defaults_fill_missing_values_only_and_seeds_come_from_ids():
    row = normalize_row({"prompt": "dog", "duration": 2.0, "temperature": 0.5}, SamplingParams(top_k=50,
                        temperature=1.0), duration=5.0)
    assert row["duration"] == 2.0 and row["top_k"] == 50 and row["temperature"] == 0.5
    assert row["id"].startswith("r-") and row["seed"] == seed_for(row["id"]) and row["status"] == "todo"
    assert normalize_row({"prompt": "dog"}, SamplingParams(), duration=5.0)["duration"] == 5.0
    assert normalize_row({"prompt": "dog", "seed": 7, "id": 12}, SamplingParams())["seed"] == 7


@pytest.mark.parametrize("row,field,limit", [
    ({"prompt": ""}, "prompt", "non-space"), ({"prompt": "   "}, "prompt", "non-space"),
    ({"prompt": None}, "prompt", "non-empty"), ({"prompt": b"\xff\xfe bad"}, "prompt", None),
    ({"prompt": "a", "duration": -1.0}, "duration", "> 0 s"), ({"prompt": "a", "duration": 0}, "duration", "> 0 s"),
    ({"prompt": "a", "temperature": math.nan}, "temperature", "0 <= temperature"),
    ({"prompt": "a", "top_p": math.inf}, "top_p", "0 <= top_p <= 1"), ({"prompt": "a", "seed": -3}, "seed", "0.."),
    ({"prompt": "a", "top_k": 2.5}, "top_k", "codebook"), ({"prompt": "a", "id": "  "}, "id", "non-space"),
    ({"prompt": "a", "id": 1.5}, "id", None),
])
def test_bad_rows_name_the_field_and_the_limit(row, field, limit):
    with pytest.raises(InvalidRequestError) as info:
        normalize_row(row, SamplingParams())
    assert info.value.field == field
    if limit is not None:
        assert limit in str(info.value)


def test_ids_and_seeds_are_stable_and_parameter_sensitive():
    a = stable_id("dog", {"duration": 2.0, "seed": None})
    assert a == stable_id("dog", {"seed": None, "duration": 2.0})
    assert a != stable_id("dog", {"duration": 3.0, "seed": None})
    assert seed_for(a) == seed_for(a) and 0 <= seed_for(a) < 2**63
    first = normalize_row({"prompt": "dog", "duration": 2.0}, SamplingParams())
    assert first == normalize_row({"prompt": "dog", "duration": 2.0}, SamplingParams())
    assert first["id"] != normalize_row({"prompt": "dog", "duration": 2.0}, SamplingParams(top_k=3))["id"]


@pytest.mark.parametrize("row_id", ["../../etc/passwd", "a/b", ".hidden", "x" * 300, "ok-id_1.0", "ünïcode id"])
def test_file_stems_cannot_escape_the_prefix(row_id):
    stem = file_stem(row_id)
    assert "/" not in stem and not stem.startswith(".") and len(stem) <= 113
    assert all(ch.isalnum() or ch in "._-" for ch in stem)
    if row_id == "ok-id_1.0":
        assert stem == row_id
    assert file_stem("a/b") != file_stem("a_b")  # changed ids get a hash suffix: no collisions


def test_normalize_table_turns_bad_rows_into_records():
    table = pa.table({"id": ["a", None, "c"], "prompt": ["dog", "cat", ""], "extra": [1, 2, 3]})
    planned = normalize_table(table, SamplingParams(), 1.0, first_row=10, source="m.parquet").to_pylist()
    assert [r["status"] for r in planned] == ["todo", "todo", "invalid"]
    assert [r["row"] for r in planned] == [10, 11, 12] and planned[1]["id"].startswith("r-")
    bad = planned[2]
    assert bad["id"] == "c" and bad["error_field"] == "prompt" and bad["error_type"] == "InvalidRow"
    assert '"prompt": ""' in bad["row_json"] and bad["prompt"] is None


def _plan(tmp_path, url, *, done=(), limit=None, rows_per_read=2):
    output = tmp_path / "out"
    if done:  # a committed part of an earlier run
        (output / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": sorted(done), "file": [f"{i}.wav" for i in sorted(done)]}),
                       output / "metadata" / "part-1.parquet")
        (output / "metadata" / "part-2.parquet.0123.tmp").write_bytes(b"an interrupted write")
    files = expand_inputs(url)
    check_manifest(files, url, {})
    blocks = list(plan_manifest(pa.table({"x": [0]}), files=files, url=url, storage_options={},
                                defaults=SamplingParams(), duration=3.0, output=str(output), limit=limit,
                                rows_per_read=rows_per_read))
    return pa.concat_tables(blocks).to_pylist()


def test_planner_numbers_rows_in_file_order_and_first_occurrence_wins(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    pq.write_table(pa.table({"id": ["x", None, "x", None], "prompt": ["dog", "cat", "bird", ""],
                             "duration": [1.0, None, 2.0, 1.0]}), manifests / "a.parquet")
    pq.write_table(pa.table({"id": ["y", "x"], "prompt": ["rain", "wind"], "duration": [1.5, 1.0]}),
                   manifests / "b.parquet")
    rows = _plan(tmp_path, str(manifests), done={"y"})
    assert [r["row"] for r in rows] == [0, 1, 2, 3, 5, None]  # row 4 is committed: folded into a count
    assert [r["status"] for r in rows] == ["todo", "todo", "invalid", "invalid", "invalid", "done"]
    assert rows[-1]["skipped"] == 1 and rows[-1]["id"] is None
    assert rows[1]["duration"] == 3.0 and rows[1]["id"].startswith("r-")
    assert rows[2]["error_type"] == "DuplicateId" and "row 0" in rows[2]["error"]
    assert rows[4]["id"] == "x" and rows[4]["source"].endswith("b.parquet") and "row 0" in rows[4]["error"]
    assert rows[3]["error_field"] == "prompt" and rows[3]["id"] == "row-3"
    assert [r["row"] for r in _plan(tmp_path, str(manifests), limit=3)] == [0, 1, 2]


def test_manifest_without_prompt_column_or_files_fails_clearly(tmp_path):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        check_manifest([str(tmp_path / "m.parquet")], str(tmp_path / "m.parquet"), {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_inputs(str(tmp_path / "missing"))
