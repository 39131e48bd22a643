"""Receiver heads: heads whose step maps point many later steps at a few "broadcasting" steps.

Thought Anchors' measure (arXiv 2506.19143), on Step-Saliency's per-head step maps: per layer and
head, each step's *vertical score* is the mean of what the steps at least ``proximity`` after it
draw from it (row-normalised maps: each later step's row sums to 1), and the head's *kurtosis*
(Fisher's excess kurtosis of the vertical scores over the steps, population moments) is high when a
few steps receive far more than the rest. Thought Anchors computes this on attention weights;
here it reads the saliency (attention x gradient) maps, so it asks which steps the heads *use*.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import StepsalError
from .options import whole_number
from .pooling import normalize, vertical_scores
from .traces import StepLayout
from .vis.figures import plot_receiver_heads
from .vis.html import frame_section
from .vis.labels import step_labels, step_names
from .vis.widgets import step_maps_widget

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

    from .saliency import StepSaliency
    from .vis.render import Widget

MIN_STEPS = 4  # kurtosis of fewer scores says nothing


def excess_kurtosis(values: Float[Tensor, "*batch item"]) -> Float[Tensor, " *batch"]:
    """Fisher's excess kurtosis m4 / m2^2 - 3 over the last axis, leaving out NaN (population moments);
    NaN with fewer than MIN_STEPS values or no spread."""
    finite = torch.isfinite(values)
    count = finite.sum(-1)
    mean = torch.where(finite, values, 0.0).sum(-1) / count.clamp(min=1)
    centred = torch.where(finite, values - mean[..., None], 0.0)
    m2 = (centred**2).sum(-1) / count.clamp(min=1)
    m4 = (centred**4).sum(-1) / count.clamp(min=1)
    kurtosis = m4 / m2.clamp(min=torch.finfo(m2.dtype).tiny) ** 2 - 3
    return torch.where((count >= MIN_STEPS) & (m2 > 0), kurtosis, float("nan"))


@dataclass(kw_only=True)
class ReceiverHeads:
    """``kurtosis`` [layer, head] and ``vertical`` [layer, head, step] scores of one trace's per-head maps."""

    kurtosis: Float[Tensor, "layer head"]
    vertical: Float[Tensor, "layer head step"]
    head_maps: Float[Tensor, "layer head step_q step_k"]  # row-normalised, for the views
    layers: list[int]
    layout: StepLayout
    proximity: int

    def top(self, n: int = 10) -> list[tuple[int, int]]:
        """The ``n`` (layer, head) pairs of highest kurtosis, highest first."""
        flat = torch.nan_to_num(self.kurtosis, nan=-float("inf")).flatten()
        order = flat.argsort(descending=True)[:whole_number(n, "n", minimum=1)]
        n_heads = self.kurtosis.shape[1]
        return [(self.layers[int(i) // n_heads], int(i) % n_heads) for i in order if torch.isfinite(flat[i])]

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per (layer, head), highest kurtosis first: kurtosis and the step it points at most."""
        import pandas  # lazy: like the other results, only for their frames

        labels = step_labels(self.layout)
        rows = []
        for index, layer in enumerate(self.layers):
            for head in range(self.kurtosis.shape[1]):
                scores = self.vertical[index, head]
                best = int(torch.nan_to_num(scores, nan=-float("inf")).argmax())
                rows.append({"layer": layer, "head": head, "kurtosis": float(self.kurtosis[index, head]),
                             "top_step": best, "top_label": labels[best], "top_score": float(scores[best])})
        frame = pandas.DataFrame(rows)
        return frame.sort_values("kurtosis", ascending=False, na_position="last").reset_index(drop=True)

    def __repr__(self) -> str:
        top = self.top(3)
        named = ", ".join(f"L{layer}H{head} {float(self.kurtosis[self.layers.index(layer), head]):.2f}"
                          for layer, head in top)
        return (f"ReceiverHeads({len(self.layers)} layers x {self.kurtosis.shape[1]} heads, {self.layout.n_steps} "
                f"steps, proximity {self.proximity}; top kurtosis: {named or 'none'})")

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.to_dataframe().head(20), fig=self.plot())

    def plot(self, n: int = 4, path: str | os.PathLike | None = None) -> Figure:
        """Kurtosis per layer and head, and the vertical scores of the ``n`` top heads over the steps."""
        return plot_receiver_heads(self.kurtosis, self.layers, self.vertical, self.top(n), self.layout, path=path)

    def show(self, n: int = 8) -> Widget:
        """A circuitsvis widget: the (row-normalised) step maps of the ``n`` top heads."""
        top = self.top(n)
        if not top:
            raise StepsalError("no head has a kurtosis (each needs at least 4 steps with later steps to score).")
        maps = torch.stack([self.head_maps[self.layers.index(layer), head] for layer, head in top])
        return step_maps_widget(maps.float(), step_names(self.layout), [f"L{layer}H{head}" for layer, head in top],
                                title=f"Receiver heads: top {len(top)} by kurtosis (row-normalised step maps)")


def receiver_heads(result: StepSaliency, proximity: int = 4) -> ReceiverHeads:
    """:class:`ReceiverHeads` of a Step-Saliency result computed with ``per_head=True``; ``proximity``:
    a step's vertical score leaves out the ``proximity - 1`` steps right after it (Thought Anchors: 4)."""
    whole_number(proximity, "proximity", minimum=1)
    if result.head_sums is None:
        raise StepsalError("receiver heads need per-head maps: compute step_saliency(..., per_head=True).")
    if result.rule == "ag_signed":
        raise StepsalError("receiver heads read maps as shares; compute them on rule='ag' (or 'g'), not 'ag_signed'.")
    head_maps = normalize(result.head_sums.double(), result.members, "row")
    vertical = vertical_scores(head_maps, proximity)
    return ReceiverHeads(kurtosis=excess_kurtosis(vertical), vertical=vertical, head_maps=head_maps,
                         layers=list(result.layers), layout=result.layout, proximity=proximity)
