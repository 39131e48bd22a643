"""Does Step-Saliency point at what matters? Rank agreement of three importances of the thinking steps.

Per thinking step i of one trace:

- **saliency**: what the later steps draw from it in Step-Saliency's row-normalised maps, the mean of
  map[j, i] over the steps j > i, averaged over the layers of a band ("all", "shallow" = the bottom
  quarter, "deep" = the top half, as in :mod:`stepsal.metrics`);
- **suppression**: the mean drop in log-probability of the later steps' tokens when nothing may
  attend to step i (:func:`stepsal.suppression_matrix`);
- **resampling**: P(correct) after step i minus before it (:func:`stepsal.resampling_importance`).

:func:`step_agreement` ranks them against each other per trace (Spearman's rho, Kendall's tau-b over
the steps where both are defined); :func:`agreement_over` averages over traces with bootstrap intervals.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ModelMismatchError, StepsalError
from ..metrics import layer_bands
from ..options import whole_number
from ..pooling import normalize, vertical_scores
from ..segments import THINKING
from ..stats import bootstrap_indices, check_confidence, kendall_tau_b, percentile_interval, spearman
from ..storage import frame_from_json, frame_to_json, read_json, reading, write_json
from ..vis.figures import plot_agreement, plot_agreement_summary
from ..vis.html import frame_section, frames_html
from ..vis.labels import step_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..saliency import StepSaliency
    from .resampling import ResamplingImportance
    from .suppression import SuppressionMatrix

BANDS = ("all", "shallow", "deep")


def saliency_importance(result: StepSaliency, band: str = "all") -> Float[Tensor, " step"]:
    """Per step i: the mean over later steps j > i of the row-normalised map[j, i], averaged over the
    band's layers; NaN for the last step."""
    if band not in BANDS:
        raise StepsalError(f"unknown band {band!r}: use one of {BANDS}.")
    if result.rule == "ag_signed":
        raise StepsalError("saliency importance reads maps as shares; compute it on rule='ag' (or 'g').")
    shallow, deep = layer_bands(len(result.layers))
    chosen = {"all": slice(None), "shallow": shallow, "deep": deep}[band]
    maps = normalize(result.sums.double(), result.members, "row")[chosen].mean(0)
    return vertical_scores(maps, 1)


@dataclass(kw_only=True)
class StepAgreement:
    """One trace: ``importances`` (one row per thinking step: step, label and each importance) and
    their rank agreement (:meth:`to_dataframe`)."""

    importances: pandas.DataFrame

    @property
    def measures(self) -> list[str]:
        return [column for column in self.importances.columns if column not in ("step", "label")]

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per pair of importances: Spearman's rho, Kendall's tau-b and the steps they rank."""
        rows = []
        for a, b in _pairs(self.measures):
            x, y = (self.importances[name].to_numpy(dtype=float) for name in (a, b))
            both = np.isfinite(x) & np.isfinite(y)
            rows.append({"a": a, "b": b, "steps": int(both.sum()), "spearman": spearman(x[both], y[both]),
                         "kendall": kendall_tau_b(x[both], y[both])})
        return pandas.DataFrame(rows, columns=["a", "b", "steps", "spearman", "kendall"])

    def __repr__(self) -> str:
        frame = self.to_dataframe()
        best = frame.dropna(subset=["spearman"])
        named = (f"; rho {best.iloc[0]['a']} vs {best.iloc[0]['b']} {best.iloc[0]['spearman']:+.2f}"
                 if len(best) else "")
        return f"StepAgreement({len(self.importances)} thinking steps, {len(frame)} pairs{named})"

    def _repr_html_(self) -> str:
        return frames_html(repr(self), [("rank agreement", self.to_dataframe()), ("importances", self.importances)],
                           fig=self.plot())

    def plot(self, path: str | os.PathLike | None = None) -> Figure:
        """Each importance over the thinking steps, as ranks (1 = most important)."""
        return plot_agreement(self.importances, path=path)


def _pairs(measures: Sequence[str]) -> list[tuple[str, str]]:
    """Each saliency band against suppression and resampling, then suppression against resampling."""
    saliency = [m for m in measures if m.startswith("saliency")]
    causal = [m for m in ("suppression", "resampling") if m in measures]
    pairs = [(s, c) for s in saliency for c in causal]
    if len(causal) == 2:
        pairs.append((causal[0], causal[1]))
    return pairs


def step_agreement(saliency: StepSaliency, suppression: SuppressionMatrix | None = None,
                   resampling: ResamplingImportance | None = None) -> StepAgreement:
    """The thinking steps' importances from a Step-Saliency result and, when given, a
    :class:`SuppressionMatrix` and a :class:`ResamplingImportance` of the same trace."""
    layout = saliency.layout
    for name, other in (("suppression", suppression), ("resampling", resampling)):
        if other is not None and not torch.equal(other.layout.token_step, layout.token_step):
            raise ModelMismatchError(f"the {name} result is of another trace (its steps differ from the saliency "
                                     "result's); compute all three on the same trace.")
    if suppression is None and resampling is None:
        raise StepsalError("step_agreement needs a suppression matrix or a resampling importance beside the saliency.")
    thinking = layout.steps_of(THINKING)
    labels = step_labels(layout)
    frame = pandas.DataFrame({"step": thinking, "label": [labels[i] for i in thinking]})
    for band in BANDS:
        frame[f"saliency_{band}"] = saliency_importance(saliency, band)[thinking].numpy()
    if suppression is not None:
        frame["suppression"] = suppression.importance[thinking].numpy()
    if resampling is not None:
        frame["resampling"] = resampling.importance[1:].numpy()  # k = 1..S: thinking step k
    return StepAgreement(importances=frame)


@dataclass(kw_only=True)
class AgreementSummary:
    """Over traces: per pair and statistic, the mean with a percentile-bootstrap interval over traces."""

    frame: pandas.DataFrame
    confidence: float
    traces: int

    def to_dataframe(self) -> pandas.DataFrame:
        return self.frame.copy()

    def __repr__(self) -> str:
        return f"AgreementSummary({self.traces} traces, {len(self.frame)} rows, {self.confidence:.0%} intervals)"

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.frame, fig=self.plot())

    def plot(self, path: str | os.PathLike | None = None) -> Figure:
        """The mean rank agreement per pair with its interval (Spearman and Kendall side by side)."""
        return plot_agreement_summary(self.frame, self.confidence, path=path)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, "AgreementSummary", {"frame": frame_to_json(self.frame), "confidence": self.confidence,
                                                     "traces": self.traces})

    @classmethod
    def load(cls, path: str | os.PathLike) -> AgreementSummary:
        with reading(path, "AgreementSummary"):
            data = read_json(path, "AgreementSummary")
            return cls(frame=frame_from_json(data["frame"]), confidence=float(data["confidence"]),
                       traces=int(data["traces"]))


def agreement_over(agreements: Sequence[StepAgreement], *, n_boot: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> AgreementSummary:
    """Mean Spearman and Kendall per pair over traces (traces where a pair is undefined left out, and
    counted), with percentile-bootstrap intervals over traces."""
    whole_number(n_boot, "n_boot", minimum=1)
    check_confidence(confidence)
    if not agreements:
        raise StepsalError("agreement_over needs at least one StepAgreement (step_agreement per trace).")
    frames = [agreement.to_dataframe() for agreement in agreements]
    rng = np.random.default_rng(seed)
    rows = []
    for (a, b), _ in pandas.concat(frames).groupby(["a", "b"], sort=False):  # pyright: ignore[reportGeneralTypeIssues]
        for statistic in ("spearman", "kendall"):
            values = np.array([float(f.loc[(f["a"] == a) & (f["b"] == b), statistic].iloc[0])
                               for f in frames if ((f["a"] == a) & (f["b"] == b)).any()])
            values = values[np.isfinite(values)]
            low = high = mean = math.nan
            if len(values):
                mean = float(values.mean())
                boot = values[bootstrap_indices(rng, len(values), n_boot)].mean(-1)
                low, high = (float(x) for x in percentile_interval(boot, confidence))
            rows.append({"a": a, "b": b, "statistic": statistic, "traces": len(values), "mean": mean,
                         "ci_low": low, "ci_high": high})
    return AgreementSummary(frame=pandas.DataFrame(rows), confidence=confidence, traces=len(agreements))
