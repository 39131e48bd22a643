"""Step Momentum Injection (docs/paper.md section 7) as tensor functions, beside :mod:`.oeb`.

At the first token of a new thinking step, each SMI layer adds ``alpha`` times the mean value
vector of the previous step: per head on the attention output (site ``z``), or through ``W_O`` onto
the residual stream after the layer (site ``resid_post``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int64
from torch import Tensor


def source_members(steps: Int64[Tensor, "batch *qdim key"], source: Int64[Tensor, "batch query"],
                   query_positions: Int64[Tensor, " query"], window: str | int) -> Bool[Tensor, "batch query key"]:
    """Which keys each query averages: the tokens of its source step before it (the last ``window``
    of them unless ``window == "step"``). ``steps`` are the keys' step labels as the queries saw them."""
    steps = steps if steps.dim() == 3 else steps[:, None, :]
    keys = torch.arange(steps.shape[-1], device=steps.device)
    earlier = keys[None, :] < query_positions[:, None]  # [q, k]
    members = (steps == source[:, :, None]) & earlier & (source[:, :, None] >= 0)
    if isinstance(window, int):  # else "step" (StepFlow accepts nothing else)
        from_end = members.flip(-1).cumsum(-1).flip(-1)
        members &= from_end <= window
    return members


def step_momentum(values: Float[Tensor, "batch key kv_head d_head"], members: Bool[Tensor, "batch query key"],
                  n_heads: int) -> Float[Tensor, "batch query head d_head"]:
    """Mean value vector of each query's member keys, per query head (grouped KV heads repeated)."""
    mean = torch.einsum("bqk,bknd->bqnd", members.to(values.device, values.dtype), values)
    counts = members.sum(-1).clamp(min=1)[..., None, None].to(values.device, values.dtype)
    return (mean / counts).repeat_interleave(n_heads // values.shape[2], dim=2)


OutputWeights = Float[Tensor, "head d_head d_model"] | Callable[[Tensor], Tensor]


def momentum_vector(mean: Float[Tensor, "batch query head d_head"], alpha: float, w_o: OutputWeights | None) -> Tensor:
    """What SMI adds: ``alpha * m`` per head [b, q, head, d_head] (site z), or ``alpha * sum_h m_h W_O[h]``
    [b, q, d_model] (site resid_post, with ``w_o``: W_O, or the output projection as a function of the
    concatenated heads [..., head * d_head] without its bias, where an engine keeps W_O packed)."""
    if w_o is None:
        return alpha * mean
    if callable(w_o):
        return w_o((alpha * mean).flatten(-2))
    return alpha * torch.einsum("bqhd,hdm->bqm", mean, w_o.to(mean.dtype))
