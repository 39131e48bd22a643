"""Saving results as strict JSON (pandas frames with their dtypes, plain numbers): the formats behind
the results' ``save`` / ``load``, next to safetensors for tensors. No dependency beyond pandas.

:func:`writer_lock` keeps two processes from writing one output file or folder at once.

Non-finite numbers are no JSON: NaN is written as null, +-inf as the strings "inf" / "-inf"; a frame's
float columns (and :func:`floats`) turn both back into numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas

from .errors import DamagedFileError, OutputBusyError, ResultsNotFoundError, StepsalError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


def plain(value: Any) -> Any:
    """A JSON-ready copy: numpy scalars and arrays (and tensors) as Python values and lists, tuples
    as lists, NaN as None, +-inf as "inf" / "-inf"."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain(value.tolist())
    return value


def floats(value: Any) -> Any:
    """The inverse of :func:`plain` on numbers: None as NaN, "inf" / "-inf" as floats, nested lists kept."""
    if isinstance(value, list):
        return [floats(item) for item in value]
    return float("nan") if value is None else float(value)


def frame_to_json(frame: pandas.DataFrame) -> dict[str, Any]:
    """A frame as columns, dtypes and rows (the index is not kept)."""
    return {"columns": [str(column) for column in frame.columns], "dtypes": [str(dtype) for dtype in frame.dtypes],
            "rows": [plain(list(row)) for row in frame.itertuples(index=False, name=None)]}


def frame_from_json(data: dict[str, Any]) -> pandas.DataFrame:
    """The frame :func:`frame_to_json` wrote, with its dtypes."""
    frame = pandas.DataFrame(data["rows"], columns=data["columns"])
    for column, dtype in zip(data["columns"], data["dtypes"], strict=True):
        if str(frame[column].dtype) != dtype:
            frame[column] = frame[column].astype(dtype)
    return frame


def write_json(path: str | os.PathLike, kind: str, data: dict[str, Any]) -> Path:
    """``{"stepsal": kind, ...data}`` as strict JSON at ``path`` (whole or not at all: :func:`written_whole`)."""
    path = file_to_write(path)
    text = json.dumps({"stepsal": kind, **plain(data)}, allow_nan=False, indent=1)
    with written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A file beside ``path`` for the block to write, moved onto ``path`` when the block succeeds: a
    reader (another shard, a resumed run) never finds half a file, and a kill leaves the old one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """What :func:`write_json` wrote for a result of ``kind``; an error naming the kind found otherwise."""
    with reading(path, kind):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    found = data.get("stepsal") if isinstance(data, dict) else None
    if found != kind:
        raise StepsalError(f"{path} holds {'a ' + repr(found) if found else 'no stepsal result'}, not a saved {kind}.")
    return data


def file_to_write(path: str | os.PathLike) -> Path:
    """``path`` as a Path, refused when it is a folder or its folder does not exist."""
    path = Path(path)
    if path.is_dir():
        raise StepsalError(f"{path} is a folder; pass a file path to save to, like {path / 'result'}.")
    if not path.parent.is_dir():
        raise StepsalError(f"{path}: its folder {path.parent} does not exist; create it first.")
    return path


@contextmanager
def reading(path: str | os.PathLike, kind: str) -> Iterator[None]:
    """Any error while the block reads a saved ``kind`` from ``path`` (bad JSON or bytes, a missing key,
    a wrong shape) as one :class:`DamagedFileError` naming the file; a missing file stays a
    FileNotFoundError, an error already naming its file passes through."""
    if Path(path).is_dir():
        raise ResultsNotFoundError(f"{path} is a folder; pass the saved {kind} file in it.")
    if not Path(path).exists():
        raise ResultsNotFoundError(f"{path}: no such file (a saved {kind}).")
    try:
        yield
    except (OSError, DamagedFileError):
        raise
    except Exception as error:
        said = " ".join(str(error).split())[:200].rstrip(".")
        reason = f"missing key {said}" if isinstance(error, KeyError) else said
        raise DamagedFileError(f"{path} is no readable saved {kind} ({reason}): it is damaged, or was not written "
                               f"by {kind}.save; save it again.") from error


@contextmanager
def writer_lock(path: str | os.PathLike, fix: str, *, shared: bool = False) -> Iterator[None]:
    """An exclusive lock on ``path`` (a folder, or a file, created if missing) while the block runs;
    ``shared=True``: a lock that other shared holders may hold too, and an exclusive one may not.

    Held by another process, or by another open call in this one: :class:`OutputBusyError` naming
    ``path`` and ``fix``. The operating system releases it when the process ends, so a killed run
    leaves no stale lock. Where there is no ``flock`` (Windows) nothing is locked."""
    path = Path(path)
    descriptor = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputBusyError(f"another process is writing {path}: wait for it to finish, or {fix}.") from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock
