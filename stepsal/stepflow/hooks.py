"""StepFlow as TransformerLens hook functions over a shared per-run state.

A :class:`FlowRun` holds, for every row and absolute position, the segment, the thinking step,
whether SMI acts there and which earlier step it draws from. Hooks are plain ``fn(tensor, hook)``
closures bound to a layer: OEB on ``hook_pattern``, SMI on ``hook_v`` (to remember values) and on
``hook_resid_post`` or ``hook_z`` (to inject). The forward being run covers positions
``[offset, offset + q)``; the pattern hook checks that against its own shape (k - q = offset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from jaxtyping import Float
from torch import Tensor

from ..backends import Model, ModelAdapter, adapter_for
from ..backends.transformerlens import TransformerLensAdapter, flow_hooks, output_weights
from ..traces import SUMMARY, THINKING, Trace
from .labels import StepLabels
from .oeb import BridgeEdit, bridge_groups, odds_equal_bridge
from .smi import OutputWeights, momentum_vector, source_members, step_momentum
from .stats import FlowStats
from .tracker import TokenLabel

if TYPE_CHECKING:
    from .config import StepFlow

__all__ = ["FlowRun", "FlowStats", "output_weights"]


class FlowRun:
    """One StepFlow run (a generation, or teacher-forced forwards over a trace): where it acts
    (:class:`StepLabels`), the values SMI averages, and the statistics. Its effects are the functions
    of :mod:`.oeb` and :mod:`.smi`; the model's adapter wires :meth:`bridge`, :meth:`remember` and
    :meth:`inject_momentum` into the model (:meth:`ModelAdapter.attach_flow`)."""

    def __init__(self, flow: StepFlow, model: Model | ModelAdapter, batch: int, capacity: int,
                 layers: tuple[list[int], list[int]] | None = None, labels: StepLabels | None = None):
        """``layers``: (OEB, SMI) layers when the caller has them already (else asked of the model)."""
        adapter = adapter_for(model)
        self.adapter: ModelAdapter | None = adapter
        self.model = adapter.model
        self._start(flow, batch, capacity, adapter.flow_layers(flow) if layers is None else layers, adapter.device,
                    labels)

    @classmethod
    def detached(cls, flow: StepFlow, layers: tuple[list[int], list[int]], capacity: int,
                 device: torch.device) -> FlowRun:
        """A one-sequence run with no model object: a serving engine's request (:mod:`stepsal.vllm`),
        whose effects the engine's own hooks call."""
        run = cls.__new__(cls)
        run.adapter, run.model = None, None
        run._start(flow, 1, capacity, layers, device, None)
        return run

    def _start(self, flow: StepFlow, batch: int, capacity: int, layers: tuple[list[int], list[int]],
               device: torch.device, labels: StepLabels | None) -> None:
        self.flow = flow
        self.oeb_layers, self.smi_layers = layers
        self.batch, self.capacity, self.device = batch, capacity, device
        self.labels = labels or StepLabels(batch, capacity, self.device, flow.smi_at_summary)
        self.values: dict[int, Tensor] = {}
        self.stats = FlowStats.zeros(self.oeb_layers, self.smi_layers, self.device)
        self._groups: dict[torch.device, tuple] = {}  # per-forward OEB inputs per device, see _forward_groups

    @classmethod
    def for_trace(cls, flow: StepFlow, model: Model | ModelAdapter, trace: Trace,
                  layers: tuple[list[int], list[int]] | None = None) -> FlowRun:
        """A run over a trace's layout, for teacher-forced full-sequence forwards."""
        adapter = adapter_for(model)
        labels = StepLabels.from_trace(trace, adapter.device, flow.smi_at_summary)
        return cls(flow, adapter, 1, len(trace), layers, labels)

    # ------------------------------------------------------------ labels (see StepLabels)

    def label(self, rows: list[list[TokenLabel]]) -> None:
        """Record labels for each row: the newest token's, and relabels of earlier marker tokens."""
        self.labels.label(rows)

    def begin_forward(self, offset: int, n_new: int) -> None:
        """The next forward runs positions [offset, offset + n_new) of every row."""
        self.labels.begin_forward(offset, n_new)
        self._groups = {}

    def host_segments(self) -> list[list[int]]:
        return self.labels.host_segments()

    @property
    def any_active(self) -> bool:
        return self.labels.any_active

    @property
    def any_relabel(self) -> bool:
        return self.labels.any_relabel

    @property
    def source(self) -> Tensor:
        return self.labels.source

    @property
    def inject(self) -> Tensor:
        return self.labels.inject

    def hooks(self) -> list[tuple[str, Callable]]:
        """The TransformerLens hook functions of this run (what ``attach_flow`` attaches there)."""
        # TransformerLens hook points: meaningful for a TransformerLens model's run only (as documented)
        return flow_hooks(self, cast(TransformerLensAdapter, self.adapter))

    # ------------------------------------------------------------ effects

    def bridge(self, index: int, pattern: Float[Tensor, "batch head query key"]) -> Tensor | None:
        """OEB on one layer's pattern of the current forward (None: nothing to do), counted in stats."""
        batch, heads, q, k = pattern.shape
        self.labels.check_window(batch, q, k)
        if not self.labels.any_active:
            return None
        query_segment, key_segment, positions, groups = self._forward_groups(q, k, pattern.device)
        edit = odds_equal_bridge(pattern, query_segment, key_segment, positions, self.flow.tau_max, groups)
        self.count_bridge(index, query_segment, edit)
        return edit.pattern

    def bridge_labels(self, q: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Query labels [batch, q] (as processed) and key labels [batch, (q,) k] (as seen) of the current
        forward: what :func:`odds_equal_bridge` takes, for an engine that bridges several runs at once."""
        self.labels.check_window(self.batch, q, k)
        return self._labels_seen(q, k, device)

    def _labels_seen(self, q: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        labels = self.labels
        return (labels.first_segment[:, k - q:k].to(device),
                labels.seen(labels.segment, labels.first_segment, q, k).to(device))

    def count_bridge(self, index: int, query_segment: Tensor, edit: BridgeEdit) -> None:
        """Add one bridge application (this run's rows of ``edit``) to the statistics of OEB layer ``index``."""
        heads = edit.pattern.shape[1]
        with torch.no_grad():
            stats = self.stats
            here = stats.oeb_rows.device  # layers split over GPUs: counters live on the first
            stats.oeb_rows[index] += (((query_segment == THINKING) | (query_segment == SUMMARY)).sum()
                                      * heads).to(here)
            stats.oeb_changed[index] += edit.changed.sum().to(here)
            stats.oeb_before[index] += (edit.mass_before * edit.changed).sum().to(here)  # masks, not
            stats.oeb_after[index] += (edit.mass_after * edit.changed).sum().to(here)    # indexing: no sync

    def _forward_groups(self, q: int, k: int, device: torch.device
                        ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Query labels (as processed), key labels (as seen), query positions and the S/B masks of
        the current forward: the same for every OEB layer, so computed once per forward (and device)."""
        cached = self._groups.get(device)
        if cached is None or cached[1].shape[-1] != k or cached[2].shape[0] != q:
            query_segment, key_segment = self._labels_seen(q, k, device)
            positions = torch.arange(k - q, k, device=device)
            self._groups[device] = (query_segment, key_segment, positions,
                                    bridge_groups(query_segment, key_segment, positions))
        return self._groups[device]

    def remember(self, layer: int, v: Float[Tensor, "batch pos kv_head d_head"]) -> None:
        """Keep the value vectors of the current forward's positions for SMI."""
        self.labels.check_window(v.shape[0], v.shape[1])
        if layer not in self.values:
            self.values[layer] = v.new_zeros(self.batch, self.capacity, *v.shape[2:])
        self.values[layer][:, self.labels.offset:self.labels.offset + v.shape[1]] = v.detach()

    def set_values(self, layer: int, values: Float[Tensor, "batch pos kv_head d_head"]) -> None:
        """The value vectors of positions [0, pos) at once (an engine reads them from its KV cache)."""
        self.values[layer] = values

    def momentum(self, layer: int, q: int, n_heads: int) -> tuple[Tensor, Tensor]:
        """Mean value vector [batch, q, head, d_head] of each injection's source step, and where to inject."""
        labels = self.labels
        start, end = labels.offset, labels.offset + q
        source = labels.source[:, start:end]  # [b, q]
        steps = labels.seen(labels.step, labels.first_step, q, end)
        members = source_members(steps, source, torch.arange(start, end, device=self.device), self.flow.smi_window)
        values = self.values[layer][:, :end]  # [b, k, kv_head, d], on this layer's device
        mean = step_momentum(values, members, n_heads)
        return mean, (labels.inject[:, start:end] & (members.sum(-1) > 0)).to(values.device)

    def inject_momentum(self, index: int, layer: int, x: Tensor, n_heads: int,
                        w_o: OutputWeights | None) -> Tensor | None:
        """SMI on the current forward: x is [b, q, head, d_head] (site z) or [b, q, d_model] with
        ``w_o``; None where nothing is injected. Counted in stats."""
        self.labels.check_window(x.shape[0], x.shape[1])
        if not self.labels.any_inject:
            return None
        mean, where = self.momentum(layer, x.shape[1], n_heads)
        added = momentum_vector(mean.to(x.dtype), self.flow.alpha, w_o)
        norms = added.flatten(2).norm(dim=-1) if w_o is None else added.norm(dim=-1)
        mask = where[..., None, None] if w_o is None else where[..., None]
        with torch.no_grad():
            here = self.stats.smi_count.device
            self.stats.smi_count[index] += where.sum().to(here)
            self.stats.smi_norm[index] += (norms * where).sum().to(here)
        return torch.where(mask, x + added, x)
