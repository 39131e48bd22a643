"""Light HTML of result objects for Jupyter (``_repr_html_``): a headline, small tables, an inline
PNG where a picture says more. No scripts here: live widgets come from ``.show()``."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Iterable, Sequence

from ..traces import StepLayout
from .figures import step_labels

STYLE = "font-family: sans-serif; font-size: 12px;"


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return esc(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    head = "".join(f"<th style='text-align:right;padding:2px 6px'>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:right;padding:2px 6px'>{fmt(c, digits)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table style='border-collapse:collapse;{STYLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>" \
        "</table>"


def headline(text: str) -> str:
    return f"<div style='{STYLE} font-weight:bold; margin:4px 0'>{esc(text)}</div>"


def figure_png(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as an inline PNG image tag."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='figure' style='max-width:100%' src='data:image/png;base64,{data}'/>"


def steps_table(layout: StepLayout, width: int = 90) -> str:
    rows = []
    for label, step in zip(step_labels(layout), layout.steps):
        text = " ".join(step.text.split())
        rows.append((label, step.kind, f"{step.token_span[0]}-{step.token_span[1]}",
                     text if len(text) <= width else text[:width - 3] + "..."))
    head = "".join(f"<th style='text-align:left;padding:2px 6px'>{h}</th>" for h in ("step", "kind", "tokens", "text"))
    body = "".join("<tr>" + "".join(f"<td style='text-align:left;padding:2px 6px'>{esc(c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table style='border-collapse:collapse;{STYLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>" \
        "</table>"


def trace_html(trace: Any) -> str:
    return headline(repr(trace)) + steps_table(trace.layout)


def metrics_rows(metrics: Any) -> tuple[list[str], list[list[Any]]]:
    from ..metrics import LAYER_MEASURES

    return (["layer", *LAYER_MEASURES],
            [[layer, *(float(getattr(metrics, m)[i]) for m in LAYER_MEASURES)]
             for i, layer in enumerate(metrics.layers)])


def metrics_html(metrics: Any) -> str:
    per_trace = metrics.per_trace()
    return (headline(repr(metrics)) + table(list(per_trace), [list(per_trace.values())])
            + "<div style='height:6px'></div>" + table(*metrics_rows(metrics), digits=3))


def saliency_html(result: Any) -> str:
    from .figures import plot_step_maps

    fig = plot_step_maps(result, max_panels=4)
    per_trace = result.metrics().per_trace()
    return (headline(repr(result)) + figure_png(fig) + table(list(per_trace), [list(per_trace.values())])
            + f"<div style='{STYLE} color:#666'>Live views: .show('maps' | 'heads' | 'tokens'); numbers: "
              ".to_dataframe(), .metrics()</div>")


def comparison_html(comparison: Any) -> str:
    from .tables import comparison_frame

    frame = comparison_frame(comparison)
    return headline(repr(comparison)) + table(list(frame.columns), frame.itertuples(index=False))


def flow_stats_html(stats: Any) -> str:
    from .tables import flow_stats_frame

    frame = flow_stats_frame(stats)
    return headline(repr(stats)) + table(list(frame.columns), frame.itertuples(index=False))


def flow_effect_html(effect: Any) -> str:
    from .figures import plot_flow_effect

    fig = plot_flow_effect(effect, max_layers=3)
    return headline(repr(effect)) + figure_png(fig) + f"<pre style='{STYLE}'>{esc(effect.table())}</pre>"


def generation_html(generation: Any) -> str:
    parts = [headline(repr(generation))]
    for b, text in enumerate(generation.texts):
        trace = generation.traces[b]
        status = repr(trace) if trace is not None else f"no trace: {generation.trace_errors[b]}"
        parts.append(f"<div style='{STYLE}'><b>row {b}</b>: {esc(status)}</div>"
                     f"<pre style='white-space:pre-wrap;{STYLE}'>{esc(text)}</pre>")
    if generation.stats is not None:
        parts.append(flow_stats_html(generation.stats))
    return "".join(parts)
