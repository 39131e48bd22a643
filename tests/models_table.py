"""docs/models.md's table: read it, and rewrite the rows of the installed TransformerLens.

Run ``python tests/models_table.py`` on each stack (``make models-table`` does both); the test
``test_architectures.py`` fails whenever the table and what the probes find disagree.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"
START, END = "<!-- table: start -->", "<!-- table: end -->"
HEAD = ("architecture", "reasoning models", "stack", "backend")


def read_rows(text: str | None = None) -> dict[tuple[str, str, str], dict[str, str]]:
    """(architecture, stack, backend) -> the capability cells."""
    from arch_probe import COLUMNS

    text = DOC.read_text() if text is None else text
    body = text[text.index(START) + len(START):text.index(END)].strip().splitlines()[2:]
    rows = {}
    for line in body:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        arch, _, stack, backend, *values = cells
        rows[(arch.strip("`"), stack, backend)] = dict(zip(COLUMNS, values, strict=False))
    return rows


def render(rows: dict[tuple[str, str, str], dict[str, str]]) -> str:
    from arch_probe import COLUMNS
    from archs import ARCHITECTURES

    order = {arch.name: i for i, arch in enumerate(ARCHITECTURES)}
    users = {arch.name: arch.users for arch in ARCHITECTURES}
    lines = ["| " + " | ".join(HEAD + COLUMNS) + " |", "|" + "---|" * (len(HEAD) + len(COLUMNS))]
    for arch, stack, backend in sorted(rows, key=lambda key: (order.get(key[0], 99), key[1], key[2] != "hooked")):
        cells = [f"`{arch}`", users.get(arch, ""), stack, backend] + [rows[(arch, stack, backend)][c] for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from arch_probe import probe, stack
    from archs import ARCHITECTURES
    from tiny import make_tokenizer

    from stepsal.models import hooked_transformer_class

    backends = ("hooked", "bridge") if hooked_transformer_class() else ("bridge",)
    text = DOC.read_text()
    rows = {key: value for key, value in read_rows(text).items() if key[1] != stack()}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(folder)
        for arch in ARCHITECTURES:
            for backend in backends:
                rows[(arch.name, stack(), backend)] = probe(arch.name, backend, tokenizer)
                print(arch.name, backend, rows[(arch.name, stack(), backend)], flush=True)
    before, after = text[:text.index(START) + len(START)], text[text.index(END):]
    DOC.write_text(before + "\n" + render(rows) + "\n" + after)


if __name__ == "__main__":
    main()
