"""Layer-by-layer sweeps: apply an intervention at one layer at a time, measure what it changes."""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..backends import transformerlens_adapter
from ..errors import OptionError, StepsalError
from ..model_types import TLModel
from ..options import SWEEP_METRICS as METRICS, check_layer_range, layer_numbers
from ..sites import attention_sites
from ..stats import bootstrap_mean_interval
from ..storage import frame_from_json, frame_to_json, read_json, reading, write_json
from ..traces import SUMMARY, Trace, require_trace
from ..vis.figures import plot_sweep
from ..vis.html import frame_section

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Metric = str | Callable[[Tensor, Tensor, Trace], float]


def _summary_positions(trace: Trace) -> Tensor:
    """Positions whose next token is a summary token (they predict the summary)."""
    summary = (trace.layout.token_segment == SUMMARY).nonzero().flatten()
    return summary[summary > 0] - 1


def measure(metric: Metric, logits: Tensor, plain_logits: Tensor, trace: Trace) -> float:
    """One number per trace: mean next-token loss over all tokens or the summary's, the KL from the
    plain model's next-token distributions at the summary's positions, or ``metric(logits, plain, trace)``."""
    tokens = trace.tokens.to(logits.device)
    if callable(metric):
        value = metric(logits, plain_logits, trace)
        if (isinstance(value, Tensor) and value.numel() != 1) or not isinstance(value, (Tensor, numbers.Real)):
            shape = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise StepsalError(f"the metric must return one number per trace; it returned {shape}.")
        return float(value)
    if metric == "loss":
        return float(F.cross_entropy(logits[:-1].float(), tokens[1:]))
    positions = _summary_positions(trace).to(logits.device)
    if positions.numel() == 0:
        return float("nan")
    if metric == "summary_loss":
        return float(F.cross_entropy(logits[positions].float(), tokens[positions + 1]))
    if metric == "summary_kl":
        log_p = F.log_softmax(plain_logits[positions].float(), -1)
        log_q = F.log_softmax(logits[positions].float(), -1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    raise OptionError(f"unknown metric {metric!r}: use one of {METRICS} or a callable (logits, plain_logits, trace).")


@dataclass(kw_only=True)
class SweepResult:
    """Per (layer, trace): the metric before and after the intervention at that layer."""

    frame: pandas.DataFrame
    metric: str

    def summary(self, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> pandas.DataFrame:
        """Per layer: mean delta over traces with a percentile bootstrap CI (traces resampled)."""
        rng = np.random.default_rng(seed)
        rows = []
        for layer, group in self.frame.groupby("layer", sort=True):
            deltas = group["delta"].to_numpy(dtype=float)
            deltas = deltas[np.isfinite(deltas)]
            if deltas.size == 0:
                rows.append((layer, 0, float("nan"), float("nan"), float("nan")))
                continue
            low, high = bootstrap_mean_interval(deltas, rng, n_boot, confidence)
            rows.append((layer, deltas.size, float(deltas.mean()), low, high))
        return pandas.DataFrame(rows, columns=["layer", "n", "mean_delta", "ci_low", "ci_high"])

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per (layer, trace): layer, trace, before, after, delta (a copy of ``frame``)."""
        return self.frame.copy()

    def plot(self, **kwargs: Any) -> Figure:
        """Mean delta per layer with its CI band: the matplotlib Figure. Keyword arguments go to
        :meth:`summary` (n_boot, confidence, seed)."""
        return plot_sweep(self.summary(**kwargs), self.metric)

    def __repr__(self) -> str:
        return (f"SweepResult({self.frame.layer.nunique()} layers x {self.frame.trace.nunique()} traces, "
                f"metric {self.metric})")

    def _repr_html_(self) -> str:
        summary = self.summary()
        return frame_section(repr(self), summary, fig=plot_sweep(summary, self.metric))

    def save(self, path: str | os.PathLike) -> Path:
        """One JSON file: the metric and the frame (with its dtypes)."""
        return write_json(path, "SweepResult", {"metric": self.metric, "frame": frame_to_json(self.frame)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepResult:
        with reading(path, "SweepResult"):
            data = read_json(path, "SweepResult")
            return cls(frame=frame_from_json(data["frame"]), metric=data["metric"])


def layer_sweep(model: TLModel, traces: Sequence[Trace],
                intervention: Callable[[int], AbstractContextManager] | Callable[[int, Trace], AbstractContextManager],
                metric: Metric = "summary_loss", layers: Sequence[int] | None = None,
                progress: bool = True) -> SweepResult:
    """For each layer, run every trace with ``intervention(layer)`` entered (a knockout at that layer,
    ``StepFlow(oeb_layers=[layer], smi_layers=[]).attached``-style hooks, your own hooks) and compare
    ``metric`` with the unmodified model.

    Args:
        intervention: ``layer -> context manager``, or ``(layer, trace) -> context manager`` (told
            apart by its number of parameters).
        metric: "loss", "summary_loss" (default), "summary_kl" or ``fn(logits, plain_logits, trace)``.
        layers: default: every layer with a usable attention pattern.
    """
    adapter = transformerlens_adapter(model, "layer_sweep")
    if isinstance(traces, Trace) or not isinstance(traces, Sequence) or not traces:
        raise StepsalError(f"traces must be a non-empty list of Trace; got {type(traces).__name__}"
                           + (" (pass [trace])." if isinstance(traces, Trace) else "."))
    for trace in traces:
        require_trace(trace, "layer_sweep")
    if layers is None:
        layers = attention_sites(model).attention_layers
    else:
        layers = layer_numbers(layers)
        check_layer_range(layers, adapter.n_layers)
        if not layers:
            raise OptionError(f"layers must name at least one layer of 0..{adapter.n_layers - 1}; got [].")
    plain = []
    with torch.no_grad():
        for trace in traces:
            plain.append(adapter.forward(trace.tokens[None])[0])
    rows = []
    work = [(layer, index) for layer in layers for index in range(len(traces))]
    for layer, index in tqdm(work, desc="layer sweep", disable=not progress):
        trace = traces[index]
        with torch.no_grad(), _enter(intervention, layer, trace):
            logits = adapter.forward(trace.tokens[None])[0]
        before = measure(metric, plain[index], plain[index], trace)
        after = measure(metric, logits, plain[index], trace)
        rows.append((layer, index, before, after, after - before))
    frame = pandas.DataFrame(rows, columns=["layer", "trace", "before", "after", "delta"])
    return SweepResult(frame=frame,
                       metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"))


def _enter(intervention: Callable, layer: int, trace: Trace) -> AbstractContextManager:
    """``intervention(layer, trace)`` when it takes two arguments, else ``intervention(layer)``."""
    try:
        takes_trace = len(inspect.signature(intervention).parameters) >= 2
    except (TypeError, ValueError):  # builtins without a signature
        takes_trace = False
    manager = intervention(layer, trace) if takes_trace else intervention(layer)
    if not (hasattr(manager, "__enter__") and hasattr(manager, "__exit__")):
        raise StepsalError(f"the intervention must return a context manager (hooks attached on enter, removed on "
                           f"exit, like stepsal.knockout(...)); intervention({layer}) returned "
                           f"{type(manager).__name__}.")
    return manager
