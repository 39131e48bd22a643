"""Where StepFlow acts: the segment and thinking step of every row and position, as the model saw them.

:class:`StepLabels` is filled token by token during generation (from the tracker's
:class:`~stepsal.stepflow.tracker.TokenLabel`) or at once from a trace. A marker spelled over several
tokens relabels its earlier tokens when it completes; queries keep the labels they were processed
with, and see a key's new label only from the relabel on, so cached and uncached decoding agree.
Tensors live on the model's device; host copies answer "does anything act in this forward?"
without a device sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import StepsalError
from ..segments import SUMMARY, THINKING
from ..traces import Trace
from .tracker import TokenLabel


class StepLabels:
    """Labels of ``batch`` rows of up to ``capacity`` positions, and the forward being run."""

    def __init__(self, batch: int, capacity: int, device: torch.device, smi_at_summary: bool = False):
        self.batch, self.capacity, self.device, self.smi_at_summary = batch, capacity, device, smi_at_summary

        def full(value: int | bool, dtype: torch.dtype) -> Tensor:
            return torch.full((batch, capacity), value, dtype=dtype, device=device)

        # labels as first given (= as seen when the position was processed), the current ones, and
        # when the relabel happened: a query at position t sees a key's current label iff t >= that time
        self.first_segment = full(-1, torch.long)
        self.first_step = full(-1, torch.long)
        self.segment = full(-1, torch.long)
        self.step = full(-1, torch.long)
        self.relabel_time = full(torch.iinfo(torch.long).max, torch.long)
        self.source = full(-1, torch.long)  # the step whose mean SMI injects here (-1: none)
        self.inject = full(False, torch.bool)
        self.any_relabel = False
        self.offset, self.n_new = 0, 0  # the forward being run covers [offset, offset + n_new)
        self.any_active = False  # some query of the current forward is in thinking or summary
        self.any_inject = False  # SMI acts somewhere in the current forward
        self._host_segments: list[list[int]] = [[] for _ in range(batch)]
        self._host_inject: list[list[bool]] = [[] for _ in range(batch)]
        self._last_step = [-1] * batch

    @classmethod
    def from_trace(cls, trace: Trace, device: torch.device, smi_at_summary: bool = False) -> StepLabels:
        """Labels of a trace's layout, for teacher-forced full-sequence forwards (positions [0, T))."""
        labels = cls(1, len(trace), device, smi_at_summary)
        thinking = [s for s in trace.layout.steps if s.segment == THINKING]
        rows = [TokenLabel(position, segment, -1, False)
                for position, segment in enumerate(trace.layout.token_segment.tolist())]
        for index, step in enumerate(thinking):
            for position in range(*step.token_span):
                rows[position].step = index
            rows[step.token_span[0]].inject = index >= 1
        marker_end = trace.marker_end_token(SUMMARY)  # generation acts where the marker completes
        if smi_at_summary and marker_end is not None and thinking:
            rows[marker_end].inject = True
        labels.label([rows])
        labels.begin_forward(0, len(trace))
        return labels

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
            wanted = [lab.inject and (lab.segment == THINKING or self.smi_at_summary) for _, lab, _ in fresh]
            source = [(lab.step - 1 if lab.segment == THINKING else self._last_step[b]) if inject else -1
                      for (b, lab, _), inject in zip(fresh, wanted, strict=True)]
            rows_index, cols = self._index(fresh)
            values = torch.tensor([[lab.segment, lab.step, src, int(src >= 0)]
                                   for (_, lab, _), src in zip(fresh, source, strict=True)], device=self.device)
            for tensor, column in ((self.first_segment, 0), (self.segment, 0), (self.first_step, 1),
                                   (self.step, 1), (self.source, 2)):
                tensor[rows_index, cols] = values[:, column]
            self.inject[rows_index, cols] = values[:, 3].bool()
            for (b, lab, _), src in zip(fresh, source, strict=True):
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

    def _index(self, entries: list[tuple[int, TokenLabel, int]]) -> tuple[Tensor, Tensor]:
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
        window = [(segs[offset:offset + n_new], injs[offset:offset + n_new])  # processing-time labels
                  for segs, injs in zip(self._host_segments, self._host_inject, strict=True)]
        self.any_active = any(s in (THINKING, SUMMARY) for segs, _ in window for s in segs)
        self.any_inject = any(any(injs) for _, injs in window)

    def check_window(self, batch: int, q: int, k: int | None = None) -> None:
        """Refuse a forward that is not the one announced by :meth:`begin_forward`."""
        if batch != self.batch or q != self.n_new or (k is not None and k - q != self.offset):
            raise StepsalError(
                f"StepFlow expected a forward over positions [{self.offset}, {self.offset + self.n_new}) "
                f"of {self.batch} row(s); the model ran {batch} row(s), {q} new of {k or q} positions. "
                "Run the forward over the trace's tokens, or use stepsal.generate for generation.")
