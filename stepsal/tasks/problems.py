"""Word problems for evaluation: the set shipped with stepsal, and the user's own in the same JSONL form.

A problem file has one JSON object per line with ``id``, ``question`` and an integer or text
``answer`` (``steps`` optional). The shipped set (``stepsal/data/problems.jsonl``, 200 problems) is
drawn from :mod:`stepsal.tasks.arithmetic` in its *held-out* phrasings only, so the small reasoner
never saw its wording in training; it is part of stepsal (Apache-2.0), written for this project.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import StepsalError
from ..options import is_whole
from .arithmetic import R1_INSTRUCTION, make_problems

SHIPPED = Path(__file__).parent.parent / "data" / "problems.jsonl"
SHIPPED_SEED = 2026  # make_problems(200, seed=SHIPPED_SEED, phrasing="heldout") wrote the shipped file
EXAMPLE_TRACE = Path(__file__).parent.parent / "data" / "example_trace.txt"


def example_trace_text() -> str:
    """The example trace shipped with stepsal (SmolLM2's chat template, ``think`` format): a question,
    a few thinking sentences and a summary, for trying things without generating."""
    return EXAMPLE_TRACE.read_text(encoding="utf-8")


@dataclass(frozen=True)
class WordProblem:
    """A question with its gold answer; ``messages()`` is the R1-style user turn."""

    id: str
    question: str
    answer: int | str
    n_steps: int | None = None

    def __post_init__(self) -> None:
        check_problem_id(self.id, "WordProblem")
        if not isinstance(self.question, str) or not self.question.strip():
            raise StepsalError(f"problem {self.id!r}: the question must be non-empty text; got {self.question!r}.")
        if isinstance(self.answer, bool) or not isinstance(self.answer, (int, float, str)):
            raise StepsalError(f"problem {self.id!r}: the answer must be a number or text; got {self.answer!r}.")
        if self.n_steps is not None and not (is_whole(self.n_steps) and self.n_steps >= 0):
            raise StepsalError(f"problem {self.id!r}: steps must be a whole number or absent; got {self.n_steps!r}.")

    def prompt(self) -> str:
        return f"{self.question}\n{R1_INSTRUCTION}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt()}]


def check_problem_id(problem_id: str, where: str) -> str:
    """``problem_id`` if it is safe as part of a file name (studies name files after it), else an
    error naming it and ``where`` it came from: no path separator, '..', NUL, absolute path or empty id."""
    bad = ("it is empty" if not problem_id.strip() else
           "it contains a path separator" if "/" in problem_id or "\\" in problem_id else
           "it contains '..'" if ".." in problem_id else
           "it contains a NUL character" if "\0" in problem_id else
           "it is an absolute path" if PurePosixPath(problem_id).is_absolute() or PureWindowsPath(problem_id).drive
           else None)  # 'C:x' names a drive though it has no separator
    if bad is not None:
        raise StepsalError(f"{where}: problem id {problem_id!r} is not usable in file names ({bad}); "
                           "use ids of letters, digits, '-', '_' and single dots, e.g. 'gsm-001'.")
    return problem_id


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[WordProblem]:
    """Problems from a JSONL file (default: the shipped set), the first ``limit`` of them.

    Ids become file names in studies: ids with a path separator, '..', a NUL, an absolute path or
    an empty id are refused, as is a negative ``limit``."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise StepsalError(f"limit must be a whole number >= 0 (or None for all problems); got {limit!r}.")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise StepsalError(f"path must be the problems file's path (or None for the shipped set); got {path!r}.")
    path = Path(path) if path is not None else SHIPPED
    if path.is_dir():
        raise StepsalError(f"{path} is a folder; pass the problems file (JSON lines of id, question, answer).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise StepsalError(f"{path}:{line}: not UTF-8 text (byte {error.object[error.start]:#04x}); save the problems "
                           "file as UTF-8 JSON lines.") from None
    problems, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem_id, question, answer, steps = str(row["id"]), row["question"], row["answer"], row.get("steps")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise StepsalError(f"{path}:{number}: each line needs a JSON object with 'id', 'question' and "
                               f"'answer' ({error.__class__.__name__}: {error}).") from None
        check_problem_id(problem_id, f"{path}:{number}")
        try:
            problem = WordProblem(problem_id, question, answer, steps)
        except StepsalError as error:
            raise StepsalError(f"{path}:{number}: {error}") from None
        if problem.id in seen:
            raise StepsalError(f"{path}:{number}: problem id {problem.id!r} appears twice; ids must be unique.")
        seen.add(problem.id)
        problems.append(problem)
    if not problems:
        raise StepsalError(f"{path} holds no problems; each line needs a JSON object with 'id', 'question' and "
                           "'answer'.")
    return problems[:limit] if limit is not None else problems


def write_shipped(path: Path = SHIPPED, count: int = 200) -> None:
    """(Re)write the shipped set from the generator (what produced the file in the package)."""
    rows = [{"id": f"gsm-{i:03d}", "question": p.question, "answer": p.answer, "steps": p.n_steps}
            for i, p in enumerate(make_problems(count, seed=SHIPPED_SEED, phrasing="heldout"))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
