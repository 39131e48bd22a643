"""Static figures: step -> step heatmaps with question / thinking / summary boundaries."""

from __future__ import annotations

import math
import os
from typing import Sequence

from matplotlib.figure import Figure  # object-oriented: no pyplot state, no backend switch

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
        image = ax.imshow(maps[result.layers.index(layer)].numpy(), cmap="viridis")
        for cut in cuts:
            ax.axhline(cut, color="white", lw=1.2)
            ax.axvline(cut, color="white", lw=1.2)
        ax.set_title(f"layer {layer}", fontsize=9)
        step = max(1, len(labels) // 16)
        ticks = list(range(0, len(labels), step))
        ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=6, rotation=90)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Step-Saliency ({result.rule}, {norm or result.norm} norm, target {result.target}): "
                 "rows = query step, columns = key step", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
