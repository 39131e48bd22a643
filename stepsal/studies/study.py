"""Correct-vs-wrong studies: generate traces, label them, compute Step-Saliency, compare the groups.

``run_study(model, problems, out=folder)``:

1. answers every problem (greedy and/or ``k`` samples) through :func:`evaluate` (``folder/samples/``,
   resumable, the exact token ids kept);
2. segments each answer that closed its thinking into a trace (others are counted, not studied)
   and saves its Step-Saliency under ``folder/correct/`` or ``folder/wrong/`` (files already there
   are reused: resumable);
3. compares the groups per measure and per layer (:func:`stepsal.compare_groups`; descriptive only
   under 10 traces a group) and writes ``folder/report.html`` and ``folder/study.json``.

``shard=(i, n)`` splits steps 1 and 2 between processes by problem; shard 0 does step 3 over all
(:func:`run_study`, ``docs/scale.md``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
from .evaluate import R1_SAMPLING, EvalResult, await_shards, check_shard, evaluate, wait_for_samples
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
              saliency: SaliencyOptions | None = None, agreement: bool = False,
              shard: tuple[int, int] = (0, 1)) -> StudyResult:
    """Generate, label, analyse and compare (see the module docstring). Rerunning resumes.

    ``saliency``: every Step-Saliency setting (:class:`stepsal.SaliencyOptions`); ``target`` and
    ``norm`` are shorthands for the two most used ones (pass one or the other). Saved results are
    reused only when they were computed with the same settings. ``agreement``: also each trace's
    suppression matrix (``<trace>.suppression.json`` beside its map) and the rank agreement of Step-Saliency
    with it (:mod:`stepsal.studies.agreement`), in ``agreement.json``, study.json and the report.

    ``shard=(i, n)`` (``stepsal study --shard i/n`` or ``accelerate launch``): this process answers
    every n-th problem from the i-th and computes the Step-Saliency of those problems' traces, each
    trace once, saved as it is done (a rerun resumes from the last saved trace). Shard 0 then waits
    for the other shards' traces and compares them all (study.json, report.html); the others return
    their own traces without a comparison. A later run without ``shard`` reuses every saved file.
    """
    if saliency is None:
        saliency = SaliencyOptions.from_dict({"target": target, "norm": norm})
    elif (target, norm) != ("all", "causal"):
        raise StepsalError("run_study got saliency= and target=/norm= too: put them in the SaliencyOptions.")
    shard = check_shard(shard)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fix = "write elsewhere (another --out)"
    # shards share the folder (each holds its own lock); a run without shards holds it alone
    with writer_lock(folder, fix=fix, shared=shard[1] > 1), (
            writer_lock(folder / SHARD_LOCK.format(*shard), fix=fix) if shard[1] > 1 else nullcontext()):
        return _run_study_locked(model, problems, folder, k=k, greedy=greedy, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, seed=seed, min_thinking_steps=min_thinking_steps,
                                 progress=progress, saliency=saliency, agreement=agreement, shard=shard)


SHARD_LOCK = ".study.{}-of-{}.lock"  # held by the shard writing a study folder


def _run_study_locked(model: TLModel, problems: Sequence[Any], folder: Path, *, k: int, greedy: bool,
                      temperature: float, top_p: float, max_new_tokens: int, seed: int, min_thinking_steps: int,
                      progress: bool, saliency: SaliencyOptions, agreement: bool,
                      shard: tuple[int, int]) -> StudyResult:
    """:func:`run_study` while this process holds its lock on ``folder``."""
    samples = evaluate(model, problems, None, out=folder / "samples", k=k, greedy=greedy, temperature=temperature,
                       top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, shard=shard, progress=progress)
    merging = shard[0] == 0  # shard 0 (or the only process) compares every shard's traces
    if merging and shard[1] > 1:
        modes = ({"greedy": 1} if greedy else {}) | ({"sampled": k} if k else {})
        samples = wait_for_samples(folder / "samples", [p.id for p in problems], ("baseline",), modes, shard,
                                   progress)
    rows = _studied_rows(samples, problems, greedy, k)
    mine = {p.id for p in list(problems)[shard[0]::shard[1]]}
    own = [row for row in rows if row["problem"] in mine]
    traces = _saliency_of_own(model, own, folder, saliency, min_thinking_steps, progress)
    suppressions = _suppression_of_own(model, own, traces, min_thinking_steps, progress) if agreement else {}
    if merging and shard[1] > 1:
        others, other_suppressions = _await_other_shards([row for row in rows if row["problem"] not in mine], model,
                                                         folder, saliency, min_thinking_steps, agreement, shard,
                                                         progress)
        traces, suppressions = traces | others, suppressions | other_suppressions
    groups: dict[str, list[Any]] = {"correct": [], "wrong": []}
    skipped: Counter = Counter()
    studied: list[tuple[tuple, StepSaliency]] = []  # (row key, result) for the agreement
    for row in rows if merging else own:
        outcome = traces[_key(row)]
        if isinstance(outcome, str):
            skipped[outcome] += 1
            continue
        groups[_group(row)].append(outcome[1])
        studied.append((_key(row), outcome[1]))
    if not merging:
        return StudyResult(samples=samples, groups=groups, skipped=dict(skipped), folder=folder)
    comparison = None
    if all(len(results) >= 2 for results in groups.values()):
        comparison = compare_groups(groups["correct"], groups["wrong"], labels=("correct", "wrong"))
    else:
        warnings.warn(f"no comparison: {len(groups['correct'])} correct and {len(groups['wrong'])} wrong traces "
                      "(each group needs at least 2; 10 for claims). Study more problems or samples.",
                      StepsalWarning, stacklevel=3)
    summary_of_agreement = None
    if agreement and studied:
        summary_of_agreement = agreement_over([step_agreement(result, suppressions[key]) for key, result in studied])
        summary_of_agreement.save(folder / "agreement.json")
    summary = {"problems": len(problems), "samples": len(rows),
               "traces": {g: len(r) for g, r in groups.items()},
               "agreement": None if summary_of_agreement is None else summary_of_agreement.frame.to_dict("records"),
               "skipped": dict(skipped), "accuracy": samples.summary().to_dict("records"),
               "comparison": None if comparison is None else comparison.to_dataframe().to_dict("records"),
               "descriptive_only": None if comparison is None else comparison.descriptive_only}
    (folder / "study.json").write_text(json.dumps(summary, indent=1, default=float))
    if any(groups.values()):
        report_from_folder(folder)
    return StudyResult(samples=samples, groups=groups, skipped=dict(skipped), comparison=comparison, folder=folder,
                       agreement=summary_of_agreement)


Outcome = tuple[Path, StepSaliency] | str  # a trace's saved map and result, or why it is not studied
Saved = TypeVar("Saved")


def _studied_rows(samples: EvalResult, problems: Sequence[Any], greedy: bool, k: int) -> list[dict]:
    """The baseline samples asked for (an evaluation's folder may hold more: StepFlow, other k), in the
    problems' order, greedy first, then by sample: the same order however many shards wrote them."""
    order = {p.id: index for index, p in enumerate(problems)}
    asked = lambda r: (r["mode"] == "greedy" and greedy) or (r["mode"] == "sampled" and r["sample"] < k)  # noqa: E731
    rows = [r for r in samples.frame.to_dict("records")
            if r["problem"] in order and r["condition"] == "baseline" and asked(r)]
    return sorted(rows, key=lambda r: (order[r["problem"]], r["mode"] != "greedy", r["sample"]))


def _key(row: dict) -> tuple:
    return row["problem"], row["mode"], row["sample"]


def _group(row: dict) -> str:
    return "correct" if row["correct"] else "wrong"


def _map_path(folder: Path, row: dict) -> Path:
    return folder / _group(row) / f"{row['problem']}.{row['mode']}.{row['sample']}.safetensors"


def _suppression_path(map_path: Path) -> Path:
    return map_path.with_suffix(".suppression.json")


def _saved(path: Path, load: Callable[[Path], Saved], fits: Callable[[Saved], bool], *, warn: bool) -> Saved | None:
    """What ``load`` reads at ``path`` when it ``fits`` this run's settings; None otherwise (a
    damaged file is said when ``warn``)."""
    if not path.exists():
        return None
    try:
        saved = load(path)
    except DamagedFileError as error:
        if warn:
            warnings.warn(f"{error} Computing it again.", StepsalWarning, stacklevel=6)  # the caller of run_study
        return None
    return saved if fits(saved) else None


def _saved_map(path: Path, saliency: SaliencyOptions, *, warn: bool) -> StepSaliency | None:
    return _saved(path, StepSaliency.load, lambda saved: saved.options == saliency, warn=warn)


def _saved_suppression(path: Path, result: StepSaliency, *, warn: bool) -> SuppressionMatrix | None:
    return _saved(path, SuppressionMatrix.load, lambda saved: saved.layers == list(result.layers), warn=warn)


def _trace_or_reason(row: dict, model: Model, min_thinking_steps: int) -> Trace | str:
    """The row's trace, or why it is not studied (the same answer in every shard)."""
    if not row["closed_think"]:
        return "thinking never closed"
    try:
        return _trace_of(row, model, min_thinking_steps)
    except ValueError as error:  # TraceFormatError: too few steps, no summary, ...
        return str(error).split(":")[0][:80]


def _saliency_of_own(model: TLModel, rows: list[dict], folder: Path, saliency: SaliencyOptions,
                     min_thinking_steps: int, progress: bool) -> dict[tuple, Outcome]:
    """Each row's map: the saved one when its settings match, else computed and saved at once."""
    outcomes: dict[tuple, Outcome] = {}
    for row in tqdm(rows, desc="saliency", disable=not progress, unit="trace"):
        path = _map_path(folder, row)
        saved = _saved_map(path, saliency, warn=True) if row["closed_think"] else None
        if saved is not None:
            outcomes[_key(row)] = (path, saved)
            continue
        trace = _trace_or_reason(row, model, min_thinking_steps)
        if isinstance(trace, str):
            outcomes[_key(row)] = trace
            continue
        result = step_saliency(model, trace, options=saliency)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
        outcomes[_key(row)] = (path, result)
    return outcomes


def _suppression_of_own(model: TLModel, rows: list[dict], traces: dict[tuple, Outcome], min_thinking_steps: int,
                        progress: bool) -> dict[tuple, SuppressionMatrix]:
    """Each studied row's suppression matrix, saved beside its map (reused when its layers match)."""
    studied = [(row, outcome) for row in rows if not isinstance(outcome := traces[_key(row)], str)]
    found = {}
    for row, (path, result) in tqdm(studied, desc="suppression", disable=not progress, unit="trace"):
        suppression = _saved_suppression(_suppression_path(path), result, warn=True)
        if suppression is None:
            suppression = suppression_matrix(model, _trace_of(row, model, min_thinking_steps), layers=result.layers)
            suppression.save(_suppression_path(path))
        found[_key(row)] = suppression
    return found


def _await_other_shards(rows: list[dict], model: TLModel, folder: Path, saliency: SaliencyOptions,
                        min_thinking_steps: int, agreement: bool, shard: tuple[int, int],
                        progress: bool) -> tuple[dict[tuple, Outcome], dict[tuple, SuppressionMatrix]]:
    """The other shards' traces (and suppression matrices with ``agreement``), once they are saved."""
    outcomes: dict[tuple, Outcome] = {}
    suppressions: dict[tuple, SuppressionMatrix] = {}
    pending: list[dict] = []
    for row in rows:
        reason = _trace_or_reason(row, model, min_thinking_steps)
        if isinstance(reason, str):
            outcomes[_key(row)] = reason
        else:
            pending.append(row)

    def missing() -> int:
        for row in list(pending):
            path = _map_path(folder, row)
            saved = _saved_map(path, saliency, warn=False)
            suppression = None if saved is None or not agreement else \
                _saved_suppression(_suppression_path(path), saved, warn=False)
            if saved is not None and (not agreement or suppression is not None):
                outcomes[_key(row)] = (path, saved)
                if suppression is not None:
                    suppressions[_key(row)] = suppression
                pending.remove(row)
        return len(pending)

    await_shards(missing, f"traces in {folder}", shard, progress)
    return outcomes, suppressions
