"""Odds-Equal Bridge (docs/paper.md section 6): give the bridge segment at least tau_B of each head's attention.

For a query in thinking, S = thinking keys, B = question keys, O = the rest; for a query in the
summary, S = summary, B = thinking, O = question. Question-phase queries are left alone. In
probability space the KL projection onto {q(B) = tau_B, q(S) = tau_S, q(O) = p(O)} rescales the
groups: A'[k] = A[k] * tau_g / p(g), O untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int64
from torch import Tensor

from ..traces import QUESTION, SUMMARY, THINKING

EPS = 1e-12  # guard for 1 - p(O) ~ 0 (docs/paper.md section 6)


@dataclass
class BridgeEdit:
    """What one application changed: the new pattern and, per (batch, head, query), the masses."""

    pattern: Float[Tensor, "batch head query key"]
    changed: Bool[Tensor, "batch head query"]
    mass_before: Float[Tensor, "batch head query"]
    mass_after: Float[Tensor, "batch head query"]


def bridge_groups(query_segment: Int64[Tensor, "batch query"], key_segment: Int64[Tensor, "batch *qdim key"],
                  query_position: Int64[Tensor, "*batch query"],
                  ) -> tuple[Bool[Tensor, "batch query key"], Bool[Tensor, "batch query key"]]:
    """Masks of the current segment S and the bridge B for each query (causal keys only).

    ``key_segment`` is [batch, key], or [batch, query, key] when queries see different key labels;
    ``query_position`` is [query], or [batch, query] when rows sit at different positions (an engine's batch).
    """
    n_keys = key_segment.shape[-1]
    causal = torch.arange(n_keys, device=key_segment.device) <= query_position[..., None]  # [(batch,) q, k]
    bridge_of = torch.where(query_segment == THINKING, QUESTION,
                            torch.where(query_segment == SUMMARY, THINKING, -2))
    own = torch.where((query_segment == THINKING) | (query_segment == SUMMARY), query_segment, -2)
    keys = key_segment if key_segment.dim() == 3 else key_segment[:, None, :]
    same = (keys == own[:, :, None]) & causal
    bridge = (keys == bridge_of[:, :, None]) & causal
    return same, bridge


def odds_equal_bridge(pattern: Float[Tensor, "batch head query key"],
                      query_segment: Int64[Tensor, "batch query"], key_segment: Int64[Tensor, "batch *qdim key"],
                      query_position: Int64[Tensor, "*batch query"], tau_max: float,
                      groups: tuple[Tensor, Tensor] | None = None) -> BridgeEdit:
    """Apply OEB to every query row; rows that do not qualify stay bit-identical.

    ``groups`` may pass precomputed :func:`bridge_groups` (they are the same for every layer).
    """
    same, bridge = groups if groups is not None else bridge_groups(query_segment, key_segment, query_position)
    n_same, n_bridge = same.sum(-1), bridge.sum(-1)  # [batch, query]
    tau = torch.sqrt(n_bridge / (n_bridge + n_same).clamp(min=1)).clamp(max=tau_max)[:, None]  # [b, 1, q]
    work = pattern.float()
    masks = torch.stack([bridge, same], 1).to(work.dtype)  # [b, 2, q, k]
    p_bridge, p_same = torch.einsum("bhqk,bgqk->gbhq", work, masks)
    free = 1.0 - (work.sum(-1) - p_bridge - p_same)  # 1 - p(O): the mass S and B may share
    tau_bridge = torch.minimum(tau.expand_as(p_bridge), free)
    tiny = torch.finfo(torch.float32).tiny  # any positive mass can be rescaled in float32
    act = ((n_bridge > 0) & (n_same > 0))[:, None] & (p_bridge < tau_bridge) & (p_bridge > tiny) \
        & (p_same > tiny) & (free > EPS)
    scale_bridge = torch.where(act, tau_bridge / p_bridge.clamp(min=tiny), 1.0)[..., None]
    scale_same = torch.where(act, (free - tau_bridge) / p_same.clamp(min=tiny), 1.0)[..., None]
    scale = torch.where(bridge[:, None], scale_bridge, torch.where(same[:, None], scale_same, 1.0))
    edited = torch.where(act[..., None], (work * scale).to(pattern.dtype), pattern)
    p_after = torch.einsum("bhqk,bqk->bhq", edited.float(), masks[:, 0])  # measured, not assumed
    return BridgeEdit(edited, act, p_bridge, p_after)
