"""Helpers the command line's modules share (:mod:`stepsal.cli` and :mod:`stepsal.cli_studies`).

Torch-free at import: ``stepsal --help`` imports this module.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .errors import StepsalError


class CliError(StepsalError):
    """A problem the user can fix, printed as one line."""


def prepare_out(folder: str) -> Path:
    """Create the output folder and prove it writable before any long work."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".stepsal-write-test"
        probe.write_text("")
        probe.unlink()
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
