"""Which layers of a loaded model expose the hook points stepsal needs, found by probing them.

Adapters differ: some discard edits to ``hook_pattern`` (attention computed inside transformers),
hybrid models have layers with linear attention and no pattern at all, and MLA adapters hand out
``hook_v`` as [batch, head, pos, d] instead of [batch, pos, head, d]. Rather than trusting names,
one forward and backward over a few tokens shows what each layer really does; the result is cached
per model object.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import UnsupportedModelError
from .hookpoints import first_device, forward_kwargs, hook_name, hooks_attached
from .model_types import TLModel

PROBE_TOKENS = 13  # no head count or head size we know of equals it, so layouts are unambiguous


@dataclass(frozen=True)
class AttentionSites:
    """What one probe forward and backward found, per layer."""

    n_layers: int
    pattern_layers: tuple[int, ...]  # hook_pattern fires
    ignored_layers: tuple[int, ...]  # hook_pattern fires but edits to it never reach the output
    value_layout: dict[int, str]  # per layer with hook_v: "pos_head" or "head_pos"
    z_layers: tuple[int, ...]  # hook_z fires with [batch, pos, head, d_value]

    @property
    def attention_layers(self) -> list[int]:
        """Layers whose softmax pattern stepsal can read and edit."""
        return [layer for layer in self.pattern_layers if layer not in self.ignored_layers]

    def describe_missing(self, layers: list[int]) -> str:
        no_pattern = [layer for layer in layers if layer not in self.pattern_layers]
        ignored = [layer for layer in layers if layer in self.ignored_layers]
        parts = []
        if no_pattern:
            parts.append(f"layers {no_pattern} never fire hook_pattern (the adapter computes attention inside "
                         "transformers, or the layer mixes tokens without softmax attention: linear attention, "
                         "state space)")
        if ignored:
            parts.append(f"layers {ignored} discard edits to hook_pattern (this adapter computes attention "
                         "inside transformers), so gradients and StepFlow would be silent no-ops there")
        return "; ".join(parts)

    def require_attention(self, layers: list[int], purpose: str) -> None:
        """Refuse ``layers`` that lack a usable pattern, naming the ones that have it."""
        missing = [layer for layer in layers if layer not in self.attention_layers]
        if missing:
            usable = self.attention_layers
            raise UnsupportedModelError(
                f"{purpose}: {self.describe_missing(missing)}. Layers with a usable pattern: "
                f"{usable if usable else 'none'}. "
                + ("Pass layers from that list." if usable else
                   "Use backend='hooked' if HookedTransformer supports the architecture."))


_SITES: weakref.WeakKeyDictionary[Any, AttentionSites] = weakref.WeakKeyDictionary()
_PROBE_LOGITS: weakref.WeakKeyDictionary[Any, Tensor] = weakref.WeakKeyDictionary()


def probe_ids(vocab_size: int) -> Tensor:
    """The fixed probe input: 13 ids spread over the vocabulary, past the special tokens that
    tokenizers put first (their embeddings are often untrained: odd activations, float16 overflow)."""
    return (vocab_size // 4 + torch.arange(PROBE_TOKENS) * 97) % vocab_size


def attention_sites(model: TLModel) -> AttentionSites:
    """Probe ``model`` once (cached): which layers fire and honour ``hook_pattern``, ``hook_v``, ``hook_z``.

    Every pattern is multiplied by a leaf of ones (the forward is unchanged); a layer whose leaf
    the logits do not depend on (autograd returns no gradient for it) discarded the edit.
    """
    if model in _SITES:
        return _SITES[model]
    n_layers = model.cfg.n_layers
    tokens = probe_ids(model.cfg.d_vocab)[None].to(first_device(model))
    leaves: dict[int, Tensor] = {}
    shapes: dict[tuple[int, str], tuple[int, ...]] = {}

    def on_pattern(layer: int):
        def multiply_by_leaf(pattern: Tensor, hook: Any) -> Tensor:
            leaves[layer] = torch.ones_like(pattern, requires_grad=True)
            return pattern * leaves[layer]
        return multiply_by_leaf

    def record(layer: int, role: str):
        def record_shape(x: Tensor, hook: Any) -> None:
            shapes[(layer, role)] = tuple(x.shape)
        return record_shape

    hooks = []
    for layer in range(n_layers):
        for role, fn in (("pattern", on_pattern(layer)), ("v", record(layer, "v")), ("z", record(layer, "z"))):
            if hook_name(layer, role) in model.hook_dict:
                hooks.append((hook_name(layer, role), fn))
    with torch.enable_grad():
        with hooks_attached(model, hooks):
            logits = model(tokens, **forward_kwargs(model))
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(logits.shape[-1], generator=generator).to(logits.device, logits.dtype)
        # frozen parameters and every edit discarded: the logits hold no graph at all
        grads = torch.autograd.grad((logits * direction).sum(), list(leaves.values()), allow_unused=True) \
            if leaves and logits.requires_grad else [None] * len(leaves)
    _PROBE_LOGITS[model] = logits.detach().double().cpu()
    # connectivity, not magnitude: a discarded edit leaves its leaf out of the graph (None), while
    # a used one may still get an all-zero gradient in float16 (underflow through many layers)
    ignored = tuple(layer for layer, grad in zip(leaves, grads, strict=True) if grad is None)
    layouts = {}
    for (layer, role), shape in shapes.items():
        if role == "v" and len(shape) == 4:
            layouts[layer] = "pos_head" if shape[1] == PROBE_TOKENS else "head_pos"
    # hook_z must split heads as the model does ([batch, pos, head, d_value]); the MLA bridge's
    # hook_z reshapes the concatenated heads with the query-key head size instead
    z_layers = tuple(sorted(layer for (layer, role), shape in shapes.items() if role == "z" and layer in layouts
                            and shape[1:] == (PROBE_TOKENS, model.cfg.n_heads, shapes[(layer, "v")][-1])))
    sites = AttentionSites(n_layers, tuple(sorted(leaves)), ignored, layouts, z_layers)
    _SITES[model] = sites
    return sites


def probe_logits(model: TLModel) -> Tensor:
    """Logits [1, 13, vocab] (float64, CPU) of the probe input, from the probe forward."""
    attention_sites(model)
    return _PROBE_LOGITS[model]
