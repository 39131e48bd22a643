"""Light HTML of plain data for Jupyter (``_repr_html_``): a headline, tables rendered from pandas
frames, an inline PNG where a picture says more. No scripts here: live widgets come from ``.show()``."""

from __future__ import annotations

import base64
import html
import io
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .tables import cell, record_frame, steps_frame

if TYPE_CHECKING:
    import pandas

    from ..traces import StepLayout

STYLE = "font-family: sans-serif; font-size: 12px;"


def esc(value: Any) -> str:
    return html.escape(str(value))


def frame_html(frame: pandas.DataFrame, digits: int = 4, raw: Iterable[str] = ()) -> str:
    """A frame as an HTML table: every cell escaped (except in the ``raw`` columns, which hold trusted
    HTML such as links), reals with ``digits`` decimals, text left-aligned and numbers right-aligned."""
    raw = set(raw)
    columns = list(frame.columns)
    rows = frame.itertuples(index=False, name=None)

    def td(value: Any, column: str, tag: str = "td") -> str:
        align = "right" if isinstance(value, numbers.Number) or value is None else "left"
        text = str(value) if column in raw else esc(cell(value, digits))
        return f"<{tag} style='text-align:{align};padding:2px 6px'>{text}</{tag}>"

    head = "".join(f"<th style='padding:2px 6px'>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(td(v, c) for v, c in zip(row, columns, strict=True)) + "</tr>" for row in rows)
    return f"<table style='border-collapse:collapse;{STYLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>" \
        "</table>"


def headline(text: str) -> str:
    return f"<div style='{STYLE} font-weight:bold; margin:4px 0'>{esc(text)}</div>"


def note(text: str) -> str:
    return f"<div style='{STYLE} color:#666'>{esc(text)}</div>"


def spacer() -> str:
    return "<div style='height:6px'></div>"


def figure_png(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as an inline PNG image tag."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='figure' style='max-width:100%' src='data:image/png;base64,{data}'/>"


def steps_html(layout: StepLayout, width: int = 90) -> str:
    """The steps of a layout as a table: label, kind, token span, start of the text."""
    return frame_html(steps_frame(layout, width))


def trace_html(title: str, layout: StepLayout) -> str:
    return headline(title) + steps_html(layout)


def metrics_html(title: str, per_trace: Mapping[str, float], layers: pandas.DataFrame) -> str:
    """A headline, the per-trace numbers (one row) and the per-layer table (one row per layer)."""
    return headline(title) + frame_html(record_frame(per_trace)) + spacer() + frame_html(layers, digits=3)


def saliency_html(title: str, fig: Any, per_trace: Mapping[str, float]) -> str:
    return (headline(title) + figure_png(fig) + frame_html(record_frame(per_trace))
            + note("Live views: .show('maps' | 'heads' | 'tokens'); numbers: .to_dataframe(), .metrics()"))


def frame_section(title: str, frame: pandas.DataFrame, digits: int = 4, fig: Any = None) -> str:
    """A headline, a table and (given a figure) the figure as an inline PNG."""
    return headline(title) + (figure_png(fig) if fig is not None else "") + frame_html(frame, digits)


def frames_html(title: str, frames: Sequence[tuple[str, pandas.DataFrame]], digits: int = 4, fig: Any = None) -> str:
    """A headline, the figure when given, then each frame under its caption."""
    parts = [headline(title)] + ([figure_png(fig)] if fig is not None else [])
    for caption, frame in frames:
        parts += [note(caption), frame_html(frame, digits), spacer()]
    return "".join(parts)


def generation_html(title: str, rows: Sequence[tuple[str, str]], extra: str = "",
                    frame: pandas.DataFrame | None = None) -> str:
    """A headline, the ``frame`` (one row per generated row) when given, then per row its status line
    and its text; ``extra`` (trusted HTML) last."""
    parts = [headline(title)] + ([frame_html(frame), spacer()] if frame is not None else [])
    for b, (status, text) in enumerate(rows):
        parts.append(f"<div style='{STYLE}'><b>row {b}</b>: {esc(status)}</div>"
                     f"<pre style='white-space:pre-wrap;{STYLE}'>{esc(text)}</pre>")
    return "".join(parts) + extra
