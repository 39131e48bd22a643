"""Attention knockout between groups of a trace's tokens, as TransformerLens hooks on ``hook_pattern``.

Removing the attention of some queries to some keys and renormalising each affected row over its
remaining keys is the same as masking those keys out of the softmax: for a row A and kept keys K,
A'[k] = A[k] / sum_{j in K} A[j] = exp(s_k) / sum_{j in K} exp(s_j).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from jaxtyping import Bool
from torch import Tensor

from ..backends import transformerlens_adapter
from ..errors import StepsalError
from ..hookpoints import hook_name, hooks_attached
from ..model_types import TLModel
from ..options import check_layer_range, is_whole, layer_numbers, whole_numbers
from ..sites import attention_sites
from ..traces import SEGMENT_NAMES, Trace, require_trace

Group = str | int | Sequence[int] | Tensor


def group_mask(trace: Trace, group: Group) -> Bool[Tensor, " token"]:
    """Tokens of a group: "question" / "thinking" / "summary", a step index, a list of step
    indices, or a boolean mask over the trace's tokens."""
    layout = trace.layout
    if isinstance(group, (list, tuple)) and group and all(type(item).__name__ in ("bool", "bool_") for item in group):
        group = torch.tensor(group, dtype=torch.bool)  # a mask written as a list
    if isinstance(group, Tensor) and group.dtype == torch.bool:
        if group.shape != (len(trace),):
            raise StepsalError(f"a token mask must have shape ({len(trace)},); got {tuple(group.shape)}.")
        return group.clone()
    if isinstance(group, str):
        if group not in SEGMENT_NAMES:
            raise StepsalError(f"unknown group {group!r}: use one of {SEGMENT_NAMES}, step indices or a token mask.")
        return layout.token_segment == SEGMENT_NAMES.index(group)
    if not (is_whole(group) or isinstance(group, (Sequence, Tensor))):
        raise StepsalError(f"unknown group {group!r}: use one of {SEGMENT_NAMES}, step indices or a token mask.")
    steps: list[Any] = [group] if is_whole(group) else list(cast("Sequence[int]", group))
    bad = [s for s in steps if not (is_whole(s) and 0 <= s < layout.n_steps)]
    if not steps or bad:
        raise StepsalError(f"steps must be indices in 0..{layout.n_steps - 1}; got {group!r}.")
    steps = [int(s) for s in steps]
    return torch.isin(layout.token_step, torch.tensor(steps))


@contextmanager
def knockout(model: TLModel, trace: Trace, queries: Group, keys: Group, layers: Sequence[int] | None = None,
             heads: Sequence[int] | None = None) -> Iterator[None]:
    """Remove the attention from the ``queries`` tokens to the ``keys`` tokens (renormalising each
    affected row) in ``layers`` (default: every layer with a usable pattern) and ``heads`` (default
    all). Works for plain forwards over the trace, :func:`stepsal.step_saliency` and KV-cached
    :func:`stepsal.generate` (positions past the trace belong to no group). Hooks go away on exit."""
    require_trace(trace, "knockout")
    adapter = transformerlens_adapter(model, "knockout")
    sites = attention_sites(model)
    if layers is None:
        layers = sites.attention_layers
    else:
        layers = layer_numbers(layers)
        check_layer_range(layers, adapter.n_layers)
        if not layers:
            raise StepsalError(f"layers must name at least one layer of 0..{adapter.n_layers - 1}; got [] (a knockout "
                               "nowhere changes nothing).")
    sites.require_attention(layers, f"knockout on {adapter.label}")
    n_heads = adapter.n_heads
    heads = list(range(n_heads)) if heads is None else whole_numbers(heads, "heads", "head")
    if not heads or not all(0 <= h < n_heads for h in heads):
        raise StepsalError(f"heads must be a non-empty subset of 0..{n_heads - 1}; got {heads}.")
    query_mask, key_mask = group_mask(trace, queries), group_mask(trace, keys)
    # a query keeps a key unless every key up to it is knocked out: those before the first free key
    free = (~key_mask).nonzero().flatten()
    first_free = int(free[0]) if free.numel() else len(trace)
    starved = (query_mask & (torch.arange(len(trace)) < first_free)).nonzero().flatten().tolist()
    if starved:
        raise StepsalError(f"query tokens {starved[:5]}{' ...' if len(starved) > 5 else ''} would lose every key "
                           "(they only see keys of the knocked-out group); exclude them from queries or keys.")
    head_mask = torch.zeros(n_heads, dtype=torch.bool)
    head_mask[heads] = True
    cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def masks_on(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in cache:
            cache[device] = (query_mask.to(device), key_mask.to(device), head_mask.to(device))
        return cache[device]

    def remove_and_renormalise(pattern: Tensor, hook: Any) -> Tensor:
        q, k = pattern.shape[-2:]
        queries_in, keys_in, heads_in = masks_on(pattern.device)
        positions = torch.arange(k - q, k, device=pattern.device)
        in_trace = positions < len(trace)
        rows = torch.zeros(q, dtype=torch.bool, device=pattern.device)
        rows[in_trace] = queries_in[positions[in_trace]]
        columns = torch.zeros(k, dtype=torch.bool, device=pattern.device)
        columns[:min(k, len(trace))] = keys_in[:k]
        cut = heads_in[:, None, None] & rows[None, :, None] & columns[None, None, :]  # [head, q, k]
        kept = pattern.masked_fill(cut, 0.0)
        affected = cut.any(-1, keepdim=True)
        return torch.where(affected, kept / kept.sum(-1, keepdim=True), pattern)

    with hooks_attached(model, [(hook_name(layer, "pattern"), remove_and_renormalise) for layer in layers]):
        yield
