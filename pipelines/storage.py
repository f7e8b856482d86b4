"""Object storage for the pipelines: one fsspec filesystem for local paths and `s3://` alike.

Writes are atomic where it matters for exactly-once bookkeeping: a local file is written to a temp name and
`os.replace`d, an S3 object is one PUT. So a reader never sees a partial audio file or metadata part, and a
retried task overwrites instead of duplicating.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from audiogen.io import atomic_write_local
from audiogen.options import option


@dataclass
class Storage:
    """A root URL (local directory or `s3://bucket/prefix`) plus the options fsspec needs to reach it."""

    root: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, path = fsspec.core.url_to_fs(self.root, **self.options)
        self.path = path.rstrip("/") or path
        self.local = isinstance(self.fs, LocalFileSystem)

    def url(self, *parts: str) -> str:
        """Full URL of a path under the root (for messages and metadata)."""
        path = self._full(posixpath.join(*parts)) if parts else self.path
        return path if self.local else self.fs.unstrip_protocol(path)

    def _full(self, relative: str) -> str:
        return posixpath.join(self.path, relative)

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Atomic write: temp file + fsync + os.replace locally (as `audiogen.io.write_audio` does), a single PUT on
        object stores."""
        if self.local:
            atomic_write_local(self._full(relative), data)
        else:
            self.fs.pipe_file(self._full(relative), data)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self._full(relative))

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Names (relative to `prefix`) of the objects directly under `prefix` ending with `suffix`."""
        directory = self._full(prefix)
        self.fs.invalidate_cache()
        if not self.fs.exists(directory):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(directory, detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and not n.endswith(".tmp"))

    def remove_prefix(self, prefix: str) -> None:
        directory = self._full(prefix)
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)

    def write_part(self, prefix: str, keys: list[str], table: pa.Table) -> str:
        """Write `table` as `prefix/<part_name(keys)>` (the keys of its rows); returns the part's name. A retried
        task writes the same rows under the same name: it overwrites its part instead of adding a copy."""
        from pipelines.job import part_name

        name = part_name(keys)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(posixpath.join(prefix, name), buffer.getvalue())
        return name

    def read_tables(self, prefix: str, columns: list[str] | None = None) -> pa.Table | None:
        """All `*.parquet` parts under `prefix` as one table (None when there are none)."""
        tables = [pq.read_table(self._full(posixpath.join(prefix, name)), columns=columns, filesystem=self.fs)
                  for name in self.list(prefix, ".parquet")]
        return pa.concat_tables(tables, promote_options="default") if tables else None


def arrow_filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem view of an fsspec URL (for Ray Data and pyarrow.dataset readers)."""
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def storage_options_field() -> Any:
    """A job's `storage_options` option (`--storage-option KEY=VALUE` on its command line), declared once."""
    return option(factory=dict, help="fsspec/s3fs option for s3:// paths (endpoint_url, anon ...); credentials "
                                     "also come from the usual AWS variables")
