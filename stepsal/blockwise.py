"""Exact softmax attention one block of queries at a time, whose backward pass shows A and dL/dA.

One layer, one sequence: q [H, T, D], k and v [H_kv, T, D] (query head h uses key/value group
h // (H / H_kv)), causal, with an optional sliding window, tanh softcapping of the scores and a
per-head sink logit that joins the softmax without a value (GPT-OSS). No [H, T, T] tensor exists:
the forward pass keeps each query's log-sum-exp; the backward pass recomputes A for one block of
queries at a time and forms dL/dA[h, t, k] = dL/dz[h, t, :] . v[g(h), k, :] (z = A v per head), so
an ``observer`` can pool attention x gradient there, in memory linear in T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import StepsalError

# observer(query_start, key_start, A, dL/dA) with A, dL/dA [head, query_block, key_block]
Observer = Callable[[int, int, Tensor, Tensor], None]
BLOCK = 256  # queries per block: [H, 256, T] float32 is 9 MB per 1k keys at 9 heads


@dataclass(frozen=True)
class AttentionSpec:
    """How scores become weights: scores = softcap(scale * q.k), masked, softmax (with sinks)."""

    scale: float
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap)
    window: int | None = None  # key k is visible to query t when t - window < k <= t
    sinks: Tensor | None = None  # [H] sink logits
    block: int = BLOCK


def visibility(queries: Tensor, keys: Tensor, window: int | None) -> Tensor:
    """[q, k] booleans: key position k is visible to query position t (k <= t, within the window)."""
    visible = keys[None, :] <= queries[:, None]
    return visible & (keys[None, :] > queries[:, None] - window) if window else visible


def _key_start(spec: AttentionSpec, query_start: int) -> int:
    return 0 if spec.window is None else max(0, query_start - spec.window + 1)


def _block_scores(q: Tensor, k: Tensor, spec: AttentionSpec, start: int, end: int, key_start: int,
                  key_end: int) -> tuple[Tensor, Tensor | None]:
    """Masked scores [H_kv, g, b, n] of queries [start, end) on keys [key_start, key_end) (float32),
    and tanh(raw / softcap) where softcapped (for the backward pass)."""
    scores = torch.matmul(q[:, :, start:end].float(), k[:, key_start:key_end].float().transpose(-1, -2)[:, None])
    scores = scores * spec.scale
    capped = None
    if spec.softcap:
        capped = torch.tanh(scores / spec.softcap)
        scores = capped * spec.softcap
    visible = visibility(torch.arange(start, end, device=q.device), torch.arange(key_start, key_end, device=q.device),
                         spec.window)
    return scores.masked_fill(~visible, -math.inf), capped


def _sink_logits(spec: AttentionSpec, n_kv: int, group: int) -> Tensor | None:
    return None if spec.sinks is None else spec.sinks.float().reshape(n_kv, group, 1)


class BlockwiseAttention(torch.autograd.Function):
    """z = softmax(scores) v per head, computed and differentiated block by block of queries."""

    @staticmethod
    def forward(ctx, q: Float[Tensor, "head token d"], k: Float[Tensor, "kv_head token d"],
                v: Float[Tensor, "kv_head token d_v"], spec: AttentionSpec,
                observer: Observer | None) -> Float[Tensor, "head token d_v"]:
        n_heads, n_tokens, _ = q.shape
        n_kv = k.shape[0]
        group = n_heads // n_kv
        qg = q.reshape(n_kv, group, n_tokens, -1)
        sinks = _sink_logits(spec, n_kv, group)
        z = torch.empty(n_kv, group, n_tokens, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(n_kv, group, n_tokens, dtype=torch.float32, device=q.device)
        for start in range(0, n_tokens, spec.block):
            end = min(n_tokens, start + spec.block)
            key_start = _key_start(spec, start)
            scores, _ = _block_scores(qg, k, spec, start, end, key_start, end)
            top = scores.amax(-1)
            if sinks is not None:
                top = torch.maximum(top, sinks)
            weights = torch.exp(scores - top[..., None])
            total = weights.sum(-1) + (torch.exp(sinks - top) if sinks is not None else 0)
            z[:, :, start:end] = torch.matmul(weights / total[..., None], v[:, None, key_start:end].float())
            lse[:, :, start:end] = top + torch.log(total)
        ctx.spec, ctx.observer = spec, observer
        ctx.save_for_backward(q, k, v, z, lse)
        return z.reshape(n_heads, n_tokens, -1).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_z: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, z, lse = ctx.saved_tensors
        spec, observer = ctx.spec, ctx.observer
        n_kv, group, n_tokens, _ = z.shape
        qg = q.reshape(n_kv, group, n_tokens, -1)
        dz = grad_z.float().reshape(n_kv, group, n_tokens, -1)
        delta = (dz * z).sum(-1)  # sum_k A dL/dA per query: the softmax Jacobian's row term
        dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for start in range(0, n_tokens, spec.block):
            end = min(n_tokens, start + spec.block)
            key_start = _key_start(spec, start)
            scores, capped = _block_scores(qg, k, spec, start, end, key_start, end)
            weights = torch.exp(scores - lse[:, :, start:end, None])  # A, 0 where masked
            v_keys = v[:, None, key_start:end].float()
            grad_weights = torch.matmul(dz[:, :, start:end], v_keys.transpose(-1, -2))  # dL/dA
            if observer is not None:
                observer(start, key_start, weights.flatten(0, 1), grad_weights.flatten(0, 1))
            grad_scores = weights * (grad_weights - delta[:, :, start:end, None])
            if capped is not None:
                grad_scores = grad_scores * (1 - capped * capped)
            grad_scores = grad_scores * spec.scale
            dq[:, :, start:end] = torch.matmul(grad_scores, k[:, None, key_start:end].float())
            dk[:, key_start:end] += torch.matmul(grad_scores.transpose(-1, -2), qg[:, :, start:end].float()).sum(1)
            dv[:, key_start:end] += torch.matmul(weights.transpose(-1, -2), dz[:, :, start:end]).sum(1)
        return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def blockwise_attention(q: Float[Tensor, "head token d"], k: Float[Tensor, "kv_head token d"],
                        v: Float[Tensor, "kv_head token d_v"], spec: AttentionSpec,
                        observer: Observer | None = None) -> Float[Tensor, "head token d_v"]:
    """Causal attention of one sequence without an [H, T, T] tensor; see :class:`BlockwiseAttention`."""
    if q.shape[0] % k.shape[0]:
        raise StepsalError(f"{q.shape[0]} query heads do not split into {k.shape[0]} key/value groups.")
    return BlockwiseAttention.apply(q, k, v, spec, observer)


def eager_pattern(query: Float[Tensor, "batch head query d"], key: Float[Tensor, "batch kv_head key d"],
                  scale: float, softcap: float | None = None, sinks: Tensor | None = None,
                  mask: Tensor | None = None, window: int | None = None) -> Float[Tensor, "batch head query key"]:
    """Attention weights as eager attention computes them: the queries are the last of the keys;
    ``mask`` [B, 1, q, k] (bool: visible, or additive), else causal within ``window``. Rows with no
    visible key (padding) are 0."""
    batch, heads, n_queries, d = query.shape
    grouped = query.reshape(batch, key.shape[1], -1, d)  # a KV head's query heads side by side: keys not repeated
    scores = torch.matmul(grouped, key.transpose(-1, -2)).view(batch, heads, n_queries, -1) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    n_keys = key.shape[2]
    if mask is None:
        visible = visibility(torch.arange(n_keys - n_queries, n_keys, device=query.device),
                             torch.arange(n_keys, device=query.device), window)
        scores = scores.masked_fill(~visible, -math.inf)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., -n_keys:], -math.inf)
    else:
        scores = scores + mask[..., -n_keys:]
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        pattern = torch.softmax(torch.cat([scores, sink], -1).float(), -1)[..., :-1]
    else:
        pattern = torch.softmax(scores.float(), -1)
    return torch.nan_to_num(pattern, nan=0.0).to(query.dtype)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """The same attention with the full [H, T, T] pattern (tests): (z, pattern)."""
    pattern = eager_pattern(q[None].float(), k[None].float(), spec.scale, spec.softcap, spec.sinks,
                            window=spec.window)[0]
    return pattern @ v.float().repeat_interleave(q.shape[0] // k.shape[0], 0), pattern
