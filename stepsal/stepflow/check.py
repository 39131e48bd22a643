"""The paper's mechanistic check in one call: Step-Saliency of a trace with and without StepFlow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor

from ..model_types import TLModel
from ..saliency import StepSaliency, step_saliency
from ..traces import Trace
from ..vis.figures import plot_flow_effect
from ..vis.html import frame_section
from ..vis.tables import layer_frame, text_table, wide
from .config import StepFlow
from .hooks import FlowStats

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

MEASURES = ("local_share", "question_share", "summary_self_share")


@dataclass(kw_only=True)
class FlowEffect:
    """Saliency maps without and with StepFlow, and the per-layer change (with - without) of the measures."""

    without: StepSaliency
    with_flow: StepSaliency
    delta: dict[str, Float[Tensor, " layer"]]
    stats: FlowStats

    def plot(self, layers: list[int] | None = None, norm: str = "row", **kwargs: Any) -> Figure:
        """Maps without and with StepFlow and their difference: the matplotlib Figure (rows = layers)."""
        acted = self.stats.oeb_layers + self.stats.smi_layers  # default panels: where StepFlow acts
        return plot_flow_effect(self.without.normalized(norm), self.with_flow.normalized(norm), self.without.layers,
                                self.without.layout, panels=layers, prefer=acted, norm=norm, **kwargs)

    def to_dataframe(self) -> pandas.DataFrame:
        """Long format: one row per (layer, measure), ``value`` the change with - without StepFlow."""
        frame = layer_frame(self.without.layers, {m: self.delta[m] for m in MEASURES})
        frame.attrs.update(value="with StepFlow - without")
        return frame

    def __repr__(self) -> str:
        return (f"FlowEffect({len(self.without.layers)} layers x {self.without.layout.n_steps} steps; "
                f"{self.stats!r})")

    def _repr_html_(self) -> str:
        return frame_section(repr(self), wide(self.to_dataframe()), fig=self.plot(max_layers=3))

    def table(self) -> str:
        return text_table(wide(self.to_dataframe()), headers={m: f"d {m}" for m in MEASURES})


def saliency_change(model: TLModel, trace: Trace, flow: StepFlow, **saliency_kwargs: Any) -> FlowEffect:
    """Step-Saliency of ``trace`` twice, plain and with ``flow`` attached (teacher forcing).

    Keyword arguments go to :func:`stepsal.step_saliency` (target, rule, norm, ...). The blockwise
    mode is not used here: it would run StepFlow's hooks twice per block.
    """
    saliency_kwargs["mode"] = "patterns"
    without = step_saliency(model, trace, **saliency_kwargs)
    with flow.attached(model, trace) as run:
        with_flow = step_saliency(model, trace, **saliency_kwargs)
    before, after = without.metrics(), with_flow.metrics()
    delta = {m: getattr(after, m) - getattr(before, m) for m in MEASURES}
    return FlowEffect(without=without, with_flow=with_flow, delta=delta, stats=run.stats)
