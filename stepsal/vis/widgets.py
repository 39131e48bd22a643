"""circuitsvis widgets of plain data: step maps as attention patterns (steps as tokens, layers or
heads as heads), tokens coloured by values, a layout's segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..segments import QUESTION, THINKING
from .labels import step_names
from .render import Widget

if TYPE_CHECKING:
    from ..traces import StepLayout

__all__ = ["colored_tokens_widget", "segmentation_from_tokens", "segmentation_widget", "step_maps_widget",
           "step_names", "token_strings"]


def token_strings(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """The text of each token (its character span), as the trace was scored."""
    return [text[start:end] for start, end in offsets]


def step_maps_widget(maps: Any, labels: Sequence[str], names: Sequence[str], title: str = "") -> Widget:
    """Step -> step maps [map, step_q, step_k] in one AttentionHeads view: the steps (``labels``) play
    the tokens, the maps (``names``: layers, or one layer's heads) play the heads. NaN shows as 0; the
    colour scale runs from 0 to the largest value shown (a row spread over ten steps is not near-black),
    and symmetric around 0 when some values are negative (signed maps)."""
    values = torch.nan_to_num(torch.as_tensor(maps, dtype=torch.float32))
    top = float(values.abs().max()) if values.numel() else 0.0
    top = top if top > 0 else 1.0
    signed = values.numel() > 0 and float(values.min()) < 0
    return Widget("AttentionHeads", {
        "attention": values, "tokens": list(labels), "attentionHeadNames": list(names), "maskUpperTri": True,
        "minValue": -top if signed else 0.0, "maxValue": top,
    }, title=title)


def colored_tokens_widget(tokens: Sequence[str], values: Any, labels: Sequence[str], title: str = "") -> Widget:
    """Tokens coloured by ``values`` [token, colouring], one colouring per entry of ``labels``."""
    return Widget("ColoredTokensMulti", {"tokens": list(tokens), "values": values, "labels": list(labels)},
                  title=title)


def segmentation_widget(text: str, offsets: list[tuple[int, int]], layout: StepLayout) -> Widget:
    """Tokens coloured by step, from a trace's text and offsets."""
    return segmentation_from_tokens(token_strings(text, offsets), layout)


def segmentation_from_tokens(tokens: list[str], layout: StepLayout) -> Widget:
    """Tokens coloured by step: thinking steps in alternating shades of the positive colour, the question
    in the full negative colour, summary steps in alternating lighter shades of it (so the question and
    the first summary step never share a colour); the second colouring is the step index."""
    values = []
    for step in layout.token_step.tolist():
        if step < 0:
            values.append([0.0, -1.0])
            continue
        segment = layout.steps[step].segment
        if segment == QUESTION:
            shade = 1.0
        else:
            shade = 0.35 + 0.5 * (step % 2) if segment == THINKING else 0.2 + 0.25 * (step % 2)
        values.append([shade if segment == THINKING else -shade, float(step)])
    return colored_tokens_widget(tokens, torch.tensor(values), ["segment / step", "step index"],
                                 title=f"Segmentation: {len(layout.steps)} steps (question dark, thinking steps and "
                                       "summary steps in alternating shades; hover a token for its step)")
