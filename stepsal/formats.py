"""Trace formats: where thinking and summary begin in a trace's text.

A format is two regular expressions: the marker that opens the thinking segment and the marker that
opens the summary. Markers belong to the segment they open (docs/paper.md section 1).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from .errors import StepsalWarning, TraceFormatError


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

    def locate(self, text: str, thinking_from: int | None = None) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """Character spans (start, end) of the thinking marker and of the summary marker the model
        emitted; the summary span is None when its marker is absent (an unfinished trace).

        Markers inside code (fenced blocks, inline backticks) are ignored: a question may show the
        format it wants. Of the rest, thinking opens at the last thinking marker that a summary
        marker follows (else at the last one), and the summary at the first marker after it. When
        other candidates were passed over, a :class:`~stepsal.errors.StepsalWarning` says which.
        With ``thinking_from`` (generated sequences: where the prompt leaves off, see
        :func:`prompt_thinking_from`) thinking opens at the first marker from there on.
        """
        code = code_spans(text)
        thinking = [m for m in markers_outside(self.thinking_start, text, code)
                    if thinking_from is None or m.start() >= thinking_from]
        summaries = markers_outside(self.summary_start, text, code)
        if not thinking:
            in_code = " (only inside code, which is not counted)" if re.search(self.thinking_start, text) else ""
            raise TraceFormatError(
                f"format {self.name!r}: thinking marker /{self.thinking_start}/ not found in the "
                f"trace{in_code} (starts {text[:60]!r}). Pass the format that matches the trace "
                "(fmt='think', 'harmony' or 'plain') or a custom one: "
                "stepsal.custom_format(thinking_start=..., summary_start=...)."
            )
        closed = [t for t in thinking if any(s.start() >= t.end() for s in summaries)]
        think = thinking[0] if thinking_from is not None else (closed or thinking)[-1]
        after = [s for s in summaries if s.start() >= think.end()]
        summary = after[0] if after else None
        if thinking_from is None and (len(thinking) > 1 or len(after) > 1):
            warnings.warn(
                f"format {self.name!r}: {len(thinking)} thinking and {len(summaries)} summary markers outside "
                f"code; thinking taken from character {think.start()}"
                + (f", summary from {summary.start()}" if summary else ", no summary")
                + ". Check trace.describe() if the question or the reasoning quotes the markers.",
                StepsalWarning, stacklevel=3)
        return think.span(), (summary.span() if summary else None)


FENCE = re.compile(r"(?ms)^[ \t]*(```|~~~).*?(?:^[ \t]*\1|\Z)")
INLINE_CODE = re.compile(r"`[^`\n]+`")


def code_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of fenced code blocks (to their closing fence, or the end) and inline code."""
    spans = [m.span() for m in FENCE.finditer(text)]
    spans += [m.span() for m in INLINE_CODE.finditer(text) if not inside(m.start(), spans)]
    return sorted(spans)


def inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def markers_outside(pattern: str, text: str, code: list[tuple[int, int]]) -> list[re.Match[str]]:
    """Matches of a marker pattern that do not start inside the ``code`` spans."""
    return [m for m in re.finditer(pattern, text) if not inside(m.start(), code)]


def prompt_thinking_from(prompt: str, fmt: TraceFormat) -> int:
    """Where a generated sequence's thinking marker may start: the prompt's last thinking marker
    outside code when nothing closes it (the prompt opened the thinking), else the prompt's end
    (the model writes the marker; earlier pairs belong to the chat history or are quoted)."""
    code = code_spans(prompt)
    opened = markers_outside(fmt.thinking_start, prompt, code)
    closes = markers_outside(fmt.summary_start, prompt, code)
    if opened and not any(s.start() >= opened[-1].end() for s in closes):
        return opened[-1].start()
    return len(prompt)


def custom_format(thinking_start: str, summary_start: str, regex: bool = False,
                  name: str = "custom") -> TraceFormat:
    """A format from marker strings (escaped) or, with ``regex=True``, regular expressions."""
    if not (isinstance(thinking_start, str) and isinstance(summary_start, str)) or not thinking_start \
            or not summary_start:
        raise TraceFormatError(f"custom_format needs non-empty text markers; got thinking_start={thinking_start!r}, "
                               f"summary_start={summary_start!r}.")
    if not regex:
        thinking_start, summary_start = re.escape(thinking_start), re.escape(summary_start)
    for which, marker in (("thinking_start", thinking_start), ("summary_start", summary_start)):
        try:
            compiled = re.compile(marker)
        except re.error as error:
            raise TraceFormatError(f"{which} {marker!r} is no regular expression ({error}); pass regex=False to "
                                   "match it as plain text.") from None
        if compiled.fullmatch(""):
            raise TraceFormatError(f"{which} {marker!r} matches the empty string; a marker must match some text.")
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
