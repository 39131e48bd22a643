"""Route a transformers model's attention layers through a function of ours, for the duration.

transformers looks attention functions up by name (``config._attn_implementation``) in a global
table. stepsal registers two names once (one per mask kind) that dispatch on the attention module
being run: each routed module has a stack of functions and the innermost runs, so contexts nest
(an inner one leaves the outer's routes in place on exit) and two models never see each other's.
Modules of a routed model that have no function of their own run transformers' SDPA attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

AttentionFn = Callable[..., tuple[Tensor, Any]]
# mask kind -> the name registered with transformers: "none" (the function masks by position
# itself) or "sdpa" (transformers builds SDPA's boolean mask, with padding and sliding windows)
ROUTE_NAMES = {"none": "stepsal_routed", "sdpa": "stepsal_routed_sdpa_mask"}
_ROUTES: dict[int, list[AttentionFn]] = {}  # id(attention module) -> its functions, innermost last


def _dispatch(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
              **kwargs: Any) -> tuple[Tensor, Any]:
    routes = _ROUTES.get(id(module))
    if routes:
        return routes[-1](module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def _register() -> None:
    for kind, name in ROUTE_NAMES.items():
        AttentionInterface.register(name, _dispatch)
        AttentionMaskInterface.register(name, _no_mask if kind == "none" else sdpa_mask)


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """A transformers config's ``_attn_implementation`` set to ``name`` for the duration."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


@contextmanager
def routed_attention(routes: dict[Any, AttentionFn], configs: Iterable[Any], mask: str = "none") -> Iterator[None]:
    """Inside: each attention module in ``routes`` runs its function; ``configs`` (the model's
    config and sub-configs that select attention and masks) name the router. Restored on exit, also
    on an exception; nested contexts restore exactly what they changed."""
    _register()
    with ExitStack() as stack:
        for module, fn in routes.items():
            stack_of = _ROUTES.setdefault(id(module), [])
            stack_of.append(fn)
            stack.callback(_unroute, id(module), fn)
        for config in {id(c): c for c in configs}.values():
            stack.enter_context(attention_implementation(config, ROUTE_NAMES[mask]))
        yield


def _unroute(key: int, fn: AttentionFn) -> None:
    routes = _ROUTES.get(key, [])
    for index in range(len(routes) - 1, -1, -1):  # this context's entry, wherever it sits
        if routes[index] is fn:
            del routes[index]
            break
    if not routes:
        _ROUTES.pop(key, None)
