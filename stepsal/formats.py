"""Trace formats: where thinking and summary begin in a trace's text.

A format is two regular expressions: the marker that opens the thinking segment and the marker that
opens the summary. Markers belong to the segment they open (METHOD.md section 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TraceFormatError


@dataclass(frozen=True)
class TraceFormat:
    """Markers that open the thinking segment and the summary (regular expressions).

    Args:
        name: a label, shown in errors and saved with results.
        thinking_start: regex matching the marker that opens thinking.
        summary_start: regex matching the marker that opens the summary (searched after thinking).
    """

    name: str
    thinking_start: str
    summary_start: str

    def locate(self, text: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """Character spans (start, end) of the thinking marker and of the summary marker.

        The summary span is None when its marker is absent (an unfinished trace).
        """
        think = re.search(self.thinking_start, text)
        if think is None:
            raise TraceFormatError(
                f"format {self.name!r}: thinking marker /{self.thinking_start}/ not found in the "
                f"trace (starts {text[:60]!r}). Pass the format that matches the trace "
                "(fmt='think', 'harmony' or 'plain') or a custom one: "
                "stepsal.custom_format(thinking_start=..., summary_start=...)."
            )
        summary = re.compile(self.summary_start).search(text, think.end())
        return think.span(), (summary.span() if summary else None)


def custom_format(thinking_start: str, summary_start: str, regex: bool = False,
                  name: str = "custom") -> TraceFormat:
    """A format from marker strings (escaped) or, with ``regex=True``, regular expressions."""
    if not thinking_start or not summary_start:
        raise TraceFormatError("custom_format needs non-empty thinking_start and summary_start markers.")
    if not regex:
        thinking_start, summary_start = re.escape(thinking_start), re.escape(summary_start)
    return TraceFormat(name, thinking_start, summary_start)


FORMATS: dict[str, TraceFormat] = {
    # DeepSeek-R1, QwQ, Qwen3: ... <think> thinking </think> summary
    "think": TraceFormat("think", r"<think>", r"</think>"),
    # GPT-OSS harmony: analysis channel = thinking, final channel = summary
    "harmony": TraceFormat(
        "harmony",
        r"(?:<\|start\|>assistant)?<\|channel\|>analysis<\|message\|>",
        r"(?:<\|start\|>assistant)?<\|channel\|>final<\|message\|>",
    ),
    # Question: ... Reasoning: ... Answer: ... (markers at the start of a line)
    "plain": TraceFormat("plain", r"(?m)^[ \t]*Reasoning:", r"(?m)^[ \t]*Answer:"),
}


def get_format(fmt: str | TraceFormat) -> TraceFormat:
    if isinstance(fmt, TraceFormat):
        return fmt
    if fmt not in FORMATS:
        raise TraceFormatError(
            f"unknown trace format {fmt!r}: use one of {sorted(FORMATS)} or "
            "stepsal.custom_format(thinking_start=..., summary_start=...)."
        )
    return FORMATS[fmt]
