"""Targets: the scalar L whose gradient Step-Saliency takes (docs/paper.md section 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .errors import OptionError, StepsalError
from .options import TARGET_NAMES
from .traces import SUMMARY, Trace

TargetFn = Callable[[Float[Tensor, "token vocab"]], Tensor]
Target = str | int | TargetFn


def next_token_loss(logits: Float[Tensor, "token vocab"], tokens: Tensor, start: int, end: int) -> Tensor:
    """Mean cross-entropy of predicting ``tokens[p]`` from position p - 1, for start <= p < end.

    Slices, not index lists: no [T, V] copy in the forward pass or scatter in the backward pass.
    """
    return F.cross_entropy(logits[start - 1:end - 1].float(), tokens[start:end].to(logits.device))


def answer_token_span(trace: Trace, answer: str | tuple[int, int]) -> tuple[int, int]:
    """Token positions of the answer: a token span (start, end), or the last occurrence of a string."""
    if isinstance(answer, tuple):
        start, end = answer
    else:
        summary = (trace.layout.token_segment == SUMMARY).nonzero().flatten()
        if summary.numel() == 0:
            raise StepsalError(f"answer {answer!r}: the trace has no summary to find it in; pass a complete "
                               "trace (thinking closed, then the summary), or a token span (start, end).")
        summary_char = trace.offsets[int(summary[0])][0]
        char = trace.text.rfind(answer, summary_char) if answer else -1  # the summary only
        if char < 0:
            where = (" (only before it: in the question or the thinking)" if answer and answer in trace.text
                     else "")
            raise StepsalError(f"answer {answer!r} does not occur in the trace's summary{where}; pass the "
                               "answer exactly as written in the summary, or a token span (start, end).")
        overlapping = [t for t, (s, e) in enumerate(trace.offsets) if s < char + len(answer) and e > char]
        start, end = overlapping[0], overlapping[-1] + 1
    if not 1 <= start < end <= len(trace):
        raise StepsalError(f"answer token span ({start}, {end}) must satisfy 1 <= start < end <= {len(trace)}.")
    return start, end


def make_target(target: Target, trace: Trace, answer: str | tuple[int, int] | None = None,
                vocab_size: int | None = None) -> tuple[str, TargetFn]:
    """(description, function of the logits [T, V] of one trace -> scalar)."""
    if callable(target):
        return getattr(target, "__name__", "callable"), target
    rows = row_target(target, trace, answer, vocab_size)
    assert rows is not None  # None only for a callable target, returned above
    if rows.token_id is not None:
        return f"logit[{rows.token_id}]@last", lambda logits: logits[-1, rows.token_id].float()
    tokens = trace.tokens
    return str(target), lambda logits: next_token_loss(logits, tokens, rows.start + 1, rows.end + 1)


@dataclass(frozen=True)
class RowTarget:
    """A built-in target as the logits rows it reads: the mean next-token loss over rows
    [start, end) (row p predicts token p + 1), or with ``token_id`` that logit in the one row
    (the blockwise mode computes logits for these rows only, in chunks)."""

    start: int
    end: int
    token_id: int | None = None


def row_target(target: Target, trace: Trace, answer: str | tuple[int, int] | None = None,
               vocab_size: int | None = None) -> RowTarget | None:
    """The logits rows a target reads (None for a callable, which may read all of them); bad
    targets are refused here (a token id outside 0..vocab_size - 1 too, when ``vocab_size`` is given)."""
    if callable(target):
        return None
    if isinstance(target, int) and not isinstance(target, bool):
        if target < 0 or (vocab_size is not None and target >= vocab_size):
            vocab = f"0..{vocab_size - 1}" if vocab_size is not None else "0 or more"
            raise OptionError(f"target={target} is no token id of this model (ids are {vocab}; a negative "
                              "number is not read as a Python index). Pass a token id, e.g. "
                              "tokenizer.convert_tokens_to_ids(...), or a named target.")
        return RowTarget(len(trace) - 1, len(trace), target)
    if target == "all":
        if len(trace) < 2:
            raise StepsalError(f"target='all' is the mean next-token loss, which needs a trace of at least 2 "
                               f"tokens; this one has {len(trace)}. Pass the whole trace, question included.")
        return RowTarget(0, len(trace) - 1)
    if target == "summary":
        positions = (trace.layout.token_segment == SUMMARY).nonzero().flatten()  # one contiguous run
        if positions.numel() == 0 or positions[-1] == 0:
            raise StepsalError("target='summary' needs summary tokens; this trace has none. Use target='all'.")
        return RowTarget(max(1, int(positions[0])) - 1, int(positions[-1]))
    if target == "answer":
        if answer is None:
            raise StepsalError("target='answer' needs answer='...' (text in the summary) or answer=(start, end).")
        start, end = answer_token_span(trace, answer)
        return RowTarget(start - 1, end - 1)
    raise OptionError(f"unknown target {target!r}: use one of {TARGET_NAMES}, a token id (its logit at "
                      "the last position) or a callable on the logits [T, V].")
