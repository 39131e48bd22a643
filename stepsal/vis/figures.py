"""Static figures (matplotlib, object-oriented: no pyplot state, no backend switch) of plain data:
step -> step heatmaps with question / thinking / summary boundaries, per-layer curves.

Every function takes arrays (tensors or numpy), layer numbers, a layout and labels, and returns the
Figure; the result objects' ``.plot()`` methods pass their data here. matplotlib is imported on the
first figure, not with this module.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StepsalError
from .labels import choose_panels, pick_layers, segment_boundaries, step_labels

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

    from ..traces import StepLayout

__all__ = ["pick_layers", "plot_agreement", "plot_agreement_summary", "plot_bars", "plot_flow_effect",
           "plot_flow_stats", "plot_group_curves", "plot_group_points", "plot_layer_measures", "plot_receiver_heads",
           "plot_resampling", "plot_step_maps", "plot_step_matrix", "plot_sweep", "segment_boundaries",
           "step_labels"]

MAPS_TITLE = "Step-Saliency: rows = query step, columns = key step"


def _figure(*args: Any, **kwargs: Any) -> Figure:
    from matplotlib.figure import Figure  # lazy: matplotlib loads with the first figure (module docstring)

    return Figure(*args, **kwargs)


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _values(array: Any) -> np.ndarray:
    """A tensor or array as a float numpy array (on the CPU)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().float().numpy()
    return np.asarray(array, dtype=float)


def plot_step_maps(maps: Any, layers: Sequence[int], layout: StepLayout, *, panels: Sequence[int] | None = None,
                   title: str | None = None, path: str | os.PathLike | None = None, max_panels: int = 8,
                   columns: int = 4) -> Figure:
    """Heatmaps of step -> step maps, one panel per layer, with segment boundaries drawn.

    Args:
        maps: [layer, step_q, step_k] values (a tensor or array), one map per entry of ``layers``.
        layers: the model layer of each map.
        layout: the trace's steps (labels Q, T1, ..., S1, ... and segment boundaries).
        panels: layers to draw (default: up to ``max_panels`` spread over ``layers``).
        title: the figure's title (default: rows = query step, columns = key step).
        path: write a PNG there when given.
        max_panels, columns: panel count and grid width.

    Returns:
        The matplotlib Figure.
    """
    values = _values(maps)
    layers = list(layers)
    chosen = choose_panels(layers, panels, max_panels)
    labels, cuts = step_labels(layout), segment_boundaries(layout)
    cols = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    size = 2.2 + 0.12 * len(labels)
    fig = _figure(figsize=(size * cols, size * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, chosen, strict=False):
        image = _draw_map(ax, values[layers.index(layer)], labels, cuts, f"layer {layer}", "viridis")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or MAPS_TITLE, fontsize=9)
    return _finish(fig, path)


def plot_step_matrix(matrix: Any, layout: StepLayout, *, title: str, path: str | os.PathLike | None = None) -> Figure:
    """One signed step x step matrix on a diverging scale centred on 0 (NaN cells grey, 0 white)."""
    from matplotlib import colormaps  # lazy: matplotlib loads with the first figure (module docstring)

    values = _values(matrix)
    labels, cuts = step_labels(layout), segment_boundaries(layout)
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    size = 2.6 + 0.14 * len(labels)
    fig = _figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = _draw_map(ax, values, labels, cuts, "", colormaps["RdBu"].with_extremes(bad="#dddddd"),
                      (-(bound or 1.0), bound or 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(textwrap.fill(title, 60), fontsize=9)
    return _finish(fig, path)


def plot_receiver_heads(kurtosis: Any, layers: Sequence[int], vertical: Any, top: Sequence[tuple[int, int]],
                        layout: StepLayout, *, path: str | os.PathLike | None = None) -> Figure:
    """Kurtosis per layer and head (left) and the top heads' vertical scores over the steps (right)."""
    values, scores = _values(kurtosis), _values(vertical)
    labels = step_labels(layout)
    fig = _figure(figsize=(11, 3.2 + 0.12 * len(layers)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    image = left.imshow(values, cmap="magma", aspect="auto")
    left.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
    left.set_xlabel("head", fontsize=8)
    left.set_ylabel("layer", fontsize=8)
    left.set_title("kurtosis of vertical scores (NaN blank)", fontsize=9)
    fig.colorbar(image, ax=left, fraction=0.046, pad=0.04)
    for layer, head in top:
        right.plot(scores[list(layers).index(layer), head], marker="o", ms=3, label=f"L{layer}H{head}")
    step = max(1, len(labels) // 24)
    right.set_xticks(range(0, len(labels), step), labels[::step], fontsize=6, rotation=90)
    right.set_ylabel("mean share later steps draw", fontsize=8)
    right.set_title("vertical scores of the top heads", fontsize=9)
    if top:
        right.legend(fontsize=7)
    return _finish(fig, path)


def plot_resampling(frame: pandas.DataFrame, confidence: float, *, path: str | os.PathLike | None = None) -> Figure:
    """P(correct) per prefix with its interval (top) and each thinking step's importance (bottom), from
    a frame with prefix, label, p_correct, ci_low, ci_high and importance columns."""
    fig = _figure(figsize=(max(6.0, 0.35 * len(frame)), 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = frame["prefix"].to_numpy()
    top.fill_between(x, frame["ci_low"], frame["ci_high"], alpha=0.25, label=f"{confidence:.0%} Wilson interval")
    top.plot(x, frame["p_correct"], marker="o", ms=3, label="P(correct | prefix)")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("P(correct)", fontsize=8)
    top.legend(fontsize=7)
    top.set_title("accuracy along the trace: the trace continued from before thinking\nand after each thinking step",
                  fontsize=9)
    importance = frame["importance"].to_numpy(dtype=float)
    bottom.bar(x, np.nan_to_num(importance), color=["tab:blue" if v >= 0 else "tab:red" for v in
                                                    np.nan_to_num(importance)])
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylabel("P(k) - P(k-1)", fontsize=8)
    bottom.set_xticks(x, frame["label"].tolist(), fontsize=6, rotation=90)
    return _finish(fig, path)


def plot_agreement(importances: pandas.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """Each importance column of ``importances`` (one row per thinking step, with a ``label`` column)
    as ranks over the steps, 1 = most important."""
    measures = [column for column in importances.columns if column not in ("step", "label")]
    fig = _figure(figsize=(max(6.0, 0.35 * len(importances)), 3.6))
    ax = fig.subplots()
    x = np.arange(len(importances))
    for measure in measures:
        values = importances[measure].to_numpy(dtype=float)
        ranks = np.full(len(values), np.nan)
        finite = np.isfinite(values)
        ranks[np.flatnonzero(finite)[np.argsort(-values[finite], kind="mergesort")]] = np.arange(1, finite.sum() + 1)
        ax.plot(x, ranks, marker="o", ms=3, label=measure)
    ax.set_yticks(range(1, len(importances) + 1))
    ax.invert_yaxis()
    ax.set_xticks(x, importances["label"].tolist(), fontsize=6, rotation=90)
    ax.set_ylabel("rank (1 = most important)", fontsize=8)
    ax.set_title("importance of each thinking step, ranked by each measure", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _finish(fig, path)


def plot_agreement_summary(frame: pandas.DataFrame, confidence: float, *,
                           path: str | os.PathLike | None = None) -> Figure:
    """Mean rank agreement per pair (rows a, b, statistic, mean, ci_low, ci_high) with its interval."""
    pairs = list(dict.fromkeys(zip(frame["a"], frame["b"], strict=True)))
    fig = _figure(figsize=(max(6.0, 1.1 * len(pairs)), 3.8))
    ax = fig.subplots()
    width = 0.38
    for offset, statistic in ((-width / 2, "spearman"), (width / 2, "kendall")):
        rows = frame[frame["statistic"] == statistic].set_index(["a", "b"]).reindex(pairs)
        mean = rows["mean"].to_numpy(dtype=float)
        errors = np.abs(np.vstack([mean - rows["ci_low"].to_numpy(dtype=float),
                                   rows["ci_high"].to_numpy(dtype=float) - mean]))
        ax.bar(np.arange(len(pairs)) + offset, np.nan_to_num(mean), width, yerr=np.nan_to_num(errors), capsize=2,
               label=statistic)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(range(len(pairs)), [f"{a}\nvs {b}" for a, b in pairs], fontsize=6)
    ax.set_ylabel(f"mean rank correlation ({confidence:.0%} bootstrap CI)", fontsize=8)
    ax.legend(fontsize=7)
    return _finish(fig, path)


def _draw_map(ax: Any, values: np.ndarray, labels: list[str], cuts: list[float], title: str, cmap: Any,
              limits: tuple[float, float] | None = None) -> Any:
    image = ax.imshow(values, cmap=cmap, vmin=None if limits is None else limits[0],
                      vmax=None if limits is None else limits[1])
    for cut in cuts:
        ax.axhline(cut, color="white" if cmap == "viridis" else "grey", lw=1.0)
        ax.axvline(cut, color="white" if cmap == "viridis" else "grey", lw=1.0)
    ax.set_title(title, fontsize=9)
    step = max(1, len(labels) // 16)
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=6, rotation=90)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
    return image


def plot_flow_effect(before: Any, after: Any, layers: Sequence[int], layout: StepLayout, *,
                     panels: Sequence[int] | None = None, prefer: Sequence[int] = (), norm: str = "row",
                     max_layers: int = 4, path: str | os.PathLike | None = None) -> Figure:
    """Step maps without and with StepFlow, and their difference (with - without), per layer.

    Args:
        before, after: [layer, step_q, step_k] maps without and with StepFlow, one per entry of ``layers``.
        layers: the model layer of each map.
        layout: the trace's steps.
        panels: layers to draw (default: up to ``max_layers`` of ``prefer``, else of ``layers``).
        prefer: layers to pick the default panels from first (say, where StepFlow acted).
        norm: the maps' normalisation, for the title.
        path: write a PNG there when given.

    Returns:
        The matplotlib Figure (rows = layers; columns = without, with, difference).
    """
    layers = list(layers)
    if panels is None:
        panels = pick_layers([layer for layer in prefer if layer in layers], max_layers) or pick_layers(
            layers, max_layers)
    chosen = choose_panels(layers, panels, max_layers)
    before, after = _values(before), _values(after)
    labels, cuts = step_labels(layout), segment_boundaries(layout)
    size = 2.2 + 0.12 * len(labels)
    fig = _figure(figsize=(3 * size, size * len(chosen)))
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for row, layer in zip(axes, chosen, strict=True):
        i = layers.index(layer)
        diff = after[i] - before[i]
        bound = float(abs(diff).max()) or 1.0
        top = float(max(before[i].max(), after[i].max()))
        for ax, values, title, cmap, limits in (
                (row[0], before[i], f"layer {layer}: without", "viridis", (0.0, top)),
                (row[1], after[i], f"layer {layer}: with StepFlow", "viridis", (0.0, top)),
                (row[2], diff, f"layer {layer}: with - without", "RdBu_r", (-bound, bound))):
            fig.colorbar(_draw_map(ax, values, labels, cuts, title, cmap, limits), ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Step-Saliency with and without StepFlow ({norm} norm): rows = query step, columns = key step",
                 fontsize=9)
    return _finish(fig, path)


COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:orange")


def plot_group_curves(layers: Sequence[int], mean: Mapping[str, Mapping[str, Any]],
                      mean_ci: Mapping[str, Mapping[str, Any]], measures: Sequence[str], confidence: float = 0.95,
                      path: str | os.PathLike | None = None) -> Figure:
    """Per-layer means of some measures for each group, with their confidence bands.

    Args:
        layers: the layers (x axis), shared by every curve.
        mean: group -> measure -> [layer] means (the groups are drawn in this order).
        mean_ci: group -> measure -> [2, layer] lower and upper bounds.
        measures: per-layer measures to draw, one panel each.
        confidence: the bands' level, for the legend.
        path: write a PNG there when given.

    Returns:
        The matplotlib Figure.
    """
    if not mean:
        raise StepsalError("per-layer curves need traces computed over the same layers.")
    fig = _figure(figsize=(3.4 * len(measures), 3.0))
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, measure in zip(axes, measures, strict=True):
        for (label, by_measure), colour in zip(mean.items(), COLOURS, strict=False):
            low, high = mean_ci[label][measure]
            ax.plot(layers, by_measure[measure], color=colour, label=label, lw=1.4)
            ax.fill_between(layers, low, high, color=colour, alpha=0.2, lw=0)
        _layer_axis(ax, measure.replace("_", " "))
    axes[0].legend(fontsize=7, title=f"mean, {round(confidence * 100)}% CI", title_fontsize=7)
    return _finish(fig, path)


def _layer_axis(ax: Any, title: str, xlabel: str = "layer") -> None:
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib loads with the first figure (module docstring)

    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.tick_params(labelsize=7)


def plot_sweep(summary: pandas.DataFrame, metric: str, path: str | os.PathLike | None = None) -> Figure:
    """The mean change of ``metric`` per layer with its CI band, from a frame with columns layer,
    mean_delta, ci_low and ci_high (a sweep's ``summary()``).

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib loads with the first figure (module docstring)

    fig = _figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.plot(summary.layer, summary.mean_delta, marker="o", lw=1.2)
    ax.fill_between(summary.layer, summary.ci_low, summary.ci_high, alpha=0.2, lw=0)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer of the intervention")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"change in {metric}")
    return _finish(fig, path)


def plot_layer_measures(layers: Sequence[int], values: Mapping[str, Any], title: str = "",
                        path: str | os.PathLike | None = None) -> Figure:
    """Per-layer measures as curves on one axis (``values``: measure -> [layer]; NaN leaves a gap).

    Returns:
        The matplotlib Figure.
    """
    fig = _figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for measure, series in values.items():
        ax.plot(list(layers), _values(series), marker="o", ms=3, lw=1.2, label=measure.replace("_", " "))
    _layer_axis(ax, title)
    ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_flow_stats(frame: pandas.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    """StepFlow's counters per layer, from a frame with columns part ("OEB" / "SMI"), layer, rows,
    changed and injections (a :func:`stepsal.vis.tables.flow_stats_frame`): the share of OEB rows
    changed, and the SMI injections.

    Returns:
        The matplotlib Figure (one panel per part).
    """
    fig = _figure(figsize=(7, 3))
    left, right = fig.subplots(1, 2, squeeze=False)[0]
    oeb, smi = frame.loc[frame.part == "OEB"], frame.loc[frame.part == "SMI"]
    rows = oeb["rows"].to_numpy(dtype=float)
    share = np.divide(oeb["changed"].to_numpy(dtype=float), rows, out=np.zeros_like(rows), where=rows > 0)
    left.bar(oeb["layer"].to_numpy(dtype=float), share, color="tab:blue")
    _layer_axis(left, "OEB: share of rows changed")
    right.bar(smi["layer"].to_numpy(dtype=float), smi["injections"].to_numpy(dtype=float), color="tab:red")
    _layer_axis(right, "SMI: injections")
    return _finish(fig, path)


def plot_bars(frame: pandas.DataFrame, label: str, columns: Sequence[str], title: str = "", ylabel: str = "",
              path: str | os.PathLike | None = None) -> Figure:
    """Grouped bars: one group per row of ``frame`` (named by its ``label`` column), one bar per
    entry of ``columns``.

    Returns:
        The matplotlib Figure.
    """
    names = [str(v) for v in frame[label]]
    fig = _figure(figsize=(max(4.0, 1.0 + 0.6 * len(names) * max(1, len(columns))), 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(columns))
    x = np.arange(len(names))
    for i, column in enumerate(columns):
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, frame[column].to_numpy(dtype=float), width,
               label=column.replace("_", " "))
    ax.set_xticks(x, names, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(columns) > 1:
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_group_points(frame: pandas.DataFrame, group: str, measures: Sequence[str],
                      path: str | os.PathLike | None = None) -> Figure:
    """One value per row (say, per trace) of each measure, as points per group with the group's mean
    (a black bar); ``group`` names the column that holds each row's group.

    Returns:
        The matplotlib Figure (one panel per measure).
    """
    groups = list(dict.fromkeys(frame[group]))
    fig = _figure(figsize=(2.4 * max(1, len(measures)), 3.0))
    axes = fig.subplots(1, max(1, len(measures)), squeeze=False)[0]
    for ax, measure in zip(axes, measures, strict=False):
        for i, (name, colour) in enumerate(zip(groups, COLOURS * (len(groups) // len(COLOURS) + 1), strict=False)):
            values = frame.loc[frame[group] == name, measure].to_numpy(dtype=float)
            spread = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + spread, values, s=12, color=colour, alpha=0.7)
            if np.isfinite(values).any():
                ax.hlines(np.nanmean(values), i - 0.25, i + 0.25, color="black", lw=1.5)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups], fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_title(measure.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=7)
    return _finish(fig, path)
