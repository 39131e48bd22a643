"""The paper's mechanistic check in one call: Step-Saliency of a trace with and without StepFlow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..saliency import StepSaliency, step_saliency
from ..traces import Trace
from .config import StepFlow
from .hooks import FlowStats

MEASURES = ("local_share", "question_share", "summary_self_share")


@dataclass
class FlowEffect:
    """Saliency maps without and with StepFlow, and the per-layer change (with - without) of the measures."""

    without: StepSaliency
    with_flow: StepSaliency
    delta: dict[str, Float[Tensor, " layer"]]
    stats: FlowStats

    def plot(self, layers: list[int] | None = None, norm: str = "row", **kwargs: Any):
        """Maps without and with StepFlow and their difference: (matplotlib Figure, axes)."""
        from ..vis.figures import plot_flow_effect

        fig = plot_flow_effect(self, layers, norm, **kwargs)
        return fig, fig.axes

    def __repr__(self) -> str:
        return (f"FlowEffect({len(self.without.layers)} layers x {self.without.layout.n_steps} steps; "
                f"{self.stats!r})")

    def _repr_html_(self) -> str:
        from ..vis.html import flow_effect_html

        return flow_effect_html(self)

    def table(self) -> str:
        lines = [f"{'layer':>5} " + " ".join(f"{'d ' + m:>20}" for m in MEASURES)]
        for i, layer in enumerate(self.without.layers):
            lines.append(f"{layer:5d} " + " ".join(f"{float(self.delta[m][i]):20.4f}" for m in MEASURES))
        return "\n".join(lines)


def saliency_change(model: Any, trace: Trace, flow: StepFlow, **saliency_kwargs: Any) -> FlowEffect:
    """Step-Saliency of ``trace`` twice, plain and with ``flow`` attached (teacher forcing).

    Keyword arguments go to :func:`stepsal.step_saliency` (target, rule, norm, ...). The long-trace
    mode is not used here: it would run StepFlow's hooks twice per block.
    """
    saliency_kwargs["checkpoint"] = False
    without = step_saliency(model, trace, **saliency_kwargs)
    with flow.attached(model, trace) as run:
        with_flow = step_saliency(model, trace, **saliency_kwargs)
    before, after = without.metrics(), with_flow.metrics()
    delta = {m: getattr(after, m) - getattr(before, m) for m in MEASURES}
    return FlowEffect(without, with_flow, delta, run.stats)
