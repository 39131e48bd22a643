"""The kinds of model stepsal takes, as types for signatures (checked at run time by the adapters).

For the type checker these are the real classes; at run time they are ``Any`` (TransformerLens 4.x
has no HookedTransformer, and importing the classes would make every module import torch and
transformers on import), so :func:`stepsal.backends.adapter_for` and the loaders check kinds and
name the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel

    TLModel: TypeAlias = HookedTransformer | TransformerBridge  # a TransformerLens model (hook points)
    HFModel: TypeAlias = PreTrainedModel  # a plain transformers causal LM
    Model: TypeAlias = TLModel | HFModel  # either
else:
    TLModel = HFModel = Model = Any

VllmEngine = Any  # a vllm.LLM: vLLM is an optional engine, absent where the type checker runs (docs/scale.md)

__all__ = ["HFModel", "Model", "TLModel", "VllmEngine"]
