"""Rows as memory-mapped Arrow tables: written once per content key, read by every rank and every later job.

A large task (Yelp-2: 560,000 reviews; MNLI, QQP: ~390,000 rows) never becomes a Python list here. Its rows are
written batch by batch (`RowWriter`) into an Arrow stream file under the cache (`pipeline.cache`), named by a key
that covers everything the rows depend on, and opened as a `datasets.Dataset` whose pages are mapped from that file
(`open_table`): a process holds the pages it touches, not the split. Subsets are index mappings over the same file
(`take`, `head`: `Dataset.select` with the indices kept in memory, 8 bytes a row), never copies.

Writing is once per key: `build_once` takes an exclusive file lock, builds into a temporary file and renames it into
place, so ranks and concurrent jobs that want the same file wait for the first builder and then read its result
(the key-named file's existence is the completion marker). A table's `datasets` fingerprint is its content key
(stored in the file's metadata, so `Dataset.from_file` reads it back), and a subset's fingerprint is derived from
its parent's and the indices: the tokenization cache keys on it (`pipeline.data`), not on the text.

Writing needs only pyarrow; `open_table` imports `datasets`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

BATCH_ROWS = 1000  # rows per Arrow record batch: the most a writer holds at once
TABLE_VERSION = 1  # bump when what is written for a key changes


def digest(*parts) -> str:
    """A short stable hex digest of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:24]


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks; remembered per path, size and modification time)."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def cache_dir(kind: str) -> Path:
    from pipeline.cache import cache_root

    folder = cache_root() / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------- identities


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """A digest of the tasks package's source: any change to how rows are read or rendered makes new keys."""
    folder = Path(__file__).resolve().parent
    sha = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        sha.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def _code_digest(code) -> str:
    parts = [code.co_code]
    for const in code.co_consts:
        parts.append(_code_digest(const).encode() if inspect.iscode(const) else repr(const).encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def stable(value, depth: int = 0):
    """A JSON-able description of a value that is the same in every process: functions by name, code and captured
    values (never by address), dataclasses by their fields."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 6:
        return f"<{type(value).__qualname__}>"
    nested = functools.partial(stable, depth=depth + 1)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [nested(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(k): nested(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "type": type(value).__qualname__,
            **{f.name: nested(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, functools.partial):
        return {"partial": nested(value.func), "args": nested(value.args), "keywords": nested(value.keywords)}
    if inspect.ismethod(value):
        return {"method": nested(value.__func__), "self": nested(value.__self__)}
    if inspect.isfunction(value):
        cells = [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)]
        return {
            "function": f"{value.__module__}.{value.__qualname__}",
            "code": _code_digest(value.__code__),
            "closure": nested(cells),
            "defaults": nested(value.__defaults__),
            "kwdefaults": nested(value.__kwdefaults__),
        }
    if isinstance(value, type) or inspect.isbuiltin(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    if hasattr(value, "__dict__"):
        return {"type": f"{type(value).__module__}.{type(value).__qualname__}", "state": nested(vars(value))}
    text = repr(value)
    return {"type": type(value).__qualname__, "repr": None if " at 0x" in text else text}


def _filled(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell (a closure variable not assigned yet)
        return False
    return True


def task_identity(task) -> str:
    """What a task's rendering depends on: every field of the task (functions by code and captured values) and the
    tasks package's source."""
    fields = {f.name: stable(getattr(task, f.name)) for f in dataclasses.fields(task) if f.name != "generate"}
    return digest(TABLE_VERSION, code_identity(), fields)


# ----------------------------------------------------------------------------------------------- writing


@contextmanager
def _locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(path: Path, build: Callable[[Path], None]) -> bool:
    """`build(path)` unless `path` exists, under an exclusive lock so that concurrent processes build it once (the
    others wait, then find it). `build` must create `path` atomically. True when it was built by this call."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        if path.exists():
            return False
        build(path)
        if not path.exists():
            raise PipelineError(f"building {path} left no file: report this as a bug")
        return True


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


class RowWriter:
    """Writes dict rows to an Arrow stream file batch by batch; `commit()` renames it into place, leaving the
    context without committing deletes it. `columns` are the file's columns in order (a missing value is null);
    `types` fixes some of their Arrow types, the others are inferred from the first batch. A column whose later
    values do not fit the inferred type (ids that mix numbers and text) is stored as text for the whole file."""

    def __init__(self, path: Path, fingerprint: str, columns: Sequence[str], types: dict | None = None):
        import pyarrow as pa

        self._pa = pa
        self.path, self.fingerprint, self.columns = Path(path), fingerprint, list(columns)
        self.types = dict(types or {})
        self.rows = 0
        self._buffer: list[dict] = []
        self._schema = None
        self._writer = None
        self._sink = None
        self._serial = 0
        self._tmp = self._next_tmp()

    def _next_tmp(self) -> Path:
        self._serial += 1
        return self.path.with_name(f".{self.path.name}.{os.getpid()}.{self._serial}.tmp")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self.abort()

    def add(self, row: dict) -> None:
        extra = [key for key in row if key not in self.columns]
        if extra:
            raise PipelineError(f"row has column(s) {', '.join(extra)} outside {', '.join(self.columns)}")
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= BATCH_ROWS:
            self._flush()

    def _open(self, schema) -> None:
        pa = self._pa
        self._schema = schema.with_metadata({"huggingface": json.dumps({"fingerprint": self.fingerprint})})
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._schema)

    def _arrays(self, rows: list[dict]) -> dict:
        return {name: [row.get(name) for row in rows] for name in self.columns}

    def _flush(self) -> None:
        if not self._buffer:
            return
        pa = self._pa
        values = self._arrays(self._buffer)
        self._buffer = []
        if self._schema is None:
            fields = []
            for name in self.columns:
                array = pa.array(values[name], type=self.types.get(name))
                if pa.types.is_null(array.type):
                    array = pa.array(values[name], type=pa.string())  # all null so far: text
                fields.append(pa.field(name, array.type))
            self._open(pa.schema(fields))
        arrays = []
        for field in list(self._schema):
            try:
                arrays.append(pa.array(values[field.name], type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                if pa.types.is_string(field.type) or field.name in self.types:
                    raise PipelineError(
                        f"column {field.name!r} of {self.path.name} holds values of several "
                        "types that cannot be stored together: check the data"
                    ) from None
                self._as_text(field.name)
                arrays.append(pa.array(_texts(values[field.name]), type=pa.string()))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        self._writer.write_batch(batch)

    def _as_text(self, name: str) -> None:
        """Rewrite the batches written so far with column `name` as text, and continue with that schema."""
        pa = self._pa
        self._writer.close()
        self._sink.close()
        old = self._tmp
        index = self._schema.get_field_index(name)
        schema = self._schema.set(index, pa.field(name, pa.string()))
        self._tmp = self._next_tmp()
        self._open(schema.remove_metadata())
        with pa.memory_map(str(old)) as source:
            for batch in pa.ipc.open_stream(source):
                arrays = list(batch.columns)
                arrays[index] = pa.array(_texts(arrays[index].to_pylist()), type=pa.string())
                self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema))
        old.unlink()

    def commit(self) -> int:
        """Write what is buffered, close the file and rename it into place; returns the number of rows."""
        self._flush()
        if self._writer is None:  # no rows: an empty table with the declared columns
            pa = self._pa
            self._open(pa.schema([pa.field(n, self.types.get(n, pa.string())) for n in self.columns]))
        self._writer.close()
        self._sink.close()
        os.replace(self._tmp, self.path)
        self._writer = None
        return self.rows

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            except Exception:  # noqa: BLE001  (closing a half-written file: the file goes anyway)
                pass
        self._tmp.unlink(missing_ok=True)
        self._writer = None


def _texts(values: list) -> list:
    return [None if v is None else str(v) for v in values]


# ----------------------------------------------------------------------------------------------- reading


def open_table(path: Path):
    """The Arrow file at `path` as a memory-mapped `datasets.Dataset` (its fingerprint: the file's content key)."""
    import datasets

    return datasets.Dataset.from_file(str(path))


def is_table(rows) -> bool:
    """True for a `datasets.Dataset` (anything but a list or tuple of row dicts)."""
    return not isinstance(rows, (list, tuple))


def fingerprint_of(rows) -> str:
    """The content key of a table (a list: of its JSON text)."""
    return rows._fingerprint if is_table(rows) else digest(rows)


def take(rows, indices: Iterable[int]):
    """The rows at `indices`, in that order: a list from a list; from a table, an index mapping over the same file
    whose fingerprint is derived from the parent's and the indices."""
    if not is_table(rows):
        return [rows[i] for i in indices]
    if not isinstance(indices, range):
        indices = list(indices)
    return rows.select(indices, keep_in_memory=True, new_fingerprint=_derived(rows._fingerprint, indices))


def head(rows, n: int):
    """The first `n` rows (all of them when there are fewer)."""
    return rows[:n] if not is_table(rows) else take(rows, range(min(n, len(rows))))


def column(rows, name: str) -> list:
    """One column's values, in row order."""
    if not is_table(rows):
        return [row[name] for row in rows]
    return rows.with_format("arrow")[name].to_pylist()


def as_list(rows) -> list[dict]:
    return list(rows) if not is_table(rows) else rows.to_list()


def _derived(parent: str, indices) -> str:
    import numpy

    if isinstance(indices, range):
        part = f"range({indices.start},{indices.stop},{indices.step})"
    else:
        part = hashlib.sha256(numpy.asarray(indices, dtype=numpy.int64).tobytes()).hexdigest()[:24]
    return hashlib.sha256(f"{parent}|take|{part}".encode()).hexdigest()[:16]
