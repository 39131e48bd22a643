"""Static figures: step -> step heatmaps with question / thinking / summary boundaries."""

from __future__ import annotations

import math
import os
from typing import Sequence

from matplotlib.figure import Figure  # object-oriented: no pyplot state, no backend switch
from matplotlib.ticker import MaxNLocator

from ..traces import QUESTION, SUMMARY, THINKING, StepLayout

PREFIX = {QUESTION: "Q", THINKING: "T", SUMMARY: "S"}


def step_labels(layout: StepLayout) -> list[str]:
    """Q, T1, T2, ..., S1, S2, ... for the steps of a layout."""
    counts = {QUESTION: 0, THINKING: 0, SUMMARY: 0}
    labels = []
    for step in layout.steps:
        counts[step.segment] += 1
        labels.append("Q" if step.segment == QUESTION else f"{PREFIX[step.segment]}{counts[step.segment]}")
    return labels


def segment_boundaries(layout: StepLayout) -> list[float]:
    """Positions (between cells) where the segment changes."""
    segments = [s.segment for s in layout.steps]
    return [i - 0.5 for i in range(1, len(segments)) if segments[i] != segments[i - 1]]


def pick_layers(layers: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` layers spread evenly, first and last included."""
    if len(layers) <= count:
        return list(layers)
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def plot_step_maps(result, layers: Sequence[int] | None = None, norm: str | None = None,
                   path: str | os.PathLike | None = None, max_panels: int = 8, columns: int = 4):
    """Heatmaps of step -> step maps for some layers, with segment boundaries drawn.

    Args:
        result: a :class:`~stepsal.saliency.StepSaliency`.
        layers: model layers to draw (default: up to ``max_panels`` spread over the computed ones).
        norm: normalisation to show (default: the result's own).
        path: write a PNG there when given.
        max_panels, columns: panel count and grid width.

    Returns:
        The matplotlib Figure.
    """
    maps = result.normalized(norm or result.norm)
    chosen = list(layers) if layers is not None else pick_layers(result.layers, max_panels)
    missing = [layer for layer in chosen if layer not in result.layers]
    if missing:
        raise ValueError(f"layers {missing} were not computed; this result has layers {result.layers}.")
    labels, cuts = step_labels(result.layout), segment_boundaries(result.layout)
    cols = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    size = 2.2 + 0.12 * len(labels)
    fig = Figure(figsize=(size * cols, size * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, chosen):
        image = _draw_map(ax, maps[result.layers.index(layer)].numpy(), labels, cuts, f"layer {layer}", "viridis")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Step-Saliency ({result.rule}, {norm or result.norm} norm, target {result.target}): "
                 "rows = query step, columns = key step", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _draw_map(ax, values, labels: list[str], cuts: list[float], title: str, cmap: str, limits=None):
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


def plot_flow_effect(effect, layers: Sequence[int] | None = None, norm: str = "row", max_layers: int = 4,
                     path: str | os.PathLike | None = None):
    """Step maps without and with StepFlow, and their difference (with - without), per layer.

    Args:
        effect: a :class:`~stepsal.stepflow.check.FlowEffect` (from :func:`stepsal.saliency_change`).
        layers: layers to draw (default: up to ``max_layers``, the flow's OEB and SMI layers first).
        norm: normalisation of the maps (default "row": shares of each query step's saliency).
        path: write a PNG there when given.

    Returns:
        The matplotlib Figure (rows = layers; columns = without, with, difference).
    """
    without, with_flow = effect.without, effect.with_flow
    acted = [layer for layer in effect.stats.oeb_layers + effect.stats.smi_layers if layer in without.layers]
    chosen = list(layers) if layers is not None else (pick_layers(acted, max_layers) or
                                                      pick_layers(without.layers, max_layers))
    missing = [layer for layer in chosen if layer not in without.layers]
    if missing:
        raise ValueError(f"layers {missing} were not computed; this result has layers {without.layers}.")
    before, after = without.normalized(norm), with_flow.normalized(norm)
    labels, cuts = step_labels(without.layout), segment_boundaries(without.layout)
    size = 2.2 + 0.12 * len(labels)
    fig = Figure(figsize=(3 * size, size * len(chosen)))
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for row, layer in zip(axes, chosen):
        i = without.layers.index(layer)
        diff = (after[i] - before[i]).numpy()
        bound = float(abs(diff).max()) or 1.0
        top = float(max(before[i].max(), after[i].max()))
        for ax, values, title, cmap, limits in (
                (row[0], before[i].numpy(), f"layer {layer}: without", "viridis", (0, top)),
                (row[1], after[i].numpy(), f"layer {layer}: with StepFlow", "viridis", (0, top)),
                (row[2], diff, f"layer {layer}: with - without", "RdBu_r", (-bound, bound))):
            fig.colorbar(_draw_map(ax, values, labels, cuts, title, cmap, limits), ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Step-Saliency with and without StepFlow ({norm} norm): rows = query step, columns = key step",
                 fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


GROUP_MEASURES = ("local_share", "question_share", "summary_thinking_share", "recency")


def plot_group_curves(comparison, measures: Sequence[str] = GROUP_MEASURES,
                      path: str | os.PathLike | None = None):
    """Per-layer means of the lock-in and decay measures for both groups, with bootstrap CIs.

    Args:
        comparison: a :class:`~stepsal.metrics.GroupComparison` whose traces share their layers.
        measures: per-layer measures to draw, one panel each.
        path: write a PNG there when given.

    Returns:
        The matplotlib Figure.
    """
    if not comparison.layer_mean:
        raise ValueError("per-layer curves need traces computed over the same layers.")
    fig = Figure(figsize=(3.4 * len(measures), 3.0))
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    pct = round(comparison.confidence * 100)
    for ax, measure in zip(axes, measures):
        for label, colour in ((comparison.label_a, "tab:blue"), (comparison.label_b, "tab:red")):
            mean = comparison.layer_mean[label][measure]
            low, high = comparison.layer_mean_ci[label][measure]
            ax.plot(comparison.layers, mean, color=colour, label=label, lw=1.4)
            ax.fill_between(comparison.layers, low, high, color=colour, alpha=0.2, lw=0)
        ax.set_title(measure.replace("_", " "), fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, title=f"mean, {pct}% CI", title_fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
