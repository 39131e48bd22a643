"""Word problems for evaluation: the set shipped with stepsal, and the user's own in the same JSONL form.

A problem file has one JSON object per line with ``id``, ``question`` and an integer or text
``answer`` (``steps`` optional). The shipped set (``stepsal/data/problems.jsonl``, 200 problems) is
drawn from :mod:`stepsal.tasks.arithmetic` in its *held-out* phrasings only, so the small reasoner
never saw its wording in training; it is part of stepsal (Apache-2.0), written for this project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import StepsalError
from .arithmetic import R1_INSTRUCTION, make_problems

SHIPPED = Path(__file__).parent.parent / "data" / "problems.jsonl"
SHIPPED_SEED = 2026  # make_problems(200, seed=SHIPPED_SEED, phrasing="heldout") wrote the shipped file


@dataclass(frozen=True)
class WordProblem:
    """A question with its gold answer; ``messages()`` is the R1-style user turn."""

    id: str
    question: str
    answer: int | str
    n_steps: int | None = None

    def prompt(self) -> str:
        return f"{self.question}\n{R1_INSTRUCTION}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt()}]


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[WordProblem]:
    """Problems from a JSONL file (default: the shipped set), the first ``limit`` of them."""
    path = Path(path) if path is not None else SHIPPED
    problems, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = WordProblem(str(row["id"]), row["question"], row["answer"], row.get("steps"))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise StepsalError(f"{path}:{number}: each line needs a JSON object with 'id', 'question' and "
                               f"'answer' ({error.__class__.__name__}: {error}).") from None
        if problem.id in seen:
            raise StepsalError(f"{path}:{number}: problem id {problem.id!r} appears twice; ids must be unique.")
        seen.add(problem.id)
        problems.append(problem)
    return problems[:limit] if limit is not None else problems


def write_shipped(path: Path = SHIPPED, count: int = 200) -> None:
    """(Re)write the shipped set from the generator (what produced the file in the package)."""
    rows = [{"id": f"gsm-{i:03d}", "question": p.question, "answer": p.answer, "steps": p.n_steps}
            for i, p in enumerate(make_problems(count, seed=SHIPPED_SEED, phrasing="heldout"))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
