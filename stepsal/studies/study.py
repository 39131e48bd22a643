"""Correct-vs-wrong studies: generate traces, label them, compute Step-Saliency, compare the groups.

``run_study(model, problems, out=folder)``:

1. answers every problem (greedy and/or ``k`` samples) through :func:`evaluate` (``folder/samples/``,
   resumable, the exact token ids kept);
2. segments each answer that closed its thinking into a trace (others are counted, not studied)
   and saves its Step-Saliency under ``folder/correct/`` or ``folder/wrong/`` (files already there
   are reused: resumable);
3. compares the groups per measure and per layer (:func:`stepsal.compare_groups`; descriptive only
   under 10 traces a group) and writes ``folder/report.html`` and ``folder/study.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..errors import DamagedFileError, StepsalError, StepsalWarning
from ..metrics import TRACE_MEASURES, GroupComparison, compare_groups
from ..model_types import Model, TLModel
from ..options import SaliencyOptions
from ..saliency import StepSaliency, step_saliency
from ..storage import read_json, reading, write_json, writer_lock
from ..traces import Trace
from ..vis.figures import plot_group_points
from ..vis.html import frames_html
from ..vis.tables import records_frame
from .agreement import AgreementSummary, agreement_over, step_agreement
from .evaluate import R1_SAMPLING, EvalResult, evaluate
from .report import report_from_folder
from .suppression import SuppressionMatrix, suppression_matrix

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

STUDY_FILE = "study_result.json"  # StudyResult.save's manifest
POINT_MEASURES = ("lock_in", "question_share", "summary_thinking", "recency")  # StudyResult.plot


@dataclass(kw_only=True)
class StudyResult:
    """What a study produced: the samples, the saliency results per group and their comparison."""

    samples: EvalResult
    groups: dict[str, list[Any]]  # "correct" / "wrong" -> StepSaliency results
    skipped: dict[str, int]  # reason -> samples not studied
    comparison: Any = None  # GroupComparison, None when a group has fewer than 2 traces
    folder: Path | None = field(default=None, repr=False)
    agreement: AgreementSummary | None = None  # with run_study(agreement=True)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name} {len(results)}" for name, results in self.groups.items())
        skipped = f"; {sum(self.skipped.values())} samples not studied" if self.skipped else ""
        comparison = "no comparison" if self.comparison is None else (
            f"{len(self.comparison.rows)} measures compared"
            + (" (descriptive only)" if self.comparison.descriptive_only else ""))
        return f"StudyResult({counts} traces{skipped}; {comparison})"

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per studied trace: its group, index in the group, model, layers, steps and per-trace
        measures (what :func:`stepsal.compare_groups` compares)."""
        records = [{"group": group, "index": index, "model": result.model, "layers": len(result.layers),
                    "steps": result.layout.n_steps, **result.metrics().per_trace()}
                   for group, results in self.groups.items() for index, result in enumerate(results)]
        return records_frame(records, ["group", "index", "model", "layers", "steps", *TRACE_MEASURES])

    def plot(self, measures: Sequence[str] = POINT_MEASURES, **kwargs: Any) -> Figure:
        """Each trace's per-trace measures by group, with the group means: the matplotlib Figure (the
        per-layer curves with CIs are ``comparison.plot()``)."""
        return plot_group_points(self.to_dataframe(), "group", measures, **kwargs)

    def _repr_html_(self) -> str:
        comparison = self.comparison
        frames = [] if comparison is None else [
            (f"{comparison.label_b} - {comparison.label_a}, per-trace measures", comparison.to_dataframe())]
        frames.append(("per trace", self.to_dataframe()))
        return frames_html(repr(self), frames, fig=self.plot())

    def save(self, path: str | os.PathLike) -> Path:
        """A folder of its own: ``samples.jsonl`` (:meth:`EvalResult.save`), every saliency result as
        ``saliency/<group>/<index>.safetensors``, and ``study_result.json`` (the groups' files in order,
        what was skipped, the comparison)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.samples.save(folder / "samples.jsonl")
        files: dict[str, list[str]] = {}
        for group, results in self.groups.items():
            (folder / "saliency" / group).mkdir(parents=True, exist_ok=True)
            files[group] = [f"saliency/{group}/{index:04d}.safetensors" for index in range(len(results))]
            for name, result in zip(files[group], results, strict=True):
                result.save(folder / name)
        if self.agreement is not None:
            self.agreement.save(folder / "agreement.json")
        write_json(folder / STUDY_FILE, "StudyResult", {
            "samples": "samples.jsonl", "groups": files, "skipped": self.skipped,
            "agreement": None if self.agreement is None else "agreement.json",
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "folder": None if self.folder is None else str(self.folder)})
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> StudyResult:
        """A study saved by :meth:`save` (its folder)."""
        folder = Path(path)
        with reading(folder / STUDY_FILE, "StudyResult"):
            data = read_json(folder / STUDY_FILE, "StudyResult")
            return cls(samples=EvalResult.load(folder / data["samples"]),
                       groups={group: [StepSaliency.load(folder / name) for name in names]
                               for group, names in data["groups"].items()},
                       skipped=dict(data["skipped"]),
                       comparison=None if data["comparison"] is None else GroupComparison.from_dict(data["comparison"]),
                       folder=None if data["folder"] is None else Path(data["folder"]),
                       agreement=None if data.get("agreement") is None
                       else AgreementSummary.load(folder / data["agreement"]))


def _trace_of(row: dict, model: Model, min_thinking_steps: int):
    return Trace.from_tokens(row["tokens"], model, prompt_length=row["prompt_length"],
                             min_thinking_steps=min_thinking_steps)


def run_study(model: TLModel, problems: Sequence[Any], *, out: str | Path, k: int = 0, greedy: bool = True,
              temperature: float = R1_SAMPLING["temperature"], top_p: float = R1_SAMPLING["top_p"],
              max_new_tokens: int = 256, seed: int = 0, target: str = "all", norm: str = "causal",
              min_thinking_steps: int = 2, progress: bool = True,
              saliency: SaliencyOptions | None = None, agreement: bool = False) -> StudyResult:
    """Generate, label, analyse and compare (see the module docstring). Rerunning resumes.

    ``saliency``: every Step-Saliency setting (:class:`stepsal.SaliencyOptions`); ``target`` and
    ``norm`` are shorthands for the two most used ones (pass one or the other). Saved results are
    reused only when they were computed with the same settings. ``agreement``: also each trace's
    suppression matrix (``<trace>.suppression.json`` beside its map) and the rank agreement of Step-Saliency
    with it (:mod:`stepsal.studies.agreement`), in ``agreement.json``, study.json and the report."""
    if saliency is None:
        saliency = SaliencyOptions.from_dict({"target": target, "norm": norm})
    elif (target, norm) != ("all", "causal"):
        raise StepsalError("run_study got saliency= and target=/norm= too: put them in the SaliencyOptions.")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder, fix="write elsewhere (another --out)"):
        return _run_study_locked(model, problems, folder, k=k, greedy=greedy, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, seed=seed, min_thinking_steps=min_thinking_steps,
                                 progress=progress, saliency=saliency, agreement=agreement)


def _run_study_locked(model: TLModel, problems: Sequence[Any], folder: Path, *, k: int, greedy: bool,
                      temperature: float, top_p: float, max_new_tokens: int, seed: int, min_thinking_steps: int,
                      progress: bool, saliency: SaliencyOptions, agreement: bool) -> StudyResult:
    """:func:`run_study` while this process holds the lock on ``folder``."""
    samples = evaluate(model, problems, None, out=folder / "samples", k=k, greedy=greedy, temperature=temperature,
                       top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    wanted = {p.id for p in problems}
    # the samples asked for, of the model as it is (an evaluation's folder may hold more: StepFlow, other k)
    asked = lambda r: (r["mode"] == "greedy" and greedy) or (r["mode"] == "sampled" and r["sample"] < k)  # noqa: E731
    rows = [r for r in samples.frame.to_dict("records")
            if r["problem"] in wanted and r["condition"] == "baseline" and asked(r)]
    groups: dict[str, list[Any]] = {"correct": [], "wrong": []}
    skipped: Counter = Counter()
    studied: list[tuple[dict, Path, Any]] = []  # (row, saved map's path, result) for the agreement
    for row in tqdm(rows, desc="saliency", disable=not progress, unit="trace"):
        if not row["closed_think"]:
            skipped["thinking never closed"] += 1
            continue
        group = "correct" if row["correct"] else "wrong"
        path = folder / group / f"{row['problem']}.{row['mode']}.{row['sample']}.safetensors"
        if path.exists():
            try:
                saved = StepSaliency.load(path)
            except DamagedFileError as error:
                warnings.warn(f"{error} Computing it again.", StepsalWarning, stacklevel=3)
                saved = None
            if saved is not None and saved.options == saliency:
                groups[group].append(saved)
                studied.append((row, path, saved))
                continue
        try:
            trace = _trace_of(row, model, min_thinking_steps)
        except ValueError as error:  # TraceFormatError: too few steps, no summary, ...
            skipped[str(error).split(":")[0][:80]] += 1
            continue
        result = step_saliency(model, trace, options=saliency)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
        groups[group].append(result)
        studied.append((row, path, result))
    comparison = None
    if all(len(results) >= 2 for results in groups.values()):
        comparison = compare_groups(groups["correct"], groups["wrong"], labels=("correct", "wrong"))
    else:
        warnings.warn(f"no comparison: {len(groups['correct'])} correct and {len(groups['wrong'])} wrong traces "
                      "(each group needs at least 2; 10 for claims). Study more problems or samples.",
                      StepsalWarning, stacklevel=2)
    summary_of_agreement = None
    if agreement and studied:
        summary_of_agreement = _agreement(model, studied, min_thinking_steps, progress)
        summary_of_agreement.save(folder / "agreement.json")
    summary = {"problems": len(wanted), "samples": len(rows), "traces": {g: len(r) for g, r in groups.items()},
               "agreement": None if summary_of_agreement is None else summary_of_agreement.frame.to_dict("records"),
               "skipped": dict(skipped), "accuracy": samples.summary().to_dict("records"),
               "comparison": None if comparison is None else comparison.to_dataframe().to_dict("records"),
               "descriptive_only": None if comparison is None else comparison.descriptive_only}
    (folder / "study.json").write_text(json.dumps(summary, indent=1, default=float))
    if any(groups.values()):
        report_from_folder(folder)
    return StudyResult(samples=samples, groups=groups, skipped=dict(skipped), comparison=comparison, folder=folder,
                       agreement=summary_of_agreement)


def _agreement(model: TLModel, studied: list[tuple[dict, Path, Any]], min_thinking_steps: int,
               progress: bool) -> AgreementSummary:
    """Each studied trace's suppression matrix (saved beside its map, reused when its layers match) and
    the rank agreement of its Step-Saliency with it, over all traces."""
    per_trace = []
    for row, path, result in tqdm(studied, desc="suppression", disable=not progress, unit="trace"):
        saved_path = path.with_suffix(".suppression.json")
        suppression = None
        if saved_path.exists():
            try:
                suppression = SuppressionMatrix.load(saved_path)
            except DamagedFileError as error:
                warnings.warn(f"{error} Computing it again.", StepsalWarning, stacklevel=4)
        if suppression is None or suppression.layers != list(result.layers):
            suppression = suppression_matrix(model, _trace_of(row, model, min_thinking_steps), layers=result.layers)
            suppression.save(saved_path)
        per_trace.append(step_agreement(result, suppression))
    return agreement_over(per_trace)
