"""Attention suppression: which steps later steps causally lean on (Thought Anchors' white-box measure).

For each step i, one forward with step i's keys hidden from every query after it (a :func:`knockout`
in the chosen layers) gives each later token's log-probability without step i; the change from the
plain forward, averaged over step j's tokens, is ``maps[j, i]``. Negative: step j's tokens became less
likely, so step j used step i. Entries with j <= i are NaN (those tokens' queries are untouched).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..backends import transformerlens_adapter
from ..model_types import TLModel
from ..options import layer_numbers
from ..pooling import vertical_scores
from ..sites import attention_sites
from ..storage import floats, read_json, reading, write_json
from ..traces import StepLayout, Trace, require_trace
from ..vis.figures import plot_step_matrix
from ..vis.html import frame_section
from ..vis.labels import step_names
from ..vis.tables import saliency_frame
from ..vis.widgets import step_maps_widget
from .knockout import knockout

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

    from ..vis.render import Widget


def token_logprobs(logits: Float[Tensor, "token vocab"], tokens: Tensor) -> Float[Tensor, " token"]:
    """log p(token t | tokens before t), read at position t - 1, in float64; NaN for the first token."""
    logp = torch.log_softmax(logits[:-1].double(), -1).gather(-1, tokens[1:, None].to(logits.device))[:, 0]
    return torch.cat([torch.full((1,), float("nan"), dtype=torch.float64, device=logp.device), logp]).cpu()


def step_means(values: Float[Tensor, " token"], layout: StepLayout) -> Float[Tensor, " step"]:
    """The mean of ``values`` over each step's tokens, leaving out NaN (the first token's)."""
    members = layout.membership(dtype=torch.float64) * torch.isfinite(values)
    total = (members * torch.nan_to_num(values)).sum(-1)
    count = members.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), float("nan"))


@dataclass(kw_only=True)
class SuppressionMatrix:
    """``maps[j, i]``: the mean change in log-probability (nats per token) of step j's tokens when
    step i's keys are hidden from every later query; NaN where j <= i. ``layers``: where it was hidden."""

    maps: Float[Tensor, "step_q step_k"]
    layout: StepLayout
    layers: list[int]
    model: str = ""

    @property
    def importance(self) -> Float[Tensor, " step"]:
        """Per step i: the mean drop over the later steps, -mean_j>i maps[j, i] (NaN for the last step)."""
        return -vertical_scores(self.maps, 1)

    def __repr__(self) -> str:
        strongest = int(torch.nan_to_num(self.importance, nan=-float("inf")).argmax())
        return (f"SuppressionMatrix({self.model or 'model'}: {self.layout.n_steps} steps, {len(self.layers)} layers; "
                f"largest mean drop from step {strongest}: {float(self.importance[strongest]):.4f} nats/token)")

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per (later step j, step i): step_q = j, step_k = i, kinds, labels and ``value`` (the
        change in log-probability)."""
        frame = saliency_frame(self.maps[None], [0], self.layout).drop(columns="layer")
        return frame.loc[frame["step_q"] > frame["step_k"]].reset_index(drop=True)

    def plot(self, path: str | os.PathLike | None = None) -> Figure:
        """The matrix as a heatmap (rows = later step j, columns = hidden step i; blue = j lost)."""
        return plot_step_matrix(self.maps, self.layout, title="attention suppression: change in log p of row step's "
                                "tokens when the column step is hidden (nats/token)", path=path)

    def show(self) -> Widget:
        """A circuitsvis widget: the drop in log-probability (increases shown as 0), scaled to the largest."""
        drop = torch.nan_to_num(-self.maps).clamp(min=0)
        largest = float(drop.max())
        return step_maps_widget((drop / largest if largest > 0 else drop)[None], step_names(self.layout),
                                ["suppression"], title=f"Drop in log p of each row step when the column step is "
                                f"hidden, scaled to the largest ({largest:.3g} nats/token)")

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.to_dataframe(), fig=self.plot())

    def save(self, path: str | os.PathLike) -> Path:
        """JSON: the matrix (NaN as null), the layout, the layers, the model's name."""
        return write_json(path, "SuppressionMatrix", {"maps": self.maps.tolist(), "layout": self.layout.to_dict(),
                                                      "layers": self.layers, "model": self.model})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SuppressionMatrix:
        with reading(path, "SuppressionMatrix"):
            data = read_json(path, "SuppressionMatrix")
            return cls(maps=torch.tensor(floats(data["maps"]), dtype=torch.float64),
                       layout=StepLayout.from_dict(data["layout"]), layers=list(data["layers"]), model=data["model"])


def suppression_matrix(model: TLModel, trace: Trace, *, layers: Sequence[int] | None = None,
                       progress: bool = False) -> SuppressionMatrix:
    """The :class:`SuppressionMatrix` of ``trace``: one plain forward, then one forward per step with
    that step's keys hidden from every query after it, in ``layers`` (default: every layer with a
    usable attention pattern). The last step has no later queries, so its column is NaN."""
    require_trace(trace, "suppression_matrix")
    adapter = transformerlens_adapter(model, "suppression_matrix")
    layout, tokens, n_tokens = trace.layout, trace.tokens[None], len(trace)
    with torch.no_grad():
        plain = step_means(token_logprobs(adapter.forward(tokens)[0], trace.tokens), layout)
    chosen = attention_sites(model).attention_layers if layers is None else layer_numbers(layers)
    maps = torch.full((layout.n_steps, layout.n_steps), float("nan"), dtype=torch.float64)
    for step in tqdm(layout.steps, desc="suppression", disable=not progress, unit="step"):
        end = step.token_span[1]
        if end >= n_tokens:  # no query after the last token
            continue
        later = torch.arange(n_tokens) >= end
        with torch.no_grad(), knockout(model, trace, later, [step.index], layers=chosen):
            suppressed = step_means(token_logprobs(adapter.forward(tokens)[0], trace.tokens), layout)
        maps[step.index + 1:, step.index] = (suppressed - plain)[step.index + 1:]
    return SuppressionMatrix(maps=maps, layout=layout, layers=chosen, model=adapter.label)
