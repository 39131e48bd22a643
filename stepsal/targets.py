"""Targets: the scalar L whose gradient Step-Saliency takes (METHOD.md section 3)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .traces import SUMMARY, Trace

TargetFn = Callable[[Float[Tensor, "token vocab"]], Tensor]
Target = str | int | TargetFn
TARGET_NAMES = ("all", "summary", "answer")


def next_token_loss(logits: Float[Tensor, "token vocab"], tokens: Tensor, predicted: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ``tokens[p]`` from position p - 1, for p in ``predicted``."""
    return F.cross_entropy(logits[predicted - 1].float(), tokens[predicted])


def answer_token_positions(trace: Trace, answer: str | tuple[int, int]) -> Tensor:
    """Token positions of the answer: a token span (start, end), or the last occurrence of a string."""
    if isinstance(answer, tuple):
        start, end = answer
    else:
        char = trace.text.rfind(answer)
        if not answer or char < 0:
            raise ValueError(f"answer {answer!r} does not occur in the trace text; pass the answer "
                             "exactly as written in the summary, or a token span (start, end).")
        overlapping = [t for t, (s, e) in enumerate(trace.offsets) if s < char + len(answer) and e > char]
        start, end = overlapping[0], overlapping[-1] + 1
    if not 1 <= start < end <= len(trace):
        raise ValueError(f"answer token span ({start}, {end}) must satisfy 1 <= start < end <= {len(trace)}.")
    return torch.arange(start, end)


def make_target(target: Target, trace: Trace, answer: str | tuple[int, int] | None = None,
                ) -> tuple[str, TargetFn]:
    """(description, function of the logits [T, V] of one trace -> scalar)."""
    tokens = trace.tokens
    if callable(target):
        return getattr(target, "__name__", "callable"), target
    if isinstance(target, int) and not isinstance(target, bool):
        return f"logit[{target}]@last", lambda logits: logits[-1, target].float()
    if target == "all":
        return "all", lambda logits: next_token_loss(logits, tokens.to(logits.device),
                                                     torch.arange(1, len(tokens), device=logits.device))
    if target == "summary":
        positions = (trace.layout.token_segment == SUMMARY).nonzero().flatten()
        positions = positions[positions > 0]
        if positions.numel() == 0:
            raise ValueError("target='summary' needs summary tokens; this trace has none. Use target='all'.")
        return "summary", lambda logits: next_token_loss(logits, tokens.to(logits.device), positions.to(logits.device))
    if target == "answer":
        if answer is None:
            raise ValueError("target='answer' needs answer='...' (text in the summary) or answer=(start, end).")
        positions = answer_token_positions(trace, answer)
        return "answer", lambda logits: next_token_loss(logits, tokens.to(logits.device), positions.to(logits.device))
    raise ValueError(f"unknown target {target!r}: use one of {TARGET_NAMES}, a token id (its logit at "
                     "the last position) or a callable on the logits [T, V].")
