"""StepFlow's statistics: per layer, the rows OEB changed (and the bridge mass) and SMI's injections."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import StepsalError
from ..vis.figures import plot_flow_stats
from ..vis.html import frame_section
from ..vis.tables import flow_stats_frame, flow_stats_text

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure


@dataclass(kw_only=True)
class FlowStats:
    """Per-layer counters, kept on the model's device (no host syncs while generating)."""

    oeb_layers: list[int]
    smi_layers: list[int]
    oeb_rows: Tensor  # eligible (query, head) rows seen, per OEB layer
    oeb_changed: Tensor  # rows OEB changed
    oeb_before: Tensor  # sum of bridge mass before, over changed rows
    oeb_after: Tensor  # sum of bridge mass after, over changed rows
    smi_count: Tensor  # injections (row, position), per SMI layer
    smi_norm: Tensor  # sum of injected vector norms

    @classmethod
    def zeros(cls, oeb_layers: list[int], smi_layers: list[int], device: torch.device) -> FlowStats:
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(oeb_layers=oeb_layers, smi_layers=smi_layers, oeb_rows=z(len(oeb_layers)),
                   oeb_changed=z(len(oeb_layers)), oeb_before=z(len(oeb_layers)), oeb_after=z(len(oeb_layers)),
                   smi_count=z(len(smi_layers)), smi_norm=z(len(smi_layers)))

    def counters(self) -> tuple[Tensor, ...]:
        return (self.oeb_rows, self.oeb_changed, self.oeb_before, self.oeb_after, self.smi_count, self.smi_norm)

    def to(self, device: torch.device | str) -> FlowStats:
        """The same counters on ``device`` (an engine's worker sends them to the host)."""
        rows, changed, before, after, count, norm = (t.to(device) for t in self.counters())
        return FlowStats(oeb_layers=list(self.oeb_layers), smi_layers=list(self.smi_layers), oeb_rows=rows,
                         oeb_changed=changed, oeb_before=before, oeb_after=after, smi_count=count, smi_norm=norm)

    def to_plain(self) -> dict[str, Any]:
        """The layers and raw counters as plain lists (what crosses a process boundary; :meth:`from_plain`)."""
        return {"oeb_layers": list(self.oeb_layers), "smi_layers": list(self.smi_layers),
                "counters": [t.tolist() for t in self.counters()]}

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> FlowStats:
        rows, changed, before, after, count, norm = (torch.tensor(c, dtype=torch.float64) for c in data["counters"])
        return cls(oeb_layers=list(data["oeb_layers"]), smi_layers=list(data["smi_layers"]), oeb_rows=rows,
                   oeb_changed=changed, oeb_before=before, oeb_after=after, smi_count=count, smi_norm=norm)

    @classmethod
    def total(cls, parts: Sequence[FlowStats]) -> FlowStats:
        """The counters of several runs with the same layers, added (what one batched run counts)."""
        if not parts or any((p.oeb_layers, p.smi_layers) != (parts[0].oeb_layers, parts[0].smi_layers)
                            for p in parts):
            raise StepsalError("FlowStats.total adds runs with the same OEB and SMI layers; got none, or runs "
                               "with different layers (keep them apart: one FlowStats per setting).")
        summed = [torch.stack(column).sum(0) for column in zip(*(p.to("cpu").counters() for p in parts), strict=True)]
        return cls(oeb_layers=list(parts[0].oeb_layers), smi_layers=list(parts[0].smi_layers), oeb_rows=summed[0],
                   oeb_changed=summed[1], oeb_before=summed[2], oeb_after=summed[3], smi_count=summed[4],
                   smi_norm=summed[5])

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers per layer (one host transfer per counter)."""
        rows, changed, before, after, count, norm = (t.tolist() for t in self.counters())
        return {
            "oeb": {layer: {"rows": int(rows[i]), "changed": int(changed[i]),
                            "mass_before": before[i] / changed[i] if changed[i] else None,
                            "mass_after": after[i] / changed[i] if changed[i] else None}
                    for i, layer in enumerate(self.oeb_layers)},
            "smi": {layer: {"injections": int(count[i]), "mean_norm": norm[i] / count[i] if count[i] else None}
                    for i, layer in enumerate(self.smi_layers)},
        }

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per (part, layer): OEB rows and bridge mass, SMI injections."""
        return flow_stats_frame(self.to_dict())

    def plot(self, **kwargs: Any) -> Figure:
        """Per layer: the share of OEB rows changed and the SMI injections: the matplotlib Figure."""
        return plot_flow_stats(self.to_dataframe(), **kwargs)

    def __repr__(self) -> str:
        data = self.to_dict()
        changed = sum(d["changed"] for d in data["oeb"].values())
        rows = sum(d["rows"] for d in data["oeb"].values())
        injections = sum(d["injections"] for d in data["smi"].values())
        return (f"FlowStats(OEB layers {self.oeb_layers or 'off'}: {changed} of {rows} rows changed; "
                f"SMI layers {self.smi_layers or 'off'}: {injections} injections)")

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.to_dataframe())

    def acted(self) -> bool:
        """Whether OEB changed any row or SMI injected anywhere."""
        return bool(self.oeb_changed.sum() > 0 or self.smi_count.sum() > 0)

    def table(self) -> str:
        return flow_stats_text(self.to_dataframe())
