"""pandas DataFrames of plain data (long format: one row per number, named columns), and the fixed-
width text tables that results print, rendered from those frames."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas

from .labels import step_labels

if TYPE_CHECKING:
    from ..traces import StepLayout


def _number(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


# ---------------------------------------------------------------- frames


def saliency_frame(maps: Any, layers: Sequence[int], layout: StepLayout, **attrs: Any) -> pandas.DataFrame:
    """One row per (layer, step_q, step_k): layer, step_q, step_k, kind_q, kind_k, label_q, label_k, value.

    ``maps`` [layer, step_q, step_k] holds one map per entry of ``layers``; ``attrs`` (norm, rule,
    target, model, ...) go to ``frame.attrs``."""
    labels, kinds = step_labels(layout), [step.kind for step in layout.steps]
    values = maps.tolist()
    n = len(layout.steps)
    rows = [(layer, q, k, kinds[q], kinds[k], labels[q], labels[k], float(values[i][q][k]))
            for i, layer in enumerate(layers) for q in range(n) for k in range(n)]
    frame = pandas.DataFrame(rows, columns=["layer", "step_q", "step_k", "kind_q", "kind_k", "label_q",
                                               "label_k", "value"])
    frame.attrs.update(attrs)
    return frame


def layer_frame(layers: Sequence[int], values: Mapping[str, Any], long: bool = True) -> pandas.DataFrame:
    """Per-layer measures (``values``: measure -> [layer]). Long: one row per (layer, measure) with
    columns layer, measure, value; wide: one row per layer, a column per measure."""
    columns = {measure: [_number(v) for v in series] for measure, series in values.items()}
    if long:
        rows = [(layer, measure, columns[measure][i]) for i, layer in enumerate(layers) for measure in columns]
        return pandas.DataFrame(rows, columns=["layer", "measure", "value"])
    return pandas.DataFrame({"layer": list(layers), **columns})


def wide(frame: pandas.DataFrame) -> pandas.DataFrame:
    """A long (layer, measure, value) frame as one row per layer, a column per measure (in their order)."""
    measures = list(dict.fromkeys(frame["measure"]))
    table = frame.pivot(index="layer", columns="measure", values="value")[measures].reset_index()
    table.columns.name = None
    return table


def record_frame(record: Mapping[str, Any]) -> pandas.DataFrame:
    """One row: a column per key (say, a trace's per-trace measures)."""
    return pandas.DataFrame([dict(record)])


def records_frame(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pandas.DataFrame:
    """One row per record, the given columns in their order (an empty frame with those columns when
    there are no records)."""
    return pandas.DataFrame([[record.get(c) for c in columns] for record in records], columns=list(columns))


def comparison_frame(rows: Sequence[Mapping[str, Any]], label_a: str, label_b: str, confidence: float,
                     n_boot: int) -> pandas.DataFrame:
    """One row per measure compared between two groups: their means, the difference and Hedges' g with
    CIs. ``rows``: mappings with measure, n_a, n_b, mean_a, mean_b, diff, diff_ci, hedges_g, g_ci, dropped."""
    records = [(r["measure"], r["n_a"], r["n_b"], r["mean_a"], r["mean_b"], r["diff"], r["diff_ci"][0],
                r["diff_ci"][1], r["hedges_g"], r["g_ci"][0], r["g_ci"][1], r.get("dropped", 0)) for r in rows]
    frame = pandas.DataFrame(records, columns=[
        "measure", f"n_{label_a}", f"n_{label_b}", f"mean_{label_a}", f"mean_{label_b}", "diff", "diff_lo",
        "diff_hi", "hedges_g", "g_lo", "g_hi", "dropped"])
    frame.attrs.update(confidence=confidence, n_boot=n_boot, diff=f"{label_b} - {label_a}", labels=(label_a, label_b))
    return frame


def flow_stats_frame(data: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> pandas.DataFrame:
    """One row per (part, layer) from per-layer counters (``{"oeb": {layer: {rows, changed, mass_before,
    mass_after}}, "smi": {layer: {injections, mean_norm}}}``): OEB rows seen / changed and bridge mass
    before / after; SMI injections and their mean norm."""
    rows = [("OEB", layer, d["rows"], d["changed"], d["mass_before"], d["mass_after"], None, None)
            for layer, d in data["oeb"].items()]
    rows += [("SMI", layer, None, None, None, None, d["injections"], d["mean_norm"])
             for layer, d in data["smi"].items()]
    return pandas.DataFrame(rows, columns=["part", "layer", "rows", "changed", "bridge_mass_before",
                                              "bridge_mass_after", "injections", "mean_norm"])


def steps_frame(layout: StepLayout, width: int = 90) -> pandas.DataFrame:
    """One row per step: its label, kind, token span and the start of its text."""
    rows = []
    for label, step in zip(step_labels(layout), layout.steps, strict=True):
        text = " ".join(step.text.split())
        rows.append((label, step.kind, f"{step.token_span[0]}-{step.token_span[1]}",
                     text if len(text) <= width else text[:width - 3] + "..."))
    return pandas.DataFrame(rows, columns=["step", "kind", "tokens", "text"])


# ---------------------------------------------------------------- text


def cell(value: Any, digits: int = 4) -> str:
    """A table cell: None as '-', reals with ``digits`` decimals (NaN as 'nan'), the rest as text."""
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def text_table(frame: pandas.DataFrame, digits: int = 4, headers: Mapping[str, str] | None = None) -> str:
    """A fixed-width text table of a frame: a column each (text left-aligned, numbers right-aligned),
    headers renamed by ``headers``, reals with ``digits`` decimals."""
    headers = headers or {}
    names, columns, left = [], [], []
    for i, column in enumerate(frame.columns):
        values = frame.iloc[:, i].tolist()
        names.append(str(headers.get(column, column)))
        columns.append([cell(v, digits) for v in values])
        # a numpy dtype compared with the object type (dtype('O') == object), not a type comparison
        left.append(frame.dtypes.iloc[i] == object and all(isinstance(v, str) for v in values))  # noqa: E721
    widths = [max([len(name), *map(len, column)]) for name, column in zip(names, columns, strict=True)]

    def line(texts: Sequence[str]) -> str:
        cells = zip(texts, widths, left, strict=True)
        return " ".join(t.ljust(w) if lft else t.rjust(w) for t, w, lft in cells).rstrip()

    return "\n".join([line(names), *(line(row) for row in zip(*columns, strict=True))])


def comparison_text(frame: pandas.DataFrame) -> str:
    """A :func:`comparison_frame` as text: means, difference and Hedges' g with their CIs, n per group."""
    label_a, label_b = frame.attrs["labels"]
    pct = round(frame.attrs["confidence"] * 100)
    lines = [f"{'measure':<17} {label_a:>9} {label_b:>9} {'diff':>8}  {pct}% CI{'':<12} {'g':>6}  {pct}% CI"]
    for measure, n_a, n_b, mean_a, mean_b, diff, lo, hi, g, g_lo, g_hi, dropped in frame.itertuples(index=False):
        lines.append(f"{measure:<17} {mean_a:9.4f} {mean_b:9.4f} {diff:8.4f}  [{lo:7.4f}, {hi:7.4f}] {g:6.2f}  "
                     f"[{g_lo:.2f}, {g_hi:.2f}]  n={n_a}/{n_b}" + (f" ({dropped} without)" if dropped else ""))
    return "\n".join(lines)


def flow_stats_text(frame: pandas.DataFrame) -> str:
    """A :func:`flow_stats_frame` as text: OEB layers (rows seen, changed, bridge mass before -> after),
    then SMI layers (injections, mean norm)."""
    lines = ["OEB  layer   rows  changed  bridge mass before -> after"]
    for r in frame[frame.part == "OEB"].itertuples(index=False):
        masses = f"{r.bridge_mass_before:.4f} -> {r.bridge_mass_after:.4f}" if r.changed else "-"
        lines.append(f"     {int(r.layer):5d} {int(r.rows):6d} {int(r.changed):8d}  {masses}")
    lines.append("SMI  layer  injections  mean norm")
    for r in frame[frame.part == "SMI"].itertuples(index=False):
        norm = f"{r.mean_norm:.4f}" if r.injections else "-"
        lines.append(f"     {int(r.layer):5d} {int(r.injections):11d}  {norm}")
    return "\n".join(lines)
