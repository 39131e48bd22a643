"""The adapter for TransformerLens models: HookedTransformer and TransformerBridge."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..hookpoints import (
    HookFn,
    backend_of,
    first_device,
    forward_kwargs,
    hook_name,
    hooks_attached,
    model_label,
    original_model,
)
from ..model_types import TLModel
from ..sites import attention_sites
from .base import ATTENTION_LAYER_TYPES, DecodeStep, ModelAdapter

if TYPE_CHECKING:
    import torch

    from ..stepflow.config import StepFlow
    from ..stepflow.hooks import FlowRun

HOOKED_DECODE_WARNING = (
    "generating with HookedTransformer: on this TransformerLens it copies the unembedding and every gated-MLP "
    "weight matrix on each forward (W.T.contiguous()), which makes token-by-token decoding several times "
    "slower than TransformerBridge (docs/performance.md). Load the model with backend='bridge' to generate.")


class TransformerLensAdapter(ModelAdapter):
    """HookedTransformer ("hooked") or TransformerBridge ("bridge"): hook points, their own caches."""

    model: TLModel

    def __init__(self, model: TLModel, tokenizer: Any = None):
        super().__init__(model, tokenizer or model.tokenizer)
        self.kind = backend_of(model)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.model.cfg.n_heads

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def n_ctx(self) -> int | None:
        return self.model.cfg.n_ctx

    @property
    def device(self) -> torch.device:
        return first_device(self.model)

    @property
    def label(self) -> str:
        return model_label(self.model)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [batch, T, vocab] of a plain full-sequence forward (no cache) of ``tokens`` [batch, T]."""
        return self.model(tokens.to(self.device), **forward_kwargs(self.model))

    def hooks(self, fwd_hooks: list[tuple[str, HookFn]]) -> AbstractContextManager[None]:
        """Hook functions on named hook points for the duration (removed on exit, also on an exception)."""
        return hooks_attached(self.model, fwd_hooks)

    def decode_step(self, batch: int, use_cache: bool) -> DecodeStep:
        model = self.model
        if self.kind == "hooked":
            if not use_cache:
                return lambda tokens, mask, n_new: model(tokens, attention_mask=mask)[:, -n_new:]
            # lazy: HookedTransformer's path; transformer_lens loads with the first model (see hookpoints)
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(model.cfg, self.device, batch)
            return lambda tokens, mask, n_new: model(tokens[:, -n_new:], past_kv_cache=cache,
                                                     attention_mask=mask[:, -n_new:])
        cache = _full_cache(original_model(model).config) if use_cache else None

        def bridge_step(tokens: Tensor, mask: Tensor, n_new: int) -> Tensor:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            if use_cache:
                return model(tokens[:, -n_new:], attention_mask=mask, position_ids=positions[:, -n_new:],
                             past_key_values=cache, use_cache=True)
            return model(tokens, attention_mask=mask, position_ids=positions, use_cache=False)[:, -n_new:]

        return bridge_step

    def generation_warning(self) -> str | None:
        return HOOKED_DECODE_WARNING if self.kind == "hooked" else None

    def flow_layers(self, flow: StepFlow) -> tuple[list[int], list[int]]:
        return flow.layers_for(self.model)

    def attach_flow(self, run: FlowRun) -> AbstractContextManager[None]:
        return hooks_attached(self.model, flow_hooks(run, self))

    def value_layout(self) -> dict[int, str]:
        return attention_sites(self.model).value_layout


def flow_hooks(run: FlowRun, adapter: TransformerLensAdapter) -> list[tuple[str, HookFn]]:
    """StepFlow's effects as TransformerLens hook functions: OEB on ``hook_pattern``; SMI keeps
    ``hook_v`` values and injects on ``hook_resid_post`` or ``hook_z``. One function per hook point,
    so registration order does not matter."""
    model, flow = adapter.model, run.flow
    value_layout = adapter.value_layout()

    def oeb(index: int) -> HookFn:
        def odds_equal_bridge_hook(pattern: Float[Tensor, "batch head query key"], hook: Any) -> Tensor | None:
            return run.bridge(index, pattern)
        return odds_equal_bridge_hook

    def remember(layer: int) -> HookFn:
        head_first = value_layout.get(layer) == "head_pos"  # MLA adapters: [batch, head, pos, d]

        def remember_values(v: Tensor, hook: Any) -> None:
            run.remember(layer, v.transpose(1, 2) if head_first else v)
        return remember_values

    def inject(index: int, layer: int) -> HookFn:
        def step_momentum_injection(x: Tensor, hook: Any) -> Tensor | None:
            run.labels.check_window(x.shape[0], x.shape[1])
            if not run.labels.any_inject:  # before fetching W_O (a property on the bridge): most decode steps
                return None
            w_o = output_weights(model, layer) if flow.smi_site != "z" else None
            return run.inject_momentum(index, layer, x, adapter.n_heads, w_o)
        return step_momentum_injection

    hooks = [(hook_name(layer, "pattern"), oeb(i)) for i, layer in enumerate(run.oeb_layers)]
    if flow.alpha > 0:
        for i, layer in enumerate(run.smi_layers):
            hooks.append((hook_name(layer, "v"), remember(layer)))
            hooks.append((hook_name(layer, flow.smi_site), inject(i, layer)))
    return hooks


def output_weights(model: TLModel, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """W_O of one layer as [head, d_head, d_model] on either backend."""
    return model.blocks[layer].attn.W_O


def _full_cache(config: Any) -> Any:
    """A transformers cache that keeps every key: attention layers never trim a sliding window (the
    hooks read absolute positions as k - q; the model still applies its window through the mask);
    hybrid models also get their linear-attention or state-space layers' state."""
    types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    if set(types) <= ATTENTION_LAYER_TYPES:
        return DynamicCache()  # lazily built full layers
    cache = DynamicCache(config=config)  # the config itself is not touched (some fields are read-only)
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            cache.layers[index] = DynamicLayer()
    return cache
