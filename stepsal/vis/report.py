"""Self-contained offline HTML reports: one page, one copy of the circuitsvis bundle, no network.

This module renders pages from plain data: :class:`ResultView` holds what a section shows of one
result (maps, layers, layout, measures, token texts). ``write_report(out_dir, [result])`` takes
views, or results that make their own (``result.report_view()``, as Step-Saliency results do).
Loading a folder of saved results and comparing its groups is
:func:`stepsal.studies.report.report_from_folder`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas

from .figures import plot_step_maps
from .html import figure_png, frame_html, headline, note, steps_html
from .labels import maps_title, maps_widget_title, received_title, step_names
from .render import bundle_js
from .tables import record_frame
from .widgets import colored_tokens_widget, segmentation_from_tokens, step_maps_widget

if TYPE_CHECKING:
    from ..traces import StepLayout

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 24px; max-width: 1200px; }}
section {{ border-top: 1px solid #ddd; margin-top: 24px; padding-top: 8px; }}
.stepsal-widget-title {{ font-size: 12px; color: #444; margin-top: 12px; }}</style>
<script>{bundle}</script></head>
<body><h1>{title}</h1><p style="color:#666;font-size:12px">{subtitle}</p>
{body}
</body></html>
"""


@dataclass(kw_only=True)
class ResultView:
    """What a report section shows of one Step-Saliency result, as plain data."""

    headline: str  # one line about the result (its repr)
    model: str
    layers: list[int]
    layout: StepLayout
    row_maps: Any  # [layer, step_q, step_k] row-normalised (the widget and the figure)
    rule: str
    norm: str
    target: str
    per_trace: dict[str, float]  # one number per per-trace measure
    layer_measures: pandas.DataFrame  # one row per layer: layer and a column per measure
    token_texts: list[str] | None = None  # the scored tokens' texts (None: no token views)
    received: Any = None  # [token, layer] share each token receives from the summary (None: no summary)
    received_token_level: bool = False  # token resolution (else each token carries its step's block)
    receiver_heads: pandas.DataFrame | None = None  # the top heads by kurtosis (None: no per-head maps)
    receiver_maps: Any = None  # [head, step_q, step_k] their row-normalised maps, in the frame's order


def view_of(result: Any) -> ResultView:
    """A :class:`ResultView` as it is, anything else by its ``report_view()``."""
    return result if isinstance(result, ResultView) else result.report_view()


def result_section(view: ResultView, name: str, anchor: str) -> str:
    """Widgets, figure, measures and segmentation of one result."""
    shown = ("Maps shown row-normalised: each query step's row sums to 1, so rows and layers compare"
             + ("." if view.norm == "row" else f" (the result's own {view.norm} maps, result.maps, differ by orders "
                "of magnitude between rows)."))
    parts = [f"<section id='{anchor}'><h2>{html.escape(name)}</h2>", headline(view.headline), note(shown),
             step_maps_widget(view.row_maps, step_names(view.layout), [f"layer {layer}" for layer in view.layers],
                              title=maps_widget_title(view.rule, "row", view.target)).html(bundle=False)]
    if view.token_texts is not None and view.received is not None:
        parts.append(colored_tokens_widget(view.token_texts, view.received, [f"layer {layer}" for layer in view.layers],
                                           title=received_title("summary", view.received_token_level))
                     .html(bundle=False))
    parts.append(figure_png(plot_step_maps(view.row_maps, view.layers, view.layout,
                                           title=maps_title(view.rule, "row", view.target))))
    if view.receiver_heads is not None and len(view.receiver_heads):
        names = [f"L{layer}H{head}" for layer, head in zip(view.receiver_heads["layer"], view.receiver_heads["head"],
                                                             strict=True)]
        parts += ["<h3>Receiver heads (kurtosis of the steps' vertical scores)</h3>",
                  frame_html(view.receiver_heads, digits=3),
                  step_maps_widget(view.receiver_maps, step_names(view.layout), names,
                                   title="Receiver heads: their row-normalised step maps").html(bundle=False)]
    parts += ["<h3>Per-trace measures</h3>", frame_html(record_frame(view.per_trace)),
              "<h3>Per-layer measures (row-normalised maps)</h3>", frame_html(view.layer_measures, digits=3),
              "<h3>Segmentation</h3>", steps_html(view.layout)]
    if view.token_texts is not None:
        parts.append(segmentation_from_tokens(view.token_texts, view.layout).html(bundle=False))
    return "\n".join(parts) + "</section>"


def comparison_section(title: str, description: str, frame: pandas.DataFrame, fig: Any = None) -> str:
    """A section comparing groups: a headline, the table, and the figure when given."""
    return (f"<section><h2>{html.escape(title)}</h2>" + headline(description) + frame_html(frame)
            + (figure_png(fig) if fig is not None else "") + "</section>")


def skipped_note(names: Sequence[str], why: str = "that are not stepsal results", shown: int = 5) -> str:
    """A line naming files left out of the report (the first ``shown`` of them) and why."""
    return (f"<p style='font-size:12px;color:#666'>Skipped {len(names)} .safetensors file(s) {html.escape(why)}: "
            f"{html.escape(', '.join(names[:shown]))}{' ...' if len(names) > shown else ''}</p>")


def results_index(views: Sequence[ResultView], names: Sequence[str], shown: int) -> str:
    """A table of all results (linked to their sections for the first ``shown``), with a note when
    some have no section."""
    frame = pandas.DataFrame([
        {"result": f"<a href='#r{i}'>{html.escape(n)}</a>" if i < shown else html.escape(n), "model": v.model,
         "layers": len(v.layers), "steps": len(v.layout.steps), **v.per_trace}
        for i, (n, v) in enumerate(zip(names, views, strict=True))])
    note = "" if shown == len(views) else (
        f"<p style='font-size:12px;color:#666'>Sections below for the first {shown} of {len(views)} results; "
        "open any other with <code>StepSaliency.load(path).show()</code>, or write the page with "
        "<code>max_sections=None</code>.</p>")
    return "<h2>Results</h2>" + frame_html(frame, raw=["result"]) + note


def build_page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(title=html.escape(title), bundle=bundle_js(), body="\n".join(sections),
                       subtitle=html.escape(subtitle or f"stepsal report, {stamp}; works offline"))


def write_page(out_dir: str | os.PathLike, title: str, sections: Sequence[str]) -> Path:
    """Write ``out_dir/report.html`` from HTML sections."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(build_page(title, sections), encoding="utf-8")
    return path


def write_report(out_dir: str | os.PathLike, results: Sequence[Any], names: Sequence[str] | None = None,
                 title: str = "Step-Saliency report", extra_sections: Sequence[str] = (),
                 max_sections: int | None = None) -> Path:
    """Write ``out_dir/report.html``: ``extra_sections`` first, then a table of all results (when
    there are several), then one full section per result, for the first ``max_sections`` of them
    (None: all; each section holds widgets and a figure, ~0.3 MB).

    ``results``: :class:`ResultView` s, or results with a ``report_view()`` (Step-Saliency results)."""
    views = [view_of(r) for r in results]
    names = list(names) if names is not None else [f"trace {i}" for i in range(len(views))]
    shown = len(views) if max_sections is None else min(max_sections, len(views))
    sections = list(extra_sections)
    if len(views) > 1:
        sections.append(results_index(views, names, shown))
    sections += [result_section(v, n, f"r{i}")
                 for i, (n, v) in enumerate(zip(names[:shown], views[:shown], strict=True))]
    return write_page(out_dir, title, sections)
