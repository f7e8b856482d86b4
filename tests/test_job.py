"""Shared job mechanics: the node-local model cache under concurrent fetches, part names."""

import threading

import fsspec
import pytest

from pipelines.job import fetch_model, part_name


def test_part_names_depend_on_the_set_of_keys_only():
    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a"])
    assert part_name(["a"]).startswith("part-") and part_name(["a"]).endswith(".parquet")


def test_local_specs_pass_through(tmp_path):
    assert fetch_model(str(tmp_path), cache=tmp_path / "cache") == str(tmp_path)
    assert fetch_model("tiny:3", cache=tmp_path / "cache") == "tiny:3"
    assert not (tmp_path / "cache").exists()


def test_concurrent_fetches_download_once_into_a_complete_directory(s3_bucket, tmp_path, monkeypatch):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    files = {"config.json": b"{}", "weights/lm.safetensors": b"x" * 200_000, "weights/codec.bin": b"y" * 1000}
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/models/m1/{name}", data)
    downloads = []
    url_to_fs = fsspec.core.url_to_fs

    def counting(*args, **kwargs):
        downloads.append(args[0])
        return url_to_fs(*args, **kwargs)

    monkeypatch.setattr(fsspec.core, "url_to_fs", counting)
    cache = tmp_path / "cache"
    results, errors = [], []

    def fetch():
        try:  # the moto endpoint is only reachable through the storage options
            results.append(fetch_model(f"s3://{bucket}/models/m1", options, cache=cache))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(results) == 6 and len(set(results)) == 1
    assert len(downloads) == 1, "one download, the other fetches wait for it and reuse it"
    target = results[0]
    for name, data in files.items():
        assert open(f"{target}/{name}", "rb").read() == data
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.rsplit("/", 1)[-1]]


def test_a_missing_or_failed_download_leaves_nothing_behind(s3_bucket, tmp_path, monkeypatch):
    bucket, options = s3_bucket
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch_model(f"s3://{bucket}/models/missing", options, cache=cache)

    class BreaksMidway:
        def isdir(self, path):
            return True

        def get(self, source, destination, recursive):
            open(destination + "config.json", "w").close()
            raise OSError("connection lost")

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **options: (BreaksMidway(), url))
    with pytest.raises(OSError, match="connection lost"):
        fetch_model(f"s3://{bucket}/models/m2", options, cache=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
