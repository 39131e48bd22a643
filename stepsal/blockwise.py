"""Exact softmax attention one block of queries at a time, whose backward pass shows A and dL/dA.

One layer, one sequence: q [H, T, D], k and v [H_kv, T, D] (query head h uses key/value group
h // (H / H_kv)), causal, with an optional sliding window, tanh softcapping of the scores and a
per-head sink logit that joins the softmax without a value (GPT-OSS). No [H, T, T] tensor exists:
the forward pass is torch's fused attention where it serves (else a loop over query blocks) and
keeps z; the backward pass recomputes A for one block of queries at a time and forms
dL/dA[h, t, k] = dL/dz[h, t, :] . v[g(h), k, :] (z = A v per head), so an ``observer`` can pool
attention x gradient there, in memory linear in T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def _block_scores(qg: Tensor, k: Tensor, spec: AttentionSpec, start: int, end: int, key_start: int,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Masked scores [H_kv, g * b, n] of queries [start, end) (``qg`` [H_kv, g, T, d], already times
    the scale) on keys [key_start, end) (float32, into ``out`` if given), and tanh(raw / softcap) where
    softcapped (for the backward pass). One batched product per KV group: its query heads share the keys."""
    n_kv, group, _, d = qg.shape
    queries = qg[:, :, start:end].reshape(n_kv, group * (end - start), d)
    scores = torch.bmm(queries, k[:, key_start:end].float().transpose(1, 2), out=out)
    capped = None
    if spec.softcap:
        capped = torch.tanh(scores / spec.softcap)
        scores = torch.mul(capped, spec.softcap, out=scores)
    blocked = scores.view(n_kv, group, end - start, end - key_start)
    if spec.window is None:  # keys before the block are all visible: mask the diagonal square only
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=qg.device).triu_(1)
        blocked[..., start - key_start:].masked_fill_(future, -math.inf)
    else:
        visible = visibility(torch.arange(start, end, device=qg.device), torch.arange(key_start, end, device=qg.device),
                             spec.window)
        blocked.masked_fill_(~visible, -math.inf)
    return scores, capped


def _sink_logits(spec: AttentionSpec, n_kv: int, group: int) -> Tensor | None:
    return None if spec.sinks is None else spec.sinks.float().reshape(n_kv, group, 1)


def _sdpa_serves(spec: AttentionSpec) -> bool:
    """Whether torch's fused attention computes the same z (no softcap, sinks or window)."""
    return spec.softcap is None and spec.sinks is None and spec.window is None


class BlockwiseAttention(torch.autograd.Function):
    """z = softmax(scores) v per head; its backward pass goes block by block of queries.

    Forward: torch's fused ``scaled_dot_product_attention`` where it computes the same attention,
    else a loop over query blocks. Backward: each block's rows of A are complete (every key a query
    sees), so A is a softmax of the block's scores; nothing but z is kept from the forward pass."""

    @staticmethod
    def forward(ctx, q: Float[Tensor, "head token d"], k: Float[Tensor, "kv_head token d"],
                v: Float[Tensor, "kv_head token d_v"], spec: AttentionSpec,
                observer: Observer | None) -> Float[Tensor, "head token d_v"]:
        if _sdpa_serves(spec):
            z = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=spec.scale,
                                               enable_gqa=q.shape[0] != k.shape[0])[0]
        else:
            z = _looped_forward(q, k, v, spec)
        ctx.spec, ctx.observer = spec, observer
        ctx.save_for_backward(q, k, v, z)
        return z

    @staticmethod
    def backward(ctx, grad_z: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, z = ctx.saved_tensors
        spec, observer = ctx.spec, ctx.observer
        n_heads, n_tokens, d = q.shape
        n_kv = k.shape[0]
        group = n_heads // n_kv
        qg = (q.float() * spec.scale).reshape(n_kv, group, n_tokens, d)
        dz = grad_z.float().reshape(n_kv, group, n_tokens, -1)
        # sum_k A dL/dA per query, the softmax Jacobian's row term: dL/dz . z where z is float32, else per block
        delta = (dz * z.reshape(dz.shape)).sum(-1) if z.dtype == torch.float32 else None
        sinks = _sink_logits(spec, n_kv, group)
        dq = torch.empty(qg.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        # the largest block's [H_kv, g * b, n] tensors, allocated once (not once per block)
        work = _Workspace(3, n_heads * min(spec.block, n_tokens) * n_tokens, q.device)
        for start in range(0, n_tokens, spec.block):
            end = min(n_tokens, start + spec.block)
            key_start, rows = _key_start(spec, start), group * (end - start)
            shape = (n_kv, rows, end - key_start)
            work.reset()
            scores, capped = _block_scores(qg, k, spec, start, end, key_start, out=work.take(shape))
            if sinks is None:
                weights = torch.softmax(scores, -1, out=work.take(shape))
            else:  # a sink takes its share of the softmax and has no value
                blocked = scores.view(n_kv, group, end - start, -1)
                total = torch.logaddexp(torch.logsumexp(blocked, -1), sinks)
                weights = blocked.sub_(total[..., None]).exp_().view(shape)
            dz_block = dz[:, :, start:end].reshape(n_kv, rows, -1)
            v_keys = v[:, key_start:end].float()
            grad_weights = torch.bmm(dz_block, v_keys.transpose(1, 2), out=work.take(shape))  # dL/dA
            if observer is not None:
                observer(start, key_start, weights.view(n_heads, end - start, -1),
                         grad_weights.view(n_heads, end - start, -1))
            row_term = (delta[:, :, start:end] if delta is not None else
                        (weights * grad_weights).sum(-1).view(n_kv, group, end - start))
            grad_scores = grad_weights.view(n_kv, group, end - start, -1).sub_(row_term[..., None])
            grad_scores = grad_scores.view(shape).mul_(weights)
            if capped is not None:
                grad_scores.mul_(1 - capped * capped)
            dq[:, :, start:end] = torch.bmm(grad_scores, k[:, key_start:end].float()).view(
                n_kv, group, end - start, d) * spec.scale
            queries = qg[:, :, start:end].reshape(n_kv, rows, d)
            dk[:, key_start:end] += torch.bmm(grad_scores.transpose(1, 2), queries)
            dv[:, key_start:end] += torch.bmm(weights.transpose(1, 2), dz_block)
        return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _Workspace:
    """Float32 buffers, each as large as the largest block's [H_kv, g * b, n], handed out in turn as
    contiguous tensors and reused block after block: on a CPU each fresh large tensor costs page
    faults over all its memory."""

    def __init__(self, count: int, size: int, device: torch.device):
        self.buffers = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(count)]
        self.used = 0

    def reset(self) -> None:
        self.used = 0

    def take(self, shape: tuple[int, ...]) -> Tensor:
        self.used += 1
        return self.buffers[self.used - 1][:math.prod(shape)].view(shape)


def _looped_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
    """z [H, T, d_v] one block of queries at a time (softcap, sinks and windows included)."""
    n_heads, n_tokens, d = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    qg = (q.float() * spec.scale).reshape(n_kv, group, n_tokens, d)
    sinks = _sink_logits(spec, n_kv, group)
    z = torch.empty(n_kv, group, n_tokens, v.shape[-1], dtype=torch.float32, device=q.device)
    for start in range(0, n_tokens, spec.block):
        end = min(n_tokens, start + spec.block)
        key_start = _key_start(spec, start)
        scores, _ = _block_scores(qg, k, spec, start, end, key_start)
        scores = scores.view(n_kv, group, end - start, -1)
        top = scores.amax(-1)
        if sinks is not None:
            top = torch.maximum(top, sinks)
        weights = torch.exp(scores - top[..., None])
        total = weights.sum(-1) + (torch.exp(sinks - top) if sinks is not None else 0)
        z[:, :, start:end] = torch.matmul(weights / total[..., None], v[:, None, key_start:end].float())
    return z.reshape(n_heads, n_tokens, -1).to(v.dtype)


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
