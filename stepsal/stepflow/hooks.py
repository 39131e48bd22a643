"""StepFlow as TransformerLens hook functions over a shared per-run state.

A :class:`FlowRun` holds, for every row and absolute position, the segment, the thinking step,
whether SMI acts there and which earlier step it draws from. Hooks are plain ``fn(tensor, hook)``
closures bound to a layer: OEB on ``hook_pattern``, SMI on ``hook_v`` (to remember values) and on
``hook_resid_post`` or ``hook_z`` (to inject). The forward being run covers positions
``[offset, offset + q)``; the pattern hook checks that against its own shape (k - q = offset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ..model_types import TLModel
from ..errors import StepsalError
from ..backends import Model, ModelAdapter, adapter_for
from ..hookpoints import hook_name
from ..traces import SUMMARY, THINKING, Trace
from ..vis.html import frame_section
from ..vis.tables import flow_stats_frame, flow_stats_text
from .oeb import bridge_groups, odds_equal_bridge
from .tracker import TokenLabel

if TYPE_CHECKING:
    from .config import StepFlow


@dataclass
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
    def zeros(cls, oeb_layers: list[int], smi_layers: list[int], device: torch.device) -> "FlowStats":
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(oeb_layers, smi_layers, z(len(oeb_layers)), z(len(oeb_layers)), z(len(oeb_layers)),
                   z(len(oeb_layers)), z(len(smi_layers)), z(len(smi_layers)))

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers per layer (one host transfer per counter)."""
        rows, changed, before, after, count, norm = (t.tolist() for t in (
            self.oeb_rows, self.oeb_changed, self.oeb_before, self.oeb_after, self.smi_count, self.smi_norm))
        return {
            "oeb": {layer: {"rows": int(rows[i]), "changed": int(changed[i]),
                            "mass_before": before[i] / changed[i] if changed[i] else None,
                            "mass_after": after[i] / changed[i] if changed[i] else None}
                    for i, layer in enumerate(self.oeb_layers)},
            "smi": {layer: {"injections": int(count[i]), "mean_norm": norm[i] / count[i] if count[i] else None}
                    for i, layer in enumerate(self.smi_layers)},
        }

    def to_dataframe(self) -> "pandas.DataFrame":  # noqa: F821
        """One row per (part, layer): OEB rows and bridge mass, SMI injections."""
        return flow_stats_frame(self.to_dict())

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


class FlowRun:
    """State and hooks of one StepFlow run (a generation, or teacher-forced forwards over a trace)."""

    def __init__(self, flow: StepFlow, model: Model | ModelAdapter, batch: int, capacity: int,
                 layers: tuple[list[int], list[int]] | None = None):
        """``layers``: (OEB, SMI) layers when the caller has them already (else asked of the model)."""
        self.adapter = adapter_for(model)
        self.flow, self.model = flow, self.adapter.model
        self.oeb_layers, self.smi_layers = self.adapter.flow_layers(flow) if layers is None else layers
        device = self.adapter.device
        self.value_layout = self.adapter.value_layout()
        self.batch, self.capacity, self.device = batch, capacity, device
        full = lambda value, dtype: torch.full((batch, capacity), value, dtype=dtype, device=device)  # noqa: E731
        # Labels as first given (= as seen when the position was processed), the current ones (a
        # marker split across tokens relabels its earlier tokens when it completes), and when the
        # relabel happened: a query at position t sees a key's current label iff t >= relabel time.
        self.first_segment = full(-1, torch.long)
        self.first_step = full(-1, torch.long)
        self.segment = full(-1, torch.long)
        self.step = full(-1, torch.long)
        self.relabel_time = full(torch.iinfo(torch.long).max, torch.long)
        self.source = full(-1, torch.long)  # the step whose mean SMI injects here (-1: none)
        self.inject = full(False, torch.bool)
        self.any_relabel = False
        self.offset, self.n_new = 0, 0
        self._groups: dict[torch.device, tuple] = {}  # per-forward OEB inputs per device, see _forward_groups
        self.any_active = False  # some query of the current forward is in thinking or summary
        self.any_inject = False  # SMI acts somewhere in the current forward
        self.values: dict[int, Tensor] = {}
        self.stats = FlowStats.zeros(self.oeb_layers, self.smi_layers, device)
        self._host_segments: list[list[int]] = [[] for _ in range(batch)]
        self._host_inject: list[list[bool]] = [[] for _ in range(batch)]
        self._last_step = [-1] * batch

    # ------------------------------------------------------------ labels

    @classmethod
    def for_trace(cls, flow: StepFlow, model: Model | ModelAdapter, trace: Trace,
                  layers: tuple[list[int], list[int]] | None = None) -> "FlowRun":
        """Labels from a trace's layout, for teacher-forced full-sequence forwards."""
        run = cls(flow, model, 1, len(trace), layers)
        thinking = [s for s in trace.layout.steps if s.segment == THINKING]
        labels = []
        for position, segment in enumerate(trace.layout.token_segment.tolist()):
            labels.append(TokenLabel(position, segment, -1, False))
        for index, step in enumerate(thinking):
            for position in range(*step.token_span):
                labels[position].step = index
            labels[step.token_span[0]].inject = index >= 1
        marker_end = trace.marker_end_token(SUMMARY)  # generation acts where the marker completes
        if flow.smi_at_summary and marker_end is not None and thinking:
            labels[marker_end].inject = True
        run.label([labels])
        run.begin_forward(0, len(trace))
        return run

    def label(self, rows: list[list[TokenLabel]]) -> None:
        """Record labels for each row: the newest token's, and relabels of earlier marker tokens."""
        fresh, relabels = [], []
        for b, labels in enumerate(rows):
            now = max((lab.position for lab in labels), default=-1)
            for lab in labels:
                if lab.position >= self.capacity:
                    raise StepsalError(f"position {lab.position} beyond the run's capacity {self.capacity}.")
                known = lab.position < len(self._host_segments[b])
                (relabels if known else fresh).append((b, lab, now))
                if lab.segment == THINKING and lab.step >= 0:
                    self._last_step[b] = max(self._last_step[b], lab.step)
        if fresh:
            wanted = [lab.inject and (lab.segment == THINKING or self.flow.smi_at_summary) for _, lab, _ in fresh]
            source = [(lab.step - 1 if lab.segment == THINKING else self._last_step[b]) if inject else -1
                      for (b, lab, _), inject in zip(fresh, wanted)]
            rows_index, cols = self._index(fresh)
            values = torch.tensor([[lab.segment, lab.step, src, int(src >= 0)]
                                   for (_, lab, _), src in zip(fresh, source)], device=self.device)
            for tensor, column in ((self.first_segment, 0), (self.segment, 0), (self.first_step, 1),
                                   (self.step, 1), (self.source, 2)):
                tensor[rows_index, cols] = values[:, column]
            self.inject[rows_index, cols] = values[:, 3].bool()
            for (b, lab, _), src in zip(fresh, source):
                self._host_segments[b].append(lab.segment)
                self._host_inject[b].append(src >= 0)
        if relabels:  # processing-time labels, injections and sources stay as they were
            rows_index, cols = self._index(relabels)
            values = torch.tensor([[lab.segment, lab.step, now] for _, lab, now in relabels], device=self.device)
            self.segment[rows_index, cols] = values[:, 0]
            self.step[rows_index, cols] = values[:, 1]
            self.relabel_time[rows_index, cols] = values[:, 2]
            self.any_relabel = True

    def host_segments(self) -> list[list[int]]:
        """Per row, the segment of each position as first labelled (host copy, no device sync)."""
        return self._host_segments

    def _index(self, entries: list) -> tuple[Tensor, Tensor]:
        rows_index = torch.tensor([b for b, _, _ in entries], device=self.device)
        return rows_index, torch.tensor([lab.position for _, lab, _ in entries], device=self.device)

    def seen(self, current: Tensor, first: Tensor, q: int, k: int) -> Tensor:
        """Labels of keys [0, k) as the queries [k - q, k) saw them: [batch, key] or [batch, query, key]."""
        if not self.any_relabel:
            return current[:, :k]
        times = torch.arange(k - q, k, device=self.device)[None, :, None]
        return torch.where(times >= self.relabel_time[:, None, :k], current[:, None, :k], first[:, None, :k])

    def begin_forward(self, offset: int, n_new: int) -> None:
        """The next forward runs positions [offset, offset + n_new) of every row."""
        self.offset, self.n_new = offset, n_new
        self._groups = {}
        window = [(segs[offset:offset + n_new], injs[offset:offset + n_new])  # processing-time labels
                  for segs, injs in zip(self._host_segments, self._host_inject)]
        self.any_active = any(s in (THINKING, SUMMARY) for segs, _ in window for s in segs)
        self.any_inject = any(any(injs) for _, injs in window)

    # ------------------------------------------------------------ hooks

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, function) pairs; order does not matter (each hook point gets one function)."""
        hooks = [(hook_name(layer, "pattern"), self._oeb_hook(i)) for i, layer in enumerate(self.oeb_layers)]
        if self.flow.alpha > 0:
            for i, layer in enumerate(self.smi_layers):
                hooks.append((hook_name(layer, "v"), self._remember_values(layer)))
                hooks.append((hook_name(layer, self.flow.smi_site), self._smi_hook(i, layer)))
        return hooks

    def _check_window(self, batch: int, q: int, k: int | None = None) -> None:
        if batch != self.batch or q != self.n_new or (k is not None and k - q != self.offset):
            raise StepsalError(
                f"StepFlow expected a forward over positions [{self.offset}, {self.offset + self.n_new}) "
                f"of {self.batch} row(s); the model ran {batch} row(s), {q} new of {k or q} positions. "
                "Run the forward over the trace's tokens, or use stepsal.generate for generation.")

    def _oeb_hook(self, index: int) -> Callable:
        def odds_equal_bridge_hook(pattern: Float[Tensor, "batch head query key"], hook: Any) -> Tensor | None:
            return self.bridge(index, pattern)

        return odds_equal_bridge_hook

    def bridge(self, index: int, pattern: Float[Tensor, "batch head query key"]) -> Tensor | None:
        """OEB on one layer's pattern of the current forward (None: nothing to do), counted in stats."""
        batch, heads, q, k = pattern.shape
        self._check_window(batch, q, k)
        if not self.any_active:
            return None
        query_segment, key_segment, positions, groups = self._forward_groups(q, k, pattern.device)
        edit = odds_equal_bridge(pattern, query_segment, key_segment, positions, self.flow.tau_max, groups)
        with torch.no_grad():
            stats = self.stats
            here = stats.oeb_rows.device  # layers split over GPUs: counters live on the first
            stats.oeb_rows[index] += (((query_segment == THINKING) | (query_segment == SUMMARY)).sum()
                                      * heads).to(here)
            stats.oeb_changed[index] += edit.changed.sum().to(here)
            stats.oeb_before[index] += (edit.mass_before * edit.changed).sum().to(here)  # masks, not
            stats.oeb_after[index] += (edit.mass_after * edit.changed).sum().to(here)    # indexing: no sync
        return edit.pattern

    def _forward_groups(self, q: int, k: int, device: torch.device
                        ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Query labels (as processed), key labels (as seen), query positions and the S/B masks of
        the current forward: the same for every OEB layer, so computed once per forward (and device)."""
        cached = self._groups.get(device)
        if cached is None or cached[1].shape[-1] != k or cached[2].shape[0] != q:
            query_segment = self.first_segment[:, k - q:k].to(device)
            key_segment = self.seen(self.segment, self.first_segment, q, k).to(device)
            positions = torch.arange(k - q, k, device=device)
            self._groups[device] = (query_segment, key_segment, positions,
                                    bridge_groups(query_segment, key_segment, positions))
        return self._groups[device]

    def _remember_values(self, layer: int) -> Callable:
        head_first = self.value_layout.get(layer) == "head_pos"  # MLA adapters: [batch, head, pos, d]

        def remember_values(v: Tensor, hook: Any) -> None:
            self.remember(layer, v.transpose(1, 2) if head_first else v)

        return remember_values

    def remember(self, layer: int, v: Float[Tensor, "batch pos kv_head d_head"]) -> None:
        """Keep the value vectors of the current forward's positions for SMI."""
        self._check_window(v.shape[0], v.shape[1])
        if layer not in self.values:
            self.values[layer] = v.new_zeros(self.batch, self.capacity, *v.shape[2:])
        self.values[layer][:, self.offset:self.offset + v.shape[1]] = v.detach()

    def momentum(self, layer: int, q: int, n_heads: int) -> tuple[Tensor, Tensor]:
        """Mean value vector [batch, q, head, d_head] of each injection's source step, and where to inject."""
        start, end = self.offset, self.offset + q
        source = self.source[:, start:end]  # [b, q]
        keys = torch.arange(end, device=self.device)
        earlier = keys[None, :] < torch.arange(start, end, device=self.device)[:, None]  # [q, k]
        steps = self.seen(self.step, self.first_step, q, end)
        steps = steps if steps.dim() == 3 else steps[:, None, :]
        members = (steps == source[:, :, None]) & earlier & (source[:, :, None] >= 0)
        if self.flow.smi_window != "step":  # only the last w tokens of the source step
            from_end = members.flip(-1).cumsum(-1).flip(-1)
            members &= from_end <= self.flow.smi_window
        counts = members.sum(-1)
        values = self.values[layer][:, :end]  # [b, k, kv_head, d], on this layer's device
        mean = torch.einsum("bqk,bknd->bqnd", members.to(values.device, values.dtype), values)
        mean = mean / counts.clamp(min=1)[..., None, None].to(values.device, values.dtype)
        mean = mean.repeat_interleave(n_heads // values.shape[2], dim=2)  # grouped KV heads -> query heads
        return mean, (self.inject[:, start:end] & (counts > 0)).to(values.device)

    def _smi_hook(self, index: int, layer: int) -> Callable:
        def step_momentum_injection(x: Tensor, hook: Any) -> Tensor | None:
            self._check_window(x.shape[0], x.shape[1])
            if not self.any_inject:  # before fetching W_O (a property on the bridge): most decode steps
                return None
            w_o = output_weights(self.model, layer) if self.flow.smi_site != "z" else None
            return self.inject_momentum(index, layer, x, self.adapter.n_heads, w_o)

        return step_momentum_injection

    def inject_momentum(self, index: int, layer: int, x: Tensor, n_heads: int,
                        w_o: Float[Tensor, "head d_head d_model"] | None) -> Tensor | None:
        """SMI on the current forward: x is [b, q, head, d_head] (site z) or [b, q, d_model] with
        ``w_o``; None where nothing is injected. Counted in stats."""
        self._check_window(x.shape[0], x.shape[1])
        if not self.any_inject:
            return None
        alpha = self.flow.alpha
        mean, where = self.momentum(layer, x.shape[1], n_heads)
        if w_o is None:
            added = alpha * mean.to(x.dtype)  # [b, q, head, d_head]
            norms = added.flatten(2).norm(dim=-1)
            mask = where[..., None, None]
        else:
            added = alpha * torch.einsum("bqhd,hdm->bqm", mean.to(x.dtype), w_o.to(x.dtype))
            norms = added.norm(dim=-1)
            mask = where[..., None]
        with torch.no_grad():
            here = self.stats.smi_count.device
            self.stats.smi_count[index] += where.sum().to(here)
            self.stats.smi_norm[index] += (norms * where).sum().to(here)
        return torch.where(mask, x + added, x)


def output_weights(model: TLModel, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """W_O of one layer as [head, d_head, d_model] on either backend."""
    return model.blocks[layer].attn.W_O
