"""Shallow Lock-in and Deep Decay measures, and correct-vs-wrong comparisons (docs/paper.md section 5).

All measures read the row-normalised maps (each query step's row is a distribution over keys):

- local share: mean over thinking rows of the mass on {self, previous step};
- question share: mean over thinking rows of the mass on the question;
- summary->thinking share: mean over summary rows of the mass on thinking steps;
- summary self share: mean over summary rows of the mass on summary steps;
- recency: of the summary's thinking mass, the share on the last 3 thinking steps.

Per trace, bands of the computed layers: shallow = the bottom quarter (at least one layer), deep =
the top half (at least two layers, so that the decay slope is defined). Groups are compared on
per-trace values (never on flattened layers x samples) with bootstrap confidence intervals.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .errors import OptionError, StepsalError, StepsalWarning
from .options import whole_number
from .stats import bootstrap_indices, check_confidence, percentile_interval
from .storage import floats, plain
from .traces import QUESTION, SUMMARY, THINKING
from .vis.figures import plot_group_curves, plot_layer_measures
from .vis.html import frame_section, metrics_html
from .vis.tables import comparison_frame, comparison_text, layer_frame, text_table, wide

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

LAYER_MEASURES = ("local_share", "question_share", "summary_thinking_share", "summary_self_share", "recency")
TRACE_MEASURES = ("lock_in", "question_share", "summary_thinking", "summary_self", "recency", "decay")
RECENT_STEPS = 3
MIN_TRACES = 10  # per group, below which a comparison is descriptive only (no significance claims)
GROUP_MEASURES = ("local_share", "question_share", "summary_thinking_share", "recency")  # GroupComparison.plot


def layer_bands(n_layers: int) -> tuple[slice, slice]:
    """(shallow, deep) positions among ``n_layers`` computed layers: the bottom quarter (at least one)
    and the top half (at least two, where there are two)."""
    n = n_layers
    return slice(0, max(1, n // 4)), slice(n - max(2, n // 2), n) if n >= 2 else slice(0, n)


@dataclass
class LayerMetrics:
    """Per-layer measures (NaN where a trace has no rows of the kind, e.g. no summary)."""

    layers: list[int]
    local_share: Float[Tensor, " layer"]
    question_share: Float[Tensor, " layer"]
    summary_thinking_share: Float[Tensor, " layer"]
    summary_self_share: Float[Tensor, " layer"]
    recency: Float[Tensor, " layer"]

    def bands(self) -> tuple[slice, slice]:
        return layer_bands(len(self.layers))

    def per_trace(self) -> dict[str, float]:
        """One number per measure for this trace (band means, and the decay slope over deep layers)."""
        shallow, deep = self.bands()
        depth = torch.tensor(self.layers[deep], dtype=torch.float64)
        share = self.summary_thinking_share[deep].double()
        decay = float("nan")
        if depth.numel() >= 2 and torch.isfinite(share).all():
            centred = depth - depth.mean()
            decay = float((centred * (share - share.mean())).sum() / (centred ** 2).sum())
        return {
            "lock_in": float(self.local_share[shallow].mean()),
            "question_share": float(self.question_share[shallow].mean()),
            "summary_thinking": float(self.summary_thinking_share[deep].mean()),
            "summary_self": float(self.summary_self_share[deep].mean()),
            "recency": float(self.recency[deep].mean()),
            "decay": decay,
        }

    def to_dataframe(self) -> pandas.DataFrame:
        """Long format: one row per (layer, measure)."""
        return layer_frame(self.layers, {measure: getattr(self, measure) for measure in LAYER_MEASURES})

    def plot(self, measures: Sequence[str] = LAYER_MEASURES, **kwargs: Any) -> Figure:
        """The per-layer measures as curves over the layers: the matplotlib Figure."""
        measures = known_measures(measures, LAYER_MEASURES)
        return plot_layer_measures(self.layers, {measure: getattr(self, measure) for measure in measures},
                                   title="per-layer measures (row-normalised maps)", **kwargs)

    def __repr__(self) -> str:
        if not self.layers:
            return "LayerMetrics(no layers)"
        span = f"{self.layers[0]}..{self.layers[-1]}"
        return f"LayerMetrics({len(self.layers)} layers {span}: {', '.join(LAYER_MEASURES)})"

    def _repr_html_(self) -> str:
        return metrics_html(repr(self), self.per_trace(), wide(self.to_dataframe()))

    def table(self) -> str:
        """A fixed-width text table, one row per layer."""
        return text_table(wide(self.to_dataframe()), digits=3, headers={
            "local_share": "local", "question_share": "question", "summary_thinking_share": "sum->thk",
            "summary_self_share": "sum self"})


def _mean_rows(values: Tensor) -> Tensor:
    """Mean over the last axis, NaN when empty."""
    if values.shape[-1] == 0:
        return torch.full(values.shape[:-1], float("nan"))
    return values.mean(-1)


def require_unsigned(result, what: str) -> None:
    """Refuse signed maps (rule='ag_signed'): the measures read each row as a distribution."""
    rule = getattr(result, "rule", None)
    if rule == "ag_signed":
        raise OptionError(
            f"{what} reads saliency maps as distributions (shares that add up to 1), but this result has "
            "rule='ag_signed', whose signed entries cancel and are no shares. Compute the measures on "
            "rule='ag' (step_saliency(..., rule='ag')), or use result.normalized(...) yourself.")


def layer_metrics(result) -> LayerMetrics:
    """Per-layer measures of a :class:`~stepsal.saliency.StepSaliency` (not of signed maps:
    rule='ag_signed' is refused)."""
    require_unsigned(result, "metrics()")
    rows = result.normalized("row").double()  # [L, S, S]
    layout = result.layout
    question, thinking, summary = (layout.steps_of(s) for s in (QUESTION, THINKING, SUMMARY))
    think_idx = torch.tensor(thinking, dtype=torch.long)
    # thinking rows: self + previous step, and the question column
    own = rows[:, think_idx, think_idx]
    has_previous = think_idx >= 1  # a trace without question tokens starts with a thinking step
    previous = rows[:, think_idx, (think_idx - 1).clamp(min=0)] * has_previous
    local = _mean_rows(own + previous)
    if question:
        q_share = _mean_rows(rows[:, think_idx][:, :, question].sum(-1))
    else:
        q_share = torch.full(local.shape, float("nan"), dtype=rows.dtype)
    # summary rows
    sum_idx = torch.tensor(summary, dtype=torch.long)
    summary_rows = rows[:, sum_idx]  # [L, n_summary, S]
    to_thinking = summary_rows[:, :, think_idx].sum(-1)
    to_summary = summary_rows[:, :, sum_idx].sum(-1)
    recent = summary_rows[:, :, think_idx[-RECENT_STEPS:]].sum(-1)
    recency = torch.where(to_thinking > 0, recent / to_thinking.clamp(min=1e-300), torch.nan)
    return LayerMetrics(layers=list(result.layers), local_share=local.float(), question_share=q_share.float(),
                        summary_thinking_share=_mean_rows(to_thinking).float(),
                        summary_self_share=_mean_rows(to_summary).float(), recency=_mean_rows(recency).float())


# ---------------------------------------------------------------- the reference code's measures

REFERENCE_MEASURES = ("final_block_intensity", "analysis_block_intensity", "final_heat_anomaly")


def reference_measures(result) -> dict[str, Float[Tensor, " layer"]]:
    """The paper's code's per-layer measures, on block-normalised maps: the mean of the summary x
    summary block (``final_block_intensity``), of the thinking x thinking block
    (``analysis_block_intensity``) and their ratio (``final_heat_anomaly``, about 1 when normal).
    Computed here on exact token -> step alignment (the reference's mapping drifts). NaN where a
    trace has no summary."""
    require_unsigned(result, "reference_measures()")
    maps = result.normalized("block").double()  # [L, S, S]
    layout = result.layout
    thinking, summary = (torch.tensor(layout.steps_of(s), dtype=torch.long) for s in (THINKING, SUMMARY))

    def block_mean(steps: Tensor) -> Tensor:
        if steps.numel() == 0:
            return torch.full((maps.shape[0],), float("nan"), dtype=maps.dtype)
        return maps[:, steps][:, :, steps].mean((-2, -1))

    final, analysis = block_mean(summary), block_mean(thinking)
    return {"final_block_intensity": final.float(), "analysis_block_intensity": analysis.float(),
            "final_heat_anomaly": (final / analysis).float()}


# ---------------------------------------------------------------- group comparison


def hedges_g(a: np.ndarray, b: np.ndarray) -> np.ndarray | np.floating:
    """Hedges' g of b - a along the last axis (bias-corrected standardised mean difference)."""
    na, nb = a.shape[-1], b.shape[-1]
    pooled = np.sqrt(((na - 1) * a.var(-1, ddof=1) + (nb - 1) * b.var(-1, ddof=1)) / (na + nb - 2))
    correction = 1 - 3 / (4 * (na + nb) - 9)
    with np.errstate(divide="ignore", invalid="ignore"):
        return correction * (b.mean(-1) - a.mean(-1)) / pooled


@dataclass(kw_only=True)
class Comparison:
    """One measure compared between group A (e.g. correct) and group B (e.g. wrong)."""

    measure: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    diff_ci: tuple[float, float]
    hedges_g: float
    g_ci: tuple[float, float]
    dropped: int = 0  # traces without this measure (NaN), reported, not silently lost


@dataclass(kw_only=True)
class GroupComparison:
    """Two groups of traces compared measure by measure (:func:`compare_groups`): ``rows`` one
    :class:`Comparison` per per-trace measure; per-layer means and differences with CIs when every
    trace has the same layers."""

    label_a: str
    label_b: str
    rows: list[Comparison]
    confidence: float
    n_boot: int
    layer_diff: dict[str, np.ndarray] = field(default_factory=dict)     # measure -> [layer] mean_b - mean_a
    layer_diff_ci: dict[str, np.ndarray] = field(default_factory=dict)  # measure -> [2, layer]
    layers: list[int] = field(default_factory=list)  # shared by all traces (else no per-layer curves)
    layer_mean: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # group -> measure -> [layer]
    layer_mean_ci: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # group -> measure -> [2, layer]

    @property
    def descriptive_only(self) -> bool:
        """A group has fewer than MIN_TRACES traces: the intervals describe, they support no claims."""
        return min((min(r.n_a, r.n_b) for r in self.rows), default=0) < MIN_TRACES

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per per-trace measure: group means, difference and Hedges' g with CIs."""
        return comparison_frame([vars(r) for r in self.rows], self.label_a, self.label_b, self.confidence,
                                self.n_boot)

    def plot(self, measures: Sequence[str] | None = None, **kwargs: Any) -> Figure:
        """Per-layer curves of both groups with CIs: the matplotlib Figure (one panel per measure)."""
        measures = known_measures(measures or GROUP_MEASURES, LAYER_MEASURES)
        return plot_group_curves(self.layers, self.layer_mean, self.layer_mean_ci, measures,
                                 self.confidence, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain values (lists for arrays; see :mod:`stepsal.storage` for NaN and inf)."""
        return plain({"label_a": self.label_a, "label_b": self.label_b, "rows": [vars(r) for r in self.rows],
                      "confidence": self.confidence, "n_boot": self.n_boot, "layer_diff": self.layer_diff,
                      "layer_diff_ci": self.layer_diff_ci, "layers": self.layers, "layer_mean": self.layer_mean,
                      "layer_mean_ci": self.layer_mean_ci})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupComparison:
        """The comparison :meth:`to_dict` described; anything else is a :class:`StepsalError` naming what is
        missing."""
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise StepsalError(f"not a GroupComparison's to_dict ({what}).") from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> GroupComparison:
        def arrays(by_measure: dict[str, Any]) -> dict[str, np.ndarray]:
            return {measure: np.array(floats(values), dtype=float) for measure, values in by_measure.items()}

        rows = [Comparison(measure=r["measure"], n_a=r["n_a"], n_b=r["n_b"], mean_a=floats(r["mean_a"]),
                           mean_b=floats(r["mean_b"]), diff=floats(r["diff"]), diff_ci=tuple(floats(r["diff_ci"])),
                           hedges_g=floats(r["hedges_g"]), g_ci=tuple(floats(r["g_ci"])), dropped=r["dropped"])
                for r in data["rows"]]
        return cls(label_a=data["label_a"], label_b=data["label_b"], rows=rows, confidence=data["confidence"],
                   n_boot=data["n_boot"], layer_diff=arrays(data["layer_diff"]),
                   layer_diff_ci=arrays(data["layer_diff_ci"]), layers=list(data["layers"]),
                   layer_mean={group: arrays(by) for group, by in data["layer_mean"].items()},
                   layer_mean_ci={group: arrays(by) for group, by in data["layer_mean_ci"].items()})

    def __repr__(self) -> str:
        n_a, n_b = (max((getattr(r, n) for r in self.rows), default=0) for n in ("n_a", "n_b"))
        return (f"GroupComparison({self.label_a} vs {self.label_b}: {n_a} vs {n_b} traces, {len(self.rows)} measures, "
                f"{round(self.confidence * 100)}% bootstrap CIs over {self.n_boot} resamples"
                + (f"; fewer than {MIN_TRACES} traces in a group: descriptive only, no significance claims)"
                   if self.descriptive_only else ")"))

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.to_dataframe())

    def table(self) -> str:
        note = (f"(fewer than {MIN_TRACES} traces in a group: descriptive only, no significance claims)\n"
                if self.descriptive_only else "")
        return note + comparison_text(self.to_dataframe())


def known_measures(measures: Sequence[str], known: Sequence[str]) -> list[str]:
    """``measures`` as a list, each one of ``known`` (one name is a list of one)."""
    chosen = [measures] if isinstance(measures, str) else list(measures)
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise OptionError(f"unknown measures {unknown or chosen}: use some of {tuple(known)}.")
    return chosen


def compare_groups(group_a: Sequence, group_b: Sequence, *, labels: tuple[str, str] = ("correct", "wrong"),
                   n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> GroupComparison:
    """Compare two groups of traces (StepSaliency results or LayerMetrics) measure by measure.

    Each trace contributes one value per measure; differences are B - A. Confidence intervals are
    percentile bootstraps over traces, resampled within each group.
    """
    if not (isinstance(labels, (tuple, list)) and len(labels) == 2 and all(isinstance(x, str) for x in labels)):
        raise StepsalError(f"labels must be two names, like ('correct', 'wrong'); got {labels!r}.")
    whole_number(n_boot, "n_boot", minimum=1)
    check_confidence(confidence)
    for name, group in ((labels[0], group_a), (labels[1], group_b)):
        kinds = {type(m).__name__ for m in group
                 if not (isinstance(m, LayerMetrics) or callable(getattr(m, "metrics", None)))}
        if isinstance(group, (str, bytes)) or kinds:
            raise StepsalError(f"group {name!r} must be a list of StepSaliency results (or their LayerMetrics); it "
                               f"holds {sorted(kinds) or type(group).__name__}.")
    metrics_a = [m if isinstance(m, LayerMetrics) else m.metrics() for m in group_a]
    metrics_b = [m if isinstance(m, LayerMetrics) else m.metrics() for m in group_b]
    if len(metrics_a) < 2 or len(metrics_b) < 2:
        raise StepsalError(f"each group needs at least 2 traces; got {len(metrics_a)} and {len(metrics_b)}.")
    if min(len(metrics_a), len(metrics_b)) < MIN_TRACES:
        warnings.warn(f"{labels[0]}: {len(metrics_a)} traces, {labels[1]}: {len(metrics_b)}; with fewer than "
                      f"{MIN_TRACES} traces in a group the bootstrap intervals are too unreliable for significance "
                      "claims (they describe these traces only). Study more problems or samples.",
                      StepsalWarning, stacklevel=2)
    rng = np.random.default_rng(seed)
    rows = []
    for measure in TRACE_MEASURES:
        a_all = np.array([m.per_trace()[measure] for m in metrics_a])
        b_all = np.array([m.per_trace()[measure] for m in metrics_b])
        a, b = a_all[np.isfinite(a_all)], b_all[np.isfinite(b_all)]
        dropped = len(a_all) - len(a) + len(b_all) - len(b)
        if len(a) < 2 or len(b) < 2:
            rows.append(Comparison(measure=measure, n_a=len(a), n_b=len(b), mean_a=float("nan"), mean_b=float("nan"),
                                   diff=float("nan"), diff_ci=(float("nan"), float("nan")), hedges_g=float("nan"),
                                   g_ci=(float("nan"), float("nan")), dropped=dropped))
            continue
        boot_a = a[bootstrap_indices(rng, len(a), n_boot)]
        boot_b = b[bootstrap_indices(rng, len(b), n_boot)]
        diffs = boot_b.mean(-1) - boot_a.mean(-1)
        gs = np.asarray(hedges_g(boot_a, boot_b))  # an array here (batched): asarray only narrows the type
        gs = gs[np.isfinite(gs)]
        rows.append(Comparison(
            measure=measure, n_a=len(a), n_b=len(b), mean_a=float(a.mean()), mean_b=float(b.mean()),
            diff=float(b.mean() - a.mean()), diff_ci=tuple(percentile_interval(diffs, confidence).tolist()),
            hedges_g=float(hedges_g(a, b)),
            g_ci=tuple(percentile_interval(gs, confidence).tolist()) if gs.size else (float("nan"), float("nan")),
            dropped=dropped))
    result = GroupComparison(label_a=labels[0], label_b=labels[1], rows=rows, confidence=confidence, n_boot=n_boot)
    same_layers = all(m.layers == metrics_a[0].layers for m in metrics_a + metrics_b)
    if not same_layers:
        warnings.warn("the traces were computed over different layers, so the per-layer comparison is left out "
                      "(result.layers is empty); compute every trace over the same layers (layers=...) for it.",
                      StepsalWarning, stacklevel=2)
    if same_layers:
        result.layers = list(metrics_a[0].layers)
        result.layer_mean = {labels[0]: {}, labels[1]: {}}
        result.layer_mean_ci = {labels[0]: {}, labels[1]: {}}
        with warnings.catch_warnings():  # a layer where every trace lacks the measure stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            for measure in LAYER_MEASURES:
                a = np.stack([getattr(m, measure).numpy() for m in metrics_a])  # [trace, layer]
                b = np.stack([getattr(m, measure).numpy() for m in metrics_b])
                boot_a = np.nanmean(a[bootstrap_indices(rng, len(a), n_boot)], 1)  # [boot, layer]
                boot_b = np.nanmean(b[bootstrap_indices(rng, len(b), n_boot)], 1)
                result.layer_diff[measure] = np.nanmean(b, 0) - np.nanmean(a, 0)
                result.layer_diff_ci[measure] = percentile_interval(boot_b - boot_a, confidence, ignore_nan=True)
                for label, values, boot in ((labels[0], a, boot_a), (labels[1], b, boot_b)):
                    result.layer_mean[label][measure] = np.nanmean(values, 0)
                    result.layer_mean_ci[label][measure] = percentile_interval(boot, confidence, ignore_nan=True)
    return result
