"""Self-contained offline HTML reports: one page, one copy of the circuitsvis bundle, no network.

``write_report(out_dir, [result])`` after an analysis; ``report_from_folder(folder)`` for a study:
every ``*.safetensors`` result under the folder gets a section, and when the results sit in two
subfolders (say ``correct/`` and ``wrong/``) the page opens with their comparison.
"""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .html import figure_png, headline, steps_table, table
from ..traces import SUMMARY
from .render import bundle_js
from .widgets import received_tokens_widget, segmentation_from_tokens, step_maps_widget

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


def result_section(result, name: str, anchor: str) -> str:
    """Widgets, figure, metrics and segmentation of one Step-Saliency result."""
    from .figures import plot_step_maps
    from .html import metrics_rows

    metrics = result.metrics()
    per_trace = metrics.per_trace()
    parts = [f"<section id='{anchor}'><h2>{html.escape(name)}</h2>", headline(repr(result)),
             step_maps_widget(result).html(bundle=False)]
    if result.token_texts is not None and result.layout.steps_of(SUMMARY):
        parts.append(received_tokens_widget(result, "summary").html(bundle=False))
    parts.append(figure_png(plot_step_maps(result)))
    parts += ["<h3>Per-trace measures</h3>", table(list(per_trace), [list(per_trace.values())]),
              "<h3>Per-layer measures (row-normalised maps)</h3>", table(*metrics_rows(metrics), digits=3),
              "<h3>Segmentation</h3>", steps_table(result.layout)]
    if result.token_texts is not None:
        parts.append(segmentation_from_tokens(result.token_texts, result.layout).html(bundle=False))
    return "\n".join(parts) + "</section>"


def build_page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(title=html.escape(title), bundle=bundle_js(), body="\n".join(sections),
                       subtitle=html.escape(subtitle or f"stepsal report, {stamp}; works offline"))


def write_report(out_dir: str | os.PathLike, results: Sequence, names: Sequence[str] | None = None,
                 title: str = "Step-Saliency report", extra_sections: Sequence[str] = (),
                 max_sections: int | None = None) -> Path:
    """Write ``out_dir/report.html``: ``extra_sections`` first, then a table of all results (when
    there are several), then one full section per result, for the first ``max_sections`` of them
    (None: all; each section holds widgets and a figure, ~0.3 MB)."""
    names = list(names) if names is not None else [f"trace {i}" for i in range(len(results))]
    shown = len(results) if max_sections is None else min(max_sections, len(results))
    sections = list(extra_sections)
    if len(results) > 1:
        rows = [(f"<a href='#r{i}'>{html.escape(n)}</a>" if i < shown else html.escape(n), html.escape(r.model),
                 len(r.layers), r.layout.n_steps, *(round(v, 4) for v in r.metrics().per_trace().values()))
                for i, (n, r) in enumerate(zip(names, results))]
        note = "" if shown == len(results) else (
            f"<p style='font-size:12px;color:#666'>Sections below for the first {shown} of {len(results)} results; "
            "open any other with <code>StepSaliency.load(path).show()</code>, or write the page with "
            "<code>max_sections=None</code>.</p>")
        sections.append("<h2>Results</h2>" + _raw_table(
            ["result", "model", "layers", "steps", *results[0].metrics().per_trace()], rows) + note)
    sections += [result_section(r, n, f"r{i}") for i, (n, r) in enumerate(zip(names[:shown], results[:shown]))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(build_page(title, sections), encoding="utf-8")
    return path


def _raw_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A table whose first column is trusted HTML (links)."""
    head = "".join(f"<th style='padding:2px 6px'>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='padding:2px 6px'>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f"<table style='border-collapse:collapse;font-size:12px'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def report_from_folder(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       max_sections: int | None = 20) -> Path:
    """One page from every saved result (``*.safetensors``) under ``folder``; two subfolders of
    results are compared as groups first (per-trace measures with CIs, per-layer curves), then all
    results are listed, with full sections for the first ``max_sections`` (None: all)."""
    from ..metrics import compare_groups
    from ..saliency import StepSaliency

    from safetensors import safe_open

    root = Path(folder)
    files, others = [], []
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            ((files if "stepsal" in (handle.metadata() or {}) else others)).append(path)
    if not files:
        raise FileNotFoundError(f"no saved Step-Saliency results under {root} ({len(others)} other .safetensors "
                                "files); save results with result.save(path).")
    results = [StepSaliency.load(f) for f in files]
    names = [str(f.relative_to(root)) for f in files]
    groups: dict[str, list] = {}
    for f, r in zip(files, results):
        groups.setdefault(str(f.parent.relative_to(root)), []).append(r)
    extra = []
    if len(groups) == 2 and all(len(g) >= 2 for g in groups.values()):
        (label_a, a), (label_b, b) = sorted(groups.items())
        comparison = compare_groups(a, b, labels=(label_a, label_b))
        from .figures import plot_group_curves
        from .tables import comparison_frame

        frame = comparison_frame(comparison)
        extra.append(f"<section><h2>{html.escape(label_a)} vs {html.escape(label_b)}</h2>"
                     + headline(repr(comparison)) + table(list(frame.columns), frame.itertuples(index=False))
                     + (figure_png(plot_group_curves(comparison)) if comparison.layer_mean else "") + "</section>")
    if others:
        extra.append(f"<p style='font-size:12px;color:#666'>Skipped {len(others)} .safetensors file(s) that are not "
                     f"stepsal results: {html.escape(', '.join(str(p.relative_to(root)) for p in others[:5]))}"
                     f"{' ...' if len(others) > 5 else ''}</p>")
    return write_report(out_dir or root, results, names, title=f"Step-Saliency study: {root.name}",
                        extra_sections=extra, max_sections=max_sections)
