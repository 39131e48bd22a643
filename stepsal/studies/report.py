"""A study's report: every saved Step-Saliency result under a folder on one offline page, with the
comparison of two groups of them first. Loading and comparing happen here; the page is drawn by
:mod:`stepsal.vis.report`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from safetensors import safe_open

from ..errors import DamagedFileError, ResultsNotFoundError, StepsalWarning
from ..metrics import compare_groups
from ..saliency import StepSaliency
from ..storage import reading
from ..vis.report import comparison_section, skipped_note, write_report
from .agreement import AgreementSummary

__all__ = ["report_from_folder", "write_report"]


def report_from_folder(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       max_sections: int | None = 20) -> Path:
    """One page from every saved result (``*.safetensors``) under ``folder``; two subfolders of
    results are compared as groups first (per-trace measures with CIs, per-layer curves), then all
    results are listed, with full sections for the first ``max_sections`` (None: all)."""
    root = Path(folder)
    files, others, damaged = [], [], []
    for path in sorted(root.rglob("*.safetensors")):
        try:
            with reading(path, "StepSaliency"), safe_open(str(path), framework="pt") as handle:
                (files if "stepsal" in (handle.metadata() or {}) else others).append(path)
        except DamagedFileError as error:
            damaged.append((path, error))
    results = []
    for path in list(files):
        try:
            results.append(StepSaliency.load(path))
        except DamagedFileError as error:
            files.remove(path)
            damaged.append((path, error))
    if damaged:
        warnings.warn(f"the report leaves out {len(damaged)} damaged file{'s' if len(damaged) > 1 else ''}: "
                      + "; ".join(str(error) for _, error in damaged[:3]), StepsalWarning, stacklevel=2)
    if not files:
        raise ResultsNotFoundError(f"no saved Step-Saliency results under {root} ({len(others)} other .safetensors "
                                   f"files, {len(damaged)} damaged); save results with result.save(path).")
    names = [str(f.relative_to(root)) for f in files]
    groups: dict[str, list[StepSaliency]] = {}
    for f, r in zip(files, results, strict=True):
        groups.setdefault(str(f.parent.relative_to(root)), []).append(r)
    extra = []
    if len(groups) == 2 and all(len(g) >= 2 for g in groups.values()):
        (label_a, a), (label_b, b) = sorted(groups.items())
        comparison = compare_groups(a, b, labels=(label_a, label_b))
        fig = comparison.plot() if comparison.layer_mean else None
        extra.append(comparison_section(f"{label_a} vs {label_b}", repr(comparison), comparison.to_dataframe(), fig))
    if (root / "agreement.json").exists():
        agreement = AgreementSummary.load(root / "agreement.json")
        extra.append(comparison_section("Does Step-Saliency point at what matters?", repr(agreement) + ": rank "
                                        "agreement of each step's saliency with its suppression (and resampling) "
                                        "importance", agreement.frame, agreement.plot()))
    if others:
        extra.append(skipped_note([str(p.relative_to(root)) for p in others]))
    if damaged:
        extra.append(skipped_note([str(p.relative_to(root)) for p, _ in damaged], "that are damaged (see the warning)"))
    return write_report(out_dir or root, results, names, title=f"Step-Saliency study: {root.name}",
                        extra_sections=extra, max_sections=max_sections)
