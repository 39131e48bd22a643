"""Resumable JSON-lines files of result rows (evaluation samples, rollouts): one row per line, keyed
by some of its fields. A line that is no row (damaged, cut by a stopped run, not UTF-8, keys missing)
is never dropped silently: reading warns or refuses naming it, and the run that appends to the file
first moves such lines aside to ``<file>.damaged`` (their rows are then redone).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import DamagedFileError, StepsalWarning

BadRows = Literal["warn", "raise"]


@dataclass(frozen=True)
class RowKind:
    """What a file's rows are: their name, the fields that key them, the command that writes them and
    how to read on without the damaged ones."""

    what: str
    keys: tuple[str, ...]
    writer: str
    skip_hint: str


def differing_setting(recorded: dict[str, Any], wanted: dict[str, Any], ignored: Sequence[str] = ()) -> str | None:
    """The first setting (the wanted ones first, then those only recorded) whose value differs between
    a row's recorded settings and a run's, leaving out ``ignored``; None when all agree."""
    keys = sorted(set(recorded) | set(wanted), key=lambda key: (key not in wanted, key))
    return next((key for key in keys if key not in ignored and recorded.get(key) != wanted.get(key)), None)


def parse_row(line: bytes, kind: RowKind) -> dict | None:
    """A line's row; None for a line that is none (damaged, cut, not UTF-8, keys missing)."""
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return row if isinstance(row, dict) and all(key in row for key in kind.keys) else None


def read_rows(path: Path, kind: RowKind, bad_rows: BadRows = "warn") -> list[dict]:
    """The rows of one JSON-lines file. Lines that are no row are left out with a
    :class:`StepsalWarning` naming the file, the line numbers and their count (``bad_rows="warn"``),
    or refused (``"raise"``: :class:`DamagedFileError`)."""
    if not path.exists():
        return []
    rows, bad = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            row = parse_row(line, kind)
            if row is None:
                bad.append(number)
            else:
                rows.append(row)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        message = (f"{path}: {len(bad)} line{'s' if len(bad) > 1 else ''} ({shown}) {'are' if len(bad) > 1 else 'is'} "
                   f"no {kind.what} row, so those {kind.what}s are missing. Rerun the {kind.writer} that wrote the "
                   f"file (same settings and --out) to redo them: it moves such lines to {path.name}.damaged")
        if bad_rows == "raise":
            raise DamagedFileError(f"{message}; or read on without them: {kind.skip_hint}.")
        warnings.warn(message + ".", StepsalWarning, stacklevel=3)
    return rows


def set_aside_damaged_lines(path: Path, kind: RowKind) -> None:
    """Before a run appends to its own file: a last line cut by a stopped run is dropped, other lines
    that are no row move to ``<file>.damaged`` (with a warning); their rows are redone."""
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if lines and parse_row(lines[-1], kind) is None and not lines[-1].endswith(b"\n"):
        lines.pop()  # cut mid-write by a stopped run
    damaged = [i for i, line in enumerate(lines) if line.strip() and parse_row(line, kind) is None]
    if damaged:
        aside = path.with_name(path.name + ".damaged")
        with aside.open("ab") as sink:
            sink.write(b"".join(lines[i].rstrip(b"\r\n") + b"\n" for i in damaged))
        warnings.warn(f"{path}: moved {len(damaged)} damaged line{'s' if len(damaged) > 1 else ''} "
                      f"({', '.join(str(i + 1) for i in damaged[:10])}{', ...' if len(damaged) > 10 else ''}) "
                      f"to {aside}; their {kind.what}s are redone.", StepsalWarning, stacklevel=4)
    kept = [line if line.endswith(b"\n") else line + b"\n" for i, line in enumerate(lines) if i not in damaged]
    if b"".join(kept) != data:
        with path.open("r+b") as handle:  # in place: the lock this run holds stays on this file
            handle.write(b"".join(kept))
            handle.truncate()
