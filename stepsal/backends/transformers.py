"""The adapter for plain transformers models, and StepFlow on them: the fast path of :func:`stepsal.generate`.

The same :class:`~stepsal.stepflow.hooks.FlowRun` (labels, OEB, SMI, statistics) acts through
transformers' own seams instead of TransformerLens hook points:

- attention runs through a registered attention function. Layers without OEB work, and forwards
  where no query is in thinking or summary, go to transformers' SDPA kernel untouched; an OEB
  layer with work computes its pattern (scaling, softcap, mask, sinks as the model's eager
  attention), applies :meth:`FlowRun.bridge` and multiplies by the values. SMI layers keep their
  value vectors from here too.
- SMI adds its vector on the decoder layer's output (site ``resid_post``) or on the input of the
  output projection (site ``z``), through forward hooks.

Everything is removed on exit, also when an exception escapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..blockwise import eager_pattern
from ..errors import UnsupportedModelError
from ..model_types import HFModel
from .attention import routed_attention
from .base import ATTENTION_LAYER_TYPES, DecodeStep, ModelAdapter

if TYPE_CHECKING:
    from ..stepflow.config import StepFlow
    from ..stepflow.hooks import FlowRun

# the softmax-attention layer types of the one set, less chunked attention: its masks are untested here
FAST_PATH_TYPES = ATTENTION_LAYER_TYPES - {"chunked_attention"}


def is_transformers_model(model: HFModel) -> bool:
    return isinstance(model, PreTrainedModel)


def decoder_layers(model: HFModel) -> list[Any]:
    """The decoder layers of a transformers causal LM whose attention StepFlow can drive, or a refusal."""
    config = model.config.get_text_config()
    types = set(getattr(config, "layer_types", None) or [])
    layers = getattr(getattr(model, "model", None), "layers", None)
    if types - FAST_PATH_TYPES or layers is None or not all(
            hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj") for layer in layers):
        raise UnsupportedModelError(
            f"StepFlow's transformers fast path covers decoder-only models whose every layer has softmax "
            f"self-attention with an o_proj ({type(model).__name__} does not). Load it with stepsal.load_model "
            "and generate through TransformerLens hooks instead.")
    return list(layers)


def flow_layers(model: HFModel, flow: StepFlow) -> tuple[list[int], list[int]]:
    oeb, smi = flow.layers(len(decoder_layers(model)))
    return oeb, (smi if flow.alpha > 0 else [])


def _flow_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                    softcap: float | None = None, s_aux: Tensor | None = None, *, run: FlowRun,
                    oeb_index: dict[int, int], **kwargs: Any) -> tuple[Tensor, None]:
    """A transformers attention function: query [B, H, q, D], key/value [B, H_kv, k, D] -> [B, q, H, D]."""
    layer = module.layer_idx
    scale: float = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer in run.smi_layers:
        run.remember(layer, value[:, :, -query.shape[2]:].transpose(1, 2))
    bridged = layer in oeb_index and run.any_active
    if not bridged and not softcap and s_aux is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scale, **kwargs)
    pattern = eager_pattern(query, key, scale, softcap, s_aux, attention_mask, sliding_window)
    if bridged:
        edited = run.bridge(oeb_index[layer], pattern)
        pattern = pattern if edited is None else edited
    group = query.shape[1] // key.shape[1]
    z = torch.matmul(pattern.to(value.dtype), value.repeat_interleave(group, 1))
    return z.transpose(1, 2).contiguous(), None


def _output_weights(attn: Any, n_heads: int) -> Tensor:
    """o_proj as W_O [head, d_head, d_model]."""
    weight = attn.o_proj.weight  # [d_model, head * d_head]
    return weight.T.reshape(n_heads, -1, weight.shape[0])


def _smi_output_hook(run: FlowRun, index: int, layer: int, n_heads: int, w_o: Tensor):
    def hook(module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        changed = run.inject_momentum(index, layer, hidden, n_heads, w_o)
        if changed is None:
            return None
        return (changed, *output[1:]) if isinstance(output, tuple) else changed
    return hook


def _smi_z_hook(run: FlowRun, index: int, layer: int, n_heads: int):
    def pre_hook(module: Any, args: tuple) -> Any:
        z = args[0]
        changed = run.inject_momentum(index, layer, z.unflatten(-1, (n_heads, -1)), n_heads, None)
        return None if changed is None else (changed.flatten(-2), *args[1:])
    return pre_hook


@contextmanager
def flow_attached(model: HFModel, run: FlowRun) -> Iterator[None]:
    """StepFlow on a transformers model for the duration (attention function and SMI hooks)."""
    layers = decoder_layers(model)
    config = model.config
    n_heads = config.get_text_config().num_attention_heads
    oeb_index = {layer: i for i, layer in enumerate(run.oeb_layers)}
    attention = partial(_flow_attention, run=run, oeb_index=oeb_index)
    with ExitStack() as stack:
        for index, layer in enumerate(run.smi_layers):
            attn = layers[layer].self_attn
            if run.flow.smi_site == "z":
                handle = attn.o_proj.register_forward_pre_hook(_smi_z_hook(run, index, layer, n_heads))
            else:
                w_o = _output_weights(attn, n_heads).detach()
                handle = layers[layer].register_forward_hook(_smi_output_hook(run, index, layer, n_heads, w_o))
            stack.callback(handle.remove)
        routes = {layer.self_attn: attention for layer in layers}
        stack.enter_context(routed_attention(routes, [config, config.get_text_config()], mask="sdpa"))
        yield


class TransformersAdapter(ModelAdapter):
    """A plain transformers causal LM (with its tokenizer): transformers' own cache, attention
    functions and module hooks; computes the last position's logits only while decoding."""

    kind = "transformers"
    model: HFModel

    def __init__(self, model: HFModel, tokenizer: Any = None):
        super().__init__(model, tokenizer)
        self.config = model.config.get_text_config()

    @property
    def label(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return cast(Tensor, self.model.get_input_embeddings().weight).device  # nn.Module attributes are untyped

    def decode_step(self, batch: int, use_cache: bool) -> DecodeStep:
        model = self.model
        cache = DynamicCache() if use_cache else None  # keeps every key (the mask applies sliding windows)

        def transformers_step(tokens: Tensor, mask: Tensor, n_new: int) -> Tensor:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            new = slice(-n_new, None) if use_cache else slice(None)
            return model(input_ids=tokens[:, new], attention_mask=mask, position_ids=positions[:, new],
                         past_key_values=cache, use_cache=use_cache, logits_to_keep=1).logits

        return transformers_step

    def flow_layers(self, flow: StepFlow) -> tuple[list[int], list[int]]:
        return flow_layers(self.model, flow)

    def attach_flow(self, run: FlowRun) -> AbstractContextManager[None]:
        return flow_attached(self.model, run)
