"""Helpers the command line's modules share (:mod:`stepsal.cli` and :mod:`stepsal.cli_studies`).

Torch-free at import: ``stepsal --help`` imports this module.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .errors import StepsalError
from .sentences import too_few_steps
from .tasks.problems import example_trace_text


class CliError(StepsalError):
    """A problem the user can fix, printed as one line."""


def check_out(folder: str) -> Path:
    """Refuse, before any long work, an output folder that cannot be created or written; creates
    nothing (a refused command leaves no folder behind; :func:`make_out` creates it)."""
    out = Path(folder)
    existing = next(path for path in (out.absolute(), *out.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise CliError(f"--out {out} is not a writable folder ({existing} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"--out {out} is not a writable folder (no permission to write in {existing}).")
    return out


def make_out(out: Path) -> Path:
    """Create the output folder :func:`check_out` accepted, just before the first file is written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"--out {out} is not a writable folder ({error.strerror or error}).") from None
    return out


def parse_layers(text: str | None) -> list[int] | None:
    """'0,1,2' -> [0, 1, 2]; 'off' -> []; None -> None (the paper's band)."""
    if text is None:
        return None
    if text.strip().lower() == "off":
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"layers must look like '0,1,2' or 'off'; got {text!r}.") from None


def load_for_cli(args: argparse.Namespace):
    import torch  # lazy: keeps --help torch-free

    from . import load_model  # lazy: keeps --help torch-free

    started = time.perf_counter()
    from .embedded import EMBEDDED  # lazy: keeps --help torch-free

    if args.model.lower() not in EMBEDDED and not Path(args.model).is_dir():
        raise CliError(f"--model {args.model!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a folder "
                       "saved with save_pretrained.")
    model = load_model(args.model, backend=args.backend, device=args.device, dtype=getattr(torch, args.dtype))
    print(f"model {args.model} ({type(model).__name__}, {model.cfg.n_layers} layers, "
          f"{model.cfg.n_heads} heads) loaded in {time.perf_counter() - started:.1f} s")
    return model


def read_trace_text(args: argparse.Namespace) -> str:
    if args.example == bool(args.trace):
        raise CliError("pass either --example or --trace FILE.")
    if args.example:
        return example_trace_text()
    path = Path(args.trace)
    if path.is_dir():
        raise CliError(f"--trace {path} is a folder; pass the text file that holds the trace.")
    if not path.exists():
        raise CliError(f"--trace {path}: no such file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"--trace {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at {error.start}); "
                       "save the trace as UTF-8.") from None


def check_trace_text(text: str, fmt: str, min_steps: int, target: str = "all", answer: str | None = None) -> None:
    """Markers, thinking steps and the answer target, from the text alone (before the model loads)."""
    from .traces import THINKING, segment_text  # lazy: keeps --help torch-free

    if target == "answer" and not answer:
        raise CliError("--target answer needs --answer TEXT (the answer as written in the summary).")
    segmentation = segment_text(text, fmt)
    summary = segmentation.markers[1]
    if target == "answer" and (summary is None or answer is None or answer not in text[summary[1]:]):
        raise CliError(f"--answer {answer!r} does not occur in the trace's summary; pass the answer as written there.")
    n_thinking = segmentation.step_segments.count(THINKING)
    if n_thinking < min_steps:
        raise CliError(too_few_steps(n_thinking, f"--min-steps {min_steps}", "--min-steps"))
