"""pandas DataFrames of results: long format, one row per number, named columns."""

from __future__ import annotations

from typing import Any

from ..traces import StepLayout
from .figures import step_labels


def _pandas():
    import pandas

    return pandas


def saliency_frame(result: Any, norm: str) -> "pandas.DataFrame":  # noqa: F821
    """One row per (layer, step_q, step_k): layer, step_q, step_k, kind_q, kind_k, label_q, label_k, value."""
    maps = result.normalized(norm)
    layout: StepLayout = result.layout
    labels, kinds = step_labels(layout), [step.kind for step in layout.steps]
    n = layout.n_steps
    rows = [(layer, q, k, kinds[q], kinds[k], labels[q], labels[k], float(maps[i, q, k]))
            for i, layer in enumerate(result.layers) for q in range(n) for k in range(n)]
    frame = _pandas().DataFrame(rows, columns=["layer", "step_q", "step_k", "kind_q", "kind_k", "label_q",
                                               "label_k", "value"])
    frame.attrs.update(norm=norm, rule=result.rule, target=result.target, model=result.model)
    return frame


def metrics_frame(metrics: Any) -> "pandas.DataFrame":  # noqa: F821
    """One row per (layer, measure): layer, measure, value."""
    from ..metrics import LAYER_MEASURES

    rows = [(layer, measure, float(getattr(metrics, measure)[i]))
            for i, layer in enumerate(metrics.layers) for measure in LAYER_MEASURES]
    return _pandas().DataFrame(rows, columns=["layer", "measure", "value"])


def comparison_frame(comparison: Any) -> "pandas.DataFrame":  # noqa: F821
    """One row per per-trace measure: the two groups' means, the difference and Hedges' g with CIs."""
    rows = [(r.measure, r.n_a, r.n_b, r.mean_a, r.mean_b, r.diff, r.diff_ci[0], r.diff_ci[1], r.hedges_g,
             r.g_ci[0], r.g_ci[1], r.dropped) for r in comparison.rows]
    frame = _pandas().DataFrame(rows, columns=[
        "measure", f"n_{comparison.label_a}", f"n_{comparison.label_b}", f"mean_{comparison.label_a}",
        f"mean_{comparison.label_b}", "diff", "diff_lo", "diff_hi", "hedges_g", "g_lo", "g_hi", "dropped"])
    frame.attrs.update(confidence=comparison.confidence, n_boot=comparison.n_boot,
                       diff=f"{comparison.label_b} - {comparison.label_a}")
    return frame


def flow_stats_frame(stats: Any) -> "pandas.DataFrame":  # noqa: F821
    """One row per (part, layer): OEB rows seen / changed and bridge mass before / after; SMI injections."""
    data = stats.to_dict()
    rows = [("OEB", layer, d["rows"], d["changed"], d["mass_before"], d["mass_after"], None, None)
            for layer, d in data["oeb"].items()]
    rows += [("SMI", layer, None, None, None, None, d["injections"], d["mean_norm"])
             for layer, d in data["smi"].items()]
    return _pandas().DataFrame(rows, columns=["part", "layer", "rows", "changed", "bridge_mass_before",
                                              "bridge_mass_after", "injections", "mean_norm"])
