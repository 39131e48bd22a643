"""TransformerLens models at the level of hook points: which backend, hook names, hooks in a context.

The lowest layer under :mod:`stepsal.backends`: it imports no other stepsal module, so that probes
(:mod:`stepsal.sites`), loading (:mod:`stepsal.models`) and the adapters can all build on it.
stepsal imports TransformerLens on first use (here, and in the few functions that need more of it),
never at module level: ``HookedTransformer`` does not exist in TL 4.x, and importing
``transformer_lens`` patches huggingface_hub's config validation (``enable_hf_numeric_tower``), which
importing stepsal should not do to a user's process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from .errors import HookPointError, UnsupportedModelError
from .model_types import HFModel, TLModel

HOOK_ROLES = {
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "z": "blocks.{layer}.attn.hook_z",
    "v": "blocks.{layer}.attn.hook_v",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
HookFn = Callable[[Any, Any], Any]


def hooked_transformer_class() -> type | None:
    """``HookedTransformer`` where this TransformerLens has it, else None (TL 4.x)."""
    try:  # lazy: absent in TL 4.x, and importing transformer_lens patches huggingface_hub (module docstring)
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def bridge_class() -> type:
    """``TransformerBridge``, imported on first use (see the module docstring)."""
    from transformer_lens.model_bridge import TransformerBridge  # lazy: patches huggingface_hub on import

    return TransformerBridge


def original_model(model: TLModel) -> HFModel:
    """The transformers model a TransformerBridge wraps (TransformerLens stores ``original_model`` in the
    instance's ``__dict__``, so type checkers see only ``nn.Module.__getattr__``'s ``Tensor | Module``)."""
    return cast("HFModel", model.original_model)


def backend_of(model: TLModel) -> str:
    """'hooked' or 'bridge'; anything else is refused with the fix."""
    hooked = hooked_transformer_class()
    if hooked is not None and isinstance(model, hooked):
        return "hooked"
    if isinstance(model, bridge_class()):
        return "bridge"
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a TransformerLens HookedTransformer or TransformerBridge. "
        "Load the model with stepsal.load_model(model_or_folder, tokenizer)."
    )


def hook_name(layer: int, role: str) -> str:
    return HOOK_ROLES[role].format(layer=layer)


def forward_kwargs(model: TLModel) -> dict[str, Any]:
    """Extra forward arguments for a plain (uncached) full-sequence forward."""
    return {"use_cache": False} if backend_of(model) == "bridge" else {}


def model_label(model: TLModel) -> str:
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def first_device(model: TLModel) -> torch.device:
    """Where inputs go: the embedding's device (the first of several with a multi-device model)."""
    return model.embed.W_E.device if hasattr(model, "embed") and hasattr(model.embed, "W_E") \
        else next(model.parameters()).device


@contextmanager
def hooks_attached(model: TLModel, fwd_hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks=...)`` (TransformerLens's own context: hooks go away on exit, also on
    an exception), entered with one name filter that dispatches by hook point.

    Same effect as passing the named hooks directly, but TransformerBridge rebuilds its alias table
    (~25 ms on SmolLM2) for every named hook it attaches; with a filter it does so twice in all.
    Functions on the same hook point run in the order given.
    """
    if not fwd_hooks:
        yield
        return
    points = model.hook_dict
    by_point: dict[int, list[HookFn]] = {}
    for name, fn in fwd_hooks:
        if name not in points:
            raise HookPointError(f"{type(model).__name__} has no hook point {name!r}.")
        by_point.setdefault(id(points[name]), []).append(fn)
    wanted = {name for name, point in points.items() if id(point) in by_point}

    def dispatch(x: Any, hook: Any) -> Any:
        for fn in by_point[id(hook)]:
            result = fn(x, hook)
            x = x if result is None else result
        return x

    with model.hooks(fwd_hooks=[(wanted.__contains__, dispatch)]):
        yield
