"""Names and positions of a layout's steps, for every view (no matplotlib, no torch, no pandas)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import StepsalError
from ..segments import QUESTION, SUMMARY, THINKING

if TYPE_CHECKING:
    from ..traces import StepLayout

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


def step_names(layout: StepLayout, width: int = 24) -> list[str]:
    """'T3:So·the·total·cost..' for every step: its label and the start of its text. circuitsvis's
    attention views delete every whitespace character from labels, so words are joined by '·'."""
    names = []
    for label, step in zip(step_labels(layout), layout.steps, strict=True):
        text = "\u00b7".join(step.text.split())
        names.append(f"{label}:{text[:width]}{'..' if len(text) > width else ''}")
    return names


def pick_layers(layers: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` layers spread evenly, first and last included."""
    if len(layers) <= count:
        return list(layers)
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def choose_panels(layers: Sequence[int], panels: Sequence[int] | None, count: int) -> list[int]:
    """The layers to draw: ``panels`` (each must be in ``layers``), or up to ``count`` spread over ``layers``."""
    chosen = list(panels) if panels is not None else pick_layers(list(layers), count)
    if not chosen:
        raise StepsalError(f"no layer to draw: pass layers from {list(layers)} (or none for a spread of them).")
    missing = [layer for layer in chosen if layer not in layers]
    if missing:
        raise StepsalError(f"layers {missing} were not computed; this result has layers {list(layers)}.")
    return chosen


# ---------------------------------------------------------------- titles of views


def maps_title(rule: str, norm: str, target: str) -> str:
    """The title of a figure of step maps."""
    return f"Step-Saliency ({rule}, {norm} norm, target {target}): rows = query step, columns = key step"


def maps_widget_title(rule: str, norm: str, target: str) -> str:
    """The title of a widget with every layer's step map."""
    return (f"Step-Saliency maps ({rule}, {norm} norm, target {target}), one per layer: "
            "rows = query step, columns = key step")


def received_title(source: str | int, token_level: bool) -> str:
    """The title of a widget of the saliency each token receives from ``source`` ("summary" or a step)."""
    what = "the summary" if source == "summary" else f"step {source}"
    return (f"Saliency each token receives from {what}, per layer (share of the layer's total; "
            + ("token resolution)" if token_level else "step resolution: step_saliency(..., token_level=True) "
                                                       "gives token resolution)"))
