"""Traces: the scored token sequence and its exact token -> step layout.

Segmentation follows docs/paper.md section 2. The question is one step, thinking is split into
sentences (``\\.\\s+``, and the full stops of other scripts), the summary into paragraphs (blank
lines). A step ends after each kept piece (long enough, not a number or a table) and the text
after it opens the next step, so short pieces are not dropped with their tokens: they join the step
they start or lie in. Every token of a segment belongs to exactly one step. The rule lives in
:mod:`stepsal.sentences`, which generation's tracker (:mod:`stepsal.stepflow.tracker`) calls too.
Tokens are placed by their first non-whitespace character in the decoded text of the exact sequence
that is scored (character offsets), never by re-tokenising pieces.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int64
from torch import Tensor

from .errors import ArgumentTypeError, ModelMismatchError, StepsalError, TraceFormatError
from .formats import TraceFormat, get_format, prompt_thinking_from
from .options import whole_number
from .segments import QUESTION, SEGMENT_NAMES, SUMMARY, THINKING
from .sentences import (
    BLANK_LINE,
    Keep,
    keep_summary_piece,
    keep_thinking_piece,
    sentence_pattern,
    step_starts,
    too_few_steps,
)
from .vis.html import trace_html
from .vis.widgets import segmentation_widget

if TYPE_CHECKING:
    from .vis.render import Widget

__all__ = ["QUESTION", "SEGMENT_NAMES", "SUMMARY", "THINKING", "Step", "StepLayout", "Trace", "keep_thinking_piece",
           "segment_text"]

# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Step:
    """One step: its segment, its characters in the trace text and its tokens (end exclusive)."""

    index: int
    segment: int
    char_span: tuple[int, int]
    token_span: tuple[int, int]
    text: str

    @property
    def kind(self) -> str:
        return SEGMENT_NAMES[self.segment]

    @property
    def n_tokens(self) -> int:
        return self.token_span[1] - self.token_span[0]


@dataclass
class StepLayout:
    """token -> step and token -> segment maps (-1 = no step), and the steps themselves."""

    token_step: Int64[Tensor, " token"]
    token_segment: Int64[Tensor, " token"]
    steps: list[Step]

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def n_tokens(self) -> int:
        return int(self.token_step.shape[0])

    @property
    def step_segment(self) -> Int64[Tensor, " step"]:
        return torch.tensor([s.segment for s in self.steps], dtype=torch.long)

    def steps_of(self, segment: int) -> list[int]:
        """Indices of the steps in a segment (QUESTION, THINKING or SUMMARY), in order."""
        return [s.index for s in self.steps if s.segment == segment]

    def membership(self, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Float[Tensor, "step token"]:
        """One-hot step membership P [S, T]: P[s, t] = 1 when token t belongs to step s."""
        members = torch.zeros(self.n_steps, self.n_tokens, dtype=dtype, device=device)
        inside = self.token_step >= 0
        positions = torch.arange(self.n_tokens)[inside]
        members[self.token_step[inside].to(members.device), positions.to(members.device)] = 1
        return members

    @classmethod
    def from_token_step(cls, token_step: Sequence[int] | Tensor,
                        step_segment: Sequence[int]) -> StepLayout:
        """A layout from a token -> step map (contiguous steps) and each step's segment."""
        token_step = torch.as_tensor(token_step, dtype=torch.long)
        steps = []
        for index, segment in enumerate(step_segment):
            where = (token_step == index).nonzero().flatten()
            if where.numel() == 0:
                raise StepsalError(f"step {index} has no tokens; give every step in step_segment at least one token.")
            start, end = int(where[0]), int(where[-1]) + 1
            if end - start != where.numel():
                raise StepsalError(f"step {index} is not contiguous; a step's tokens must be one run in token_step.")
            steps.append(Step(index, int(segment), (-1, -1), (start, end), ""))
        segments = torch.tensor(list(step_segment), dtype=torch.long)
        token_segment = torch.where(token_step >= 0, segments[token_step.clamp(min=0)], -1)
        return cls(token_step, token_segment, steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_step": self.token_step.tolist(),
            "steps": [
                {"index": s.index, "segment": s.segment, "char_span": list(s.char_span),
                 "token_span": list(s.token_span), "text": s.text}
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepLayout:
        """What :meth:`to_dict` wrote; checked (:meth:`check`): a damaged layout is an error, not a map."""
        steps = [Step(int(d["index"]), int(d["segment"]), _pair(d["char_span"]), _pair(d["token_span"]), str(d["text"]))
                 for d in data["steps"]]
        token_step = torch.tensor(data["token_step"], dtype=torch.long)
        if token_step.ndim != 1 or any(s.segment not in range(len(SEGMENT_NAMES)) for s in steps):
            raise TraceFormatError("a step layout needs a flat token_step list and segments 0 (question), 1 "
                                   "(thinking) or 2 (summary); pass what StepLayout.to_dict wrote.")
        segments = torch.tensor([s.segment for s in steps] or [-1], dtype=torch.long)
        token_segment = torch.where(token_step >= 0, segments[token_step.clamp(0, len(segments) - 1)], -1)
        layout = cls(token_step, token_segment, steps)
        layout.check()
        return layout

    def check(self) -> None:
        """Raise :class:`TraceFormatError` naming the first disagreement: steps numbered 0..S-1, every
        token in step -1 (none) or 0..S-1, each step exactly the tokens of its ``token_span``."""
        n_tokens = self.n_tokens
        if [s.index for s in self.steps] != list(range(self.n_steps)):
            raise TraceFormatError(f"the layout's steps are numbered {[s.index for s in self.steps][:8]}, not 0.."
                                   f"{self.n_steps - 1}; pass what StepLayout.to_dict wrote.")
        if n_tokens and not (int(self.token_step.min()) >= -1 and int(self.token_step.max()) < self.n_steps):
            raise TraceFormatError(f"the layout's token_step holds steps outside -1..{self.n_steps - 1}; pass what "
                                   "StepLayout.to_dict wrote.")
        for step in self.steps:
            start, end = step.token_span
            if not (0 <= start < end <= n_tokens) or bool((self.token_step[start:end] != step.index).any()) \
                    or int((self.token_step == step.index).sum()) != end - start:
                raise TraceFormatError(f"step {step.index}'s token_span {step.token_span} does not match token_step "
                                       f"({n_tokens} tokens); pass what StepLayout.to_dict wrote.")


# ---------------------------------------------------------------- character-level segmentation


@dataclass(frozen=True)
class Segmentation:
    """Character-level result: where each step starts, its segment, and the kept pieces."""

    step_starts: list[int]
    step_segments: list[int]
    kept_pieces: list[tuple[int, int]]  # (start, end) of each kept sentence / paragraph
    has_summary: bool
    markers: tuple[tuple[int, int], tuple[int, int] | None]  # character spans: thinking, summary marker


def segment_text(text: str, fmt: str | TraceFormat, allow_missing_summary: bool = False,
                 sentence_end: str | re.Pattern[str] | None = None, thinking_from: int | None = None) -> Segmentation:
    """Split a trace's text into steps: question, thinking sentences, summary paragraphs.

    ``sentence_end``: a regular expression that ends a thinking sentence (default: '.' + whitespace
    and the full stops of other scripts; see ``SENTENCE_END``)."""
    fmt = get_format(fmt)
    (think_start, think_content), summary_span = fmt.locate(text, thinking_from)
    if summary_span is None and not allow_missing_summary:
        raise TraceFormatError(
            f"format {fmt.name!r}: summary marker /{fmt.summary_start}/ not found after the thinking "
            "marker. Pass the complete trace, or allow_missing_summary=True for an unfinished one."
        )
    think_end = summary_span[0] if summary_span else len(text)
    if not text[think_content:think_end].strip():
        raise TraceFormatError(
            f"format {fmt.name!r}: the thinking segment (characters {think_content}-{think_end}) is "
            "empty. Step-Saliency needs a trace with reasoning between the markers."
        )
    starts, segments, kept = [0], [QUESTION], []

    def add_segment(lo: int, content: int, hi: int, delimiter: re.Pattern[str], keep: Keep, segment: int) -> None:
        """The first step starts at the marker; each kept piece that text follows ends a step."""
        later, pieces = step_starts(text, content, hi, delimiter, keep)
        kept.extend(pieces)
        starts.extend([lo, *later])
        segments.extend([segment] * (1 + len(later)))

    delimiter = sentence_pattern(sentence_end)
    add_segment(think_start, think_content, think_end, delimiter, keep_thinking_piece, THINKING)
    if summary_span is not None:
        add_segment(summary_span[0], summary_span[1], len(text), BLANK_LINE, keep_summary_piece, SUMMARY)
    return Segmentation(starts, segments, kept, summary_span is not None, ((think_start, think_content), summary_span))


# ---------------------------------------------------------------- token alignment


def token_anchor(text: str, span: tuple[int, int]) -> int:
    """The character that places a token: its first non-whitespace character (else its start)."""
    start, end = span
    for position in range(start, end):
        if not text[position].isspace():
            return position
    return start


def align_tokens(text: str, offsets: Sequence[tuple[int, int]], seg: Segmentation,
                 ) -> tuple[Int64[Tensor, " token"], list[Step]]:
    """Assign each token to the step containing its anchor; drop steps that got no token."""
    raw: list[int] = []
    for index, span in enumerate(offsets):
        # a whitespace-only token, or the leading bytes of a character split over tokens (its span is the
        # next token's), has no text of its own: it stays with the token before it (as in generation)
        blank = not text[span[0]:span[1]].strip() or (index + 1 < len(offsets) and offsets[index + 1] == span)
        raw.append(raw[-1] if blank and raw else bisect.bisect_right(seg.step_starts, token_anchor(text, span)) - 1)
    # anchors never decrease along the sequence, so each step's tokens form one run
    runs: list[list[int]] = []  # [nominal step, first token, last token, last character]
    for t, (nominal, span) in enumerate(zip(raw, offsets, strict=True)):
        if runs and runs[-1][0] == nominal:
            runs[-1][2], runs[-1][3] = t, max(runs[-1][3], span[1])
        else:
            runs.append([nominal, t, t, span[1]])
    token_step = torch.empty(len(raw), dtype=torch.long)
    steps = []
    for index, (nominal, first, last, char_end) in enumerate(runs):
        token_step[first:last + 1] = index
        char_span = (offsets[first][0], char_end)
        steps.append(Step(index, seg.step_segments[nominal], char_span, (first, last + 1),
                          text[char_span[0]:char_span[1]]))
    return token_step, steps


def offsets_for_ids(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of exactly these ids and each id's character span in it."""
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    if list(encoded["input_ids"]) == list(ids):
        return text, [tuple(o) for o in encoded["offset_mapping"]]
    # The ids are not the canonical tokenisation of their text: measure each id by prefix decoding.
    offsets, previous = [], 0
    for i in range(len(ids)):
        length = len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False))
        current = min(max(previous, length), len(text))
        offsets.append((previous, current))
        previous = current
    return text, offsets


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (size and 64 tokens spread over it)."""
    size = len(tokenizer)
    ids = sorted({round(i * (size - 1) / 63) for i in range(64)})
    payload = json.dumps([size, tokenizer.convert_ids_to_tokens(ids)])
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def resolve_tokenizer(model_or_tokenizer: Any) -> Any:
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None or not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        raise ModelMismatchError(
            "expected a TransformerLens model with a tokenizer, or a transformers tokenizer; got "
            f"{type(model_or_tokenizer).__name__}. Load models with stepsal.load_model(...)."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ModelMismatchError(
            f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; "
            "load the fast one (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    return tokenizer


# ---------------------------------------------------------------- traces


@dataclass
class Trace:
    """A scored token sequence with its step layout.

    Build one with :meth:`from_text` or :meth:`from_tokens`; ``tokens`` is exactly what is scored.
    """

    text: str
    tokens: Int64[Tensor, " token"]
    offsets: list[tuple[int, int]]
    layout: StepLayout
    fmt: str = "think"
    tokenizer_fingerprint: str = ""
    has_summary: bool = True
    kept_pieces: list[tuple[int, int]] = field(default_factory=list, repr=False)
    markers: tuple[tuple[int, int], tuple[int, int] | None] | None = None  # character spans of the markers

    def marker_end_token(self, segment: int) -> int | None:
        """Position of the token that completes the marker opening THINKING or SUMMARY (None if absent)."""
        marker = None if self.markers is None else self.markers[segment - 1]
        if marker is None:
            return None
        last_char = marker[1] - 1
        return next((t for t, (s, e) in enumerate(self.offsets) if s <= last_char < e), None)

    @classmethod
    def from_text(cls, text: str, model_or_tokenizer: Any, fmt: str | TraceFormat = "think", *,
                  add_special_tokens: bool = False, min_thinking_steps: int = 2,
                  allow_missing_summary: bool = False, sentence_end: str | None = None) -> Trace:
        """Tokenise ``text`` (chat template included, as generated) and segment it.

        ``sentence_end``: a regex ending thinking sentences, for traces the default rule does not
        split ('.' + whitespace, CJK 。！？, and । ۔ ։ ። + whitespace)."""
        if not isinstance(text, str):
            fix = " (decode it first: text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
            raise TraceFormatError(f"Trace.from_text needs the trace as a str; got {type(text).__name__}{fix}.")
        tokenizer = resolve_tokenizer(model_or_tokenizer)
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        return cls._build(text, ids, offsets, tokenizer, fmt, min_thinking_steps, allow_missing_summary,
                          sentence_end)

    @classmethod
    def from_tokens(cls, tokens: Sequence[int] | Tensor, model_or_tokenizer: Any,
                    fmt: str | TraceFormat = "think", *, min_thinking_steps: int = 2,
                    allow_missing_summary: bool = False, sentence_end: str | None = None,
                    prompt_length: int | None = None) -> Trace:
        """Segment an exact token sequence (for example a generated one) via its decoded text.

        ``prompt_length``: the first tokens were the prompt; markers it only quotes or closes (chat
        history) are not the model's (see :func:`stepsal.formats.prompt_thinking_from`)."""
        tokenizer = resolve_tokenizer(model_or_tokenizer)
        ids = _token_ids(tokens, len(tokenizer))
        text, offsets = offsets_for_ids(tokenizer, ids)
        thinking_from = None
        if prompt_length is not None:
            whole_number(prompt_length, "prompt_length", 0, len(ids))
            prompt_end = offsets[prompt_length - 1][1] if 0 < prompt_length <= len(offsets) else 0
            thinking_from = prompt_thinking_from(text[:prompt_end], get_format(fmt))
        return cls._build(text, ids, offsets, tokenizer, fmt, min_thinking_steps, allow_missing_summary,
                          sentence_end, thinking_from)

    @classmethod
    def _build(cls, text: str, ids: list[int], offsets: list[tuple[int, int]], tokenizer: Any,
               fmt: str | TraceFormat, min_thinking_steps: int, allow_missing_summary: bool,
               sentence_end: str | None = None, thinking_from: int | None = None) -> Trace:
        fmt = get_format(fmt)
        whole_number(min_thinking_steps, "min_thinking_steps", minimum=0)
        if not ids:
            raise TraceFormatError("the trace has no tokens.")
        seg = segment_text(text, fmt, allow_missing_summary, sentence_end, thinking_from)
        token_step, steps = align_tokens(text, offsets, seg)
        segments = torch.tensor([s.segment for s in steps], dtype=torch.long)
        layout = StepLayout(token_step, segments[token_step], steps)
        n_thinking = len(layout.steps_of(THINKING))
        if n_thinking < min_thinking_steps:
            raise TraceFormatError(too_few_steps(n_thinking, f"min_thinking_steps={min_thinking_steps}",
                                                 "min_thinking_steps"))
        return cls(text, torch.tensor(ids, dtype=torch.long), offsets, layout, fmt.name,
                   tokenizer_fingerprint(tokenizer), seg.has_summary, seg.kept_pieces, seg.markers)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        counts = {kind: sum(1 for s in self.layout.steps if s.segment == seg)
                  for kind, seg in (("question", QUESTION), ("thinking", THINKING), ("summary", SUMMARY))}
        return (f"Trace({len(self)} tokens, {self.layout.n_steps} steps: {counts['question']} question, "
                f"{counts['thinking']} thinking, {counts['summary']} summary; format {self.fmt!r})")

    def _repr_html_(self) -> str:
        return trace_html(repr(self), self.layout)

    def show(self) -> Widget:
        """The segmentation as a circuitsvis widget: tokens coloured by step (no model needed)."""
        return segmentation_widget(self.text, self.offsets, self.layout)

    def describe(self, width: int = 70, max_steps: int | None = None) -> str:
        """One line per step: index, kind, token span and the start of its text (with
        ``max_steps``, the first and last steps and a count of those left out)."""
        lines = [f"Trace: {len(self)} tokens, {self.layout.n_steps} steps, format {self.fmt!r}"]
        steps = self.layout.steps
        if max_steps is not None and len(steps) > max_steps:
            head = max(1, max_steps - 3)
            steps = steps[:head] + [None] + steps[-3:]
        for s in steps:
            if s is None:
                lines.append(f"  ... {self.layout.n_steps - head - 3} more steps ...")
                continue
            snippet = " ".join(s.text.split())
            snippet = snippet if len(snippet) <= width else snippet[: width - 3] + "..."
            lines.append(f"  {s.index:3d} {s.kind:<8} tokens {s.token_span[0]:5d}-{s.token_span[1]:<5d} {snippet}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens.tolist(), "offsets": [list(o) for o in self.offsets],
                "layout": self.layout.to_dict(), "fmt": self.fmt,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "has_summary": self.has_summary,
                "markers": self.markers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        """What :meth:`to_dict` wrote; tokens, offsets and layout must agree (:class:`TraceFormatError`)."""
        text, tokens = data["text"], torch.tensor(data["tokens"], dtype=torch.long)
        offsets = [_pair(o) for o in data["offsets"]]
        layout = StepLayout.from_dict(data["layout"])
        if not isinstance(text, str):
            raise TraceFormatError(f"a trace's text must be a str; got {type(text).__name__}.")
        if tokens.ndim != 1 or len(tokens) != layout.n_tokens or len(offsets) != len(tokens):
            raise TraceFormatError(f"the trace has {tokens.numel()} tokens, {len(offsets)} offsets and a layout of "
                                   f"{layout.n_tokens} tokens; they must agree. Pass what Trace.to_dict wrote.")
        if any(not 0 <= start <= end <= len(text) for start, end in offsets):
            raise TraceFormatError(f"the trace's offsets reach outside its text of {len(text)} characters; pass what "
                                   "Trace.to_dict wrote.")
        return cls(text, tokens, offsets, layout, str(data["fmt"]), str(data["tokenizer_fingerprint"]),
                   bool(data["has_summary"]), markers=_markers_from_json(data.get("markers")))


def require_trace(trace: Any, purpose: str) -> None:
    """Refuse anything but a :class:`Trace` (text, ids) with how to build one."""
    if not isinstance(trace, Trace):
        raise ArgumentTypeError(f"{purpose} needs a stepsal Trace; got {type(trace).__name__}. Build one with "
                                "stepsal.Trace.from_text(text, model) or Trace.from_tokens(ids, model).")


def _token_ids(tokens: Sequence[int] | Tensor, vocab_size: int) -> list[int]:
    """Token ids as a list, refused when they are no whole numbers in 0..vocab_size - 1."""
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise TraceFormatError(f"token ids must be whole numbers; got {str(tokens)[:80]}.") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TraceFormatError(f"token ids must be whole numbers; got dtype {ids.dtype}.")
    ids = ids.flatten()
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero().flatten()
    if bad.numel():
        first = int(bad[0])
        raise TraceFormatError(f"token id {int(ids[first])} at position {first} is outside this tokenizer's "
                               f"vocabulary (0..{vocab_size - 1}); pass the ids the model generated.")
    return ids.tolist()


def _pair(value: Any) -> tuple[int, int]:
    """A saved (start, end) pair as two ints."""
    start, end = value
    return int(start), int(end)


def _markers_from_json(value: Any) -> tuple[tuple[int, int], tuple[int, int] | None] | None:
    if value is None:
        return None
    thinking, summary = value
    return tuple(thinking), (tuple(summary) if summary is not None else None)
