"""One adapter per kind of model: :func:`adapter_for` resolves it, everything else asks it.

- :mod:`stepsal.hookpoints` (beneath): TransformerLens hook names and hooks in a context;
- :mod:`.attention`: routing a transformers model's attention through a function (one registry);
- :mod:`.base`: the :class:`ModelAdapter` interface and the ``Model`` type;
- :mod:`.transformerlens`, :mod:`.transformers`, :mod:`.vllm`: the adapters (the last for a vLLM
  engine, which decodes by itself; its worker-side plugin is :mod:`stepsal.vllm`).

A new kind of model is one module with a :class:`ModelAdapter` subclass and one
:func:`register_adapter` call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedModel

from ..errors import UnsupportedModelError
from ..hookpoints import bridge_class, hooked_transformer_class
from ..model_types import Model
from .base import ATTENTION_LAYER_TYPES, DecodeStep, ModelAdapter
from .transformerlens import TransformerLensAdapter
from .transformers import TransformersAdapter
from .vllm import VllmAdapter, is_vllm_engine

__all__ = ["ATTENTION_LAYER_TYPES", "DecodeStep", "Model", "ModelAdapter", "TransformerLensAdapter",
           "TransformersAdapter", "VllmAdapter", "adapter_for", "register_adapter", "transformerlens_adapter"]


def _is_transformerlens(model: object) -> bool:
    hooked = hooked_transformer_class()
    return isinstance(model, bridge_class()) or (hooked is not None and isinstance(model, hooked))


def _is_transformers(model: object) -> bool:
    return isinstance(model, PreTrainedModel)


_ADAPTERS: list[tuple[Callable[[Any], bool], Callable[[Any, Any], ModelAdapter]]] = [
    (_is_transformerlens, TransformerLensAdapter),
    (_is_transformers, TransformersAdapter),
    (is_vllm_engine, VllmAdapter),
]


def register_adapter(accepts: Callable[[Any], bool], make: Callable[[Any, Any], ModelAdapter]) -> None:
    """Teach stepsal a new kind of model: ``make(model, tokenizer)`` for models ``accepts`` says yes to
    (checked before the built-in kinds)."""
    _ADAPTERS.insert(0, (accepts, make))


def adapter_for(model: Model | ModelAdapter, tokenizer: Any = None) -> ModelAdapter:
    """The adapter of ``model`` (an adapter is returned as it is)."""
    if isinstance(model, ModelAdapter):
        return model
    for accepts, make in _ADAPTERS:
        if accepts(model):
            return make(model, tokenizer)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a model stepsal knows: load it with stepsal.load_model(model_or_folder, "
        "tokenizer) (a TransformerLens model), or pass a transformers causal LM with its tokenizer.")


def transformerlens_adapter(model: Model | ModelAdapter, purpose: str) -> TransformerLensAdapter:
    """The adapter of a TransformerLens model, for work that reads and edits its hook points
    (Step-Saliency, knockouts, sweeps); other kinds are refused with the fix."""
    adapter = adapter_for(model)  # an adapter is returned as it is
    if not isinstance(adapter, TransformerLensAdapter):
        raise UnsupportedModelError(
            f"{purpose} reads and edits TransformerLens hook points, which {type(adapter.model).__name__} does not "
            "have. Load the model with stepsal.load_model(model_or_folder, tokenizer).")
    return adapter
