"""circuitsvis widgets of traces and Step-Saliency results (steps as tokens, layers as heads)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..traces import SUMMARY, THINKING, StepLayout
from .figures import step_labels
from .render import Widget


def step_names(layout: StepLayout, width: int = 24) -> list[str]:
    """'T3:So·the·total·cost..' for every step: its label and the start of its text. circuitsvis's
    attention views delete every whitespace character from labels, so words are joined by '·'."""
    names = []
    for label, step in zip(step_labels(layout), layout.steps):
        text = "\u00b7".join(step.text.split())
        names.append(f"{label}:{text[:width]}{'..' if len(text) > width else ''}")
    return names


def token_strings(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """The text of each token (its character span), as the trace was scored."""
    return [text[start:end] for start, end in offsets]


def step_maps_widget(result: Any, norm: str = "row") -> Widget:
    """All layers' step -> step maps in one AttentionHeads view: steps as tokens, layers as heads."""
    maps = torch.nan_to_num(result.normalized(norm))
    return Widget("AttentionHeads", {
        "attention": maps, "tokens": step_names(result.layout),
        "attentionHeadNames": [f"layer {layer}" for layer in result.layers], "maskUpperTri": True,
    }, title=f"Step-Saliency maps ({result.rule}, {norm} norm, target {result.target}), one per layer: "
             "rows = query step, columns = key step")


def head_maps_widget(result: Any, layer: int, norm: str = "row") -> Widget:
    """Per-head step maps of one layer (needs ``per_head=True``)."""
    if result.head_sums is None:
        raise ValueError("per-head maps were not computed: call step_saliency(..., per_head=True).")
    if layer not in result.layers:
        raise ValueError(f"layer {layer} was not computed; this result has layers {result.layers}.")
    from ..pooling import normalize

    sums = result.head_sums[result.layers.index(layer)].double()
    maps = torch.nan_to_num(normalize(sums, result.members, norm).float())
    return Widget("AttentionHeads", {
        "attention": maps, "tokens": step_names(result.layout),
        "attentionHeadNames": [f"L{layer}H{head}" for head in range(maps.shape[0])], "maskUpperTri": True,
    }, title=f"Layer {layer}, per head ({norm} norm)")


def source_steps(layout: StepLayout, source: str | int) -> list[int]:
    if source == "summary":
        steps = layout.steps_of(SUMMARY)
        if not steps:
            raise ValueError("the trace has no summary steps: pass source=<step index>.")
        return steps
    if isinstance(source, int) and 0 <= source < layout.n_steps:
        return [source]
    raise ValueError(f"source must be 'summary' or a step index in 0..{layout.n_steps - 1}; got {source!r}.")


def received_per_token(result: Any, source: str | int) -> tuple[Tensor, bool]:
    """[token, layer]: saliency each token receives from the ``source`` steps' queries, as a share
    of what those queries give in that layer. Token resolution when computed with ``token_level=True``,
    else each token carries its step's block (divided by the step's length)."""
    rows = source_steps(result.layout, source)
    if result.token_sums is not None:
        received = result.token_sums[:, rows].sum(1).double()  # [layer, token]
        token_level = True
    else:
        sizes = result.members.sum(-1)  # tokens per step
        per_step = result.sums[:, rows].sum(1).double() / sizes.clamp(min=1)  # [layer, step]
        received = per_step[:, result.layout.token_step.clamp(min=0)] * (result.layout.token_step >= 0)
        token_level = False
    total = received.sum(-1, keepdim=True)
    return torch.nan_to_num(received / torch.where(total > 0, total, 1)).T.float(), token_level


def received_tokens_widget(result: Any, source: str | int = "summary") -> Widget:
    """The trace's tokens coloured by the saliency they receive from ``source``, one colouring per layer."""
    if result.token_texts is None:
        raise ValueError("this result has no token texts (saved by an older stepsal); recompute it.")
    values, token_level = received_per_token(result, source)
    what = "the summary" if source == "summary" else f"step {source}"
    return Widget("ColoredTokensMulti", {
        "tokens": result.token_texts, "values": values, "labels": [f"layer {layer}" for layer in result.layers],
    }, title=f"Saliency each token receives from {what}, per layer (share of the layer's total; "
             + ("token resolution)" if token_level else "step resolution: step_saliency(..., token_level=True) "
                                                        "gives token resolution)"))


def segmentation_widget(text: str, offsets: list[tuple[int, int]], layout: StepLayout) -> Widget:
    """Tokens coloured by step, from a trace's text and offsets."""
    return segmentation_from_tokens(token_strings(text, offsets), layout)


def segmentation_from_tokens(tokens: list[str], layout: StepLayout) -> Widget:
    """Tokens coloured by step (thinking steps in alternating shades; question and summary in the
    negative colour); the second colouring is the step index."""
    values = []
    for step in layout.token_step.tolist():
        if step < 0:
            values.append([0.0, -1.0])
            continue
        shade = 0.35 + 0.5 * (step % 2)
        values.append([shade if layout.steps[step].segment == THINKING else -shade, float(step)])
    return Widget("ColoredTokensMulti", {
        "tokens": tokens, "values": torch.tensor(values), "labels": ["segment / step", "step index"],
    }, title=f"Segmentation: {layout.n_steps} steps (thinking steps in alternating shades; hover a token for "
             "its step)")
