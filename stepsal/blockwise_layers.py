"""Run a loaded model's softmax attention through :mod:`stepsal.blockwise` (no [H, T, T] tensor).

Step-Saliency's ``mode="blockwise"``: memory linear in the trace length, exact.

``HookedTransformer``: each attention module's forward is swapped for one that reuses the module's
own projections, QK norms and rotary embedding and hands q, k, v to the blockwise kernel.
``TransformerBridge``: each attention bridge calls the transformers module it wraps, with the
kernel registered as a transformers attention function (that module applies its own projections,
norms, rotary embedding, sliding window, softcapping and sinks, and passes them on).

Whether this reproduces the model is not assumed: :func:`blockwise_problem` runs the probe
input through it once per model and compares the logits with the model's own (cached).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.attention import routed_attention
from .blockwise import AttentionSpec, Observer, blockwise_attention
from .errors import UnsupportedModelError
from .hookpoints import backend_of, first_device, forward_kwargs, hook_name, hooks_attached, original_model
from .model_types import TLModel
from .models import LOGIT_TOLERANCE
from .sites import attention_sites, probe_ids, probe_logits


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


# ---------------------------------------------------------------- HookedTransformer


def _hooked_spec(attn: Any) -> AttentionSpec:
    cfg = attn.cfg
    unsupported = [name for name, bad in (
        ("ALiBi", cfg.positional_embedding_type == "alibi"),
        ("relative position bias", cfg.positional_embedding_type == "relative_positional_bias"),
        ("log-n query scaling", bool(getattr(cfg, "use_logn_attn", False))),
        ("bidirectional attention", (attn._attention_dir_override or cfg.attention_dir) != "causal"),
        ("4-bit weights", bool(cfg.load_in_4bit)),
    ) if bad]
    if unsupported:
        raise UnsupportedModelError(f"the blockwise kernel does not cover {', '.join(unsupported)}")
    softcap = cfg.attn_scores_soft_cap
    return AttentionSpec(scale=1.0 / attn.attn_scale, softcap=softcap if softcap and softcap > 0 else None,
                         window=cfg.window_size if attn.attn_type == "local" else None,
                         sinks=attn.sinks if getattr(cfg, "use_attention_sinks", False) else None)


_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _hooked_forward(attn: Any, observer: Observer | None, query_input: Tensor, key_input: Tensor,
                    value_input: Tensor, past_kv_cache_entry: Any = None, additive_attention_mask: Any = None,
                    attention_mask: Tensor | None = None, position_bias: Any = None) -> Tensor:
    """AbstractAttention.forward for one unpadded sequence without a cache, through the kernel."""
    if past_kv_cache_entry is not None or additive_attention_mask is not None or position_bias is not None \
            or (attention_mask is not None and not bool(attention_mask.all())) or query_input.shape[0] != 1:
        raise UnsupportedModelError("the blockwise kernel takes one unpadded sequence without a KV cache")
    cfg = attn.cfg
    spec = _hooked_spec(attn)
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [1, pos, head, d]
    if cfg.original_architecture in _OLMO_QK_NORM:  # as AbstractAttention.forward: norms on whole vectors
        q = attn.q_norm(q.flatten(-2)).unflatten(-1, q.shape[-2:])
        k = attn.k_norm(k.flatten(-2)).unflatten(-1, k.shape[-2:])
    if cfg.clip_qkv is not None:
        q, k, v = (x.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv) for x in (q, k, v))
    if cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, 0, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
    z = blockwise_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), spec, observer)
    z = attn.hook_z(z.transpose(0, 1)[None])  # [1, pos, head, d_v]
    w = einops.rearrange(attn.W_O, "head d_head d_model -> d_model (head d_head)")
    return F.linear(z.flatten(-2).to(w.dtype), w, attn.b_O)


# ---------------------------------------------------------------- TransformerBridge (transformers modules)

def _transformers_kernel(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                         dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                         softcap: float | None = None, s_aux: Tensor | None = None, *, observer: Observer | None,
                         **kwargs: Any) -> tuple[Tensor, None]:
    """A transformers attention function: query [B, H, T, D], key/value [B, H_kv, T, D] -> [B, T, H, D]."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise UnsupportedModelError("the blockwise kernel takes one sequence without a KV cache")
    spec = AttentionSpec(scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
                         softcap=softcap or None, window=sliding_window, sinks=s_aux)
    z = blockwise_attention(query[0], key[0], value[0], spec, observer)
    return z.transpose(0, 1)[None], None


def _bridge_forward(component: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return component.original_component(*args, **kwargs)
    return forward


@contextmanager
def blockwise_attention_layers(model: TLModel, observers: dict[int, Observer] | None = None) -> Iterator[None]:
    """Inside: every attention layer of ``model`` runs the blockwise kernel; ``observers[layer]``
    sees that layer's A and dL/dA during the backward pass. Restored on exit, also on an exception."""
    observers = observers or {}
    with ExitStack() as stack:
        if backend_of(model) == "hooked":
            for layer, block in enumerate(model.blocks):
                attn, observer = block.attn, observers.get(layer)
                vars(attn)["forward"] = lambda *a, _attn=attn, _obs=observer, **kw: \
                    _hooked_forward(_attn, _obs, *a, **kw)
                stack.callback(vars(attn).pop, "forward", None)
        else:  # the kernel masks by position itself
            routes, configs = {}, [original_model(model).config]  # the mask is built from the outer config
            for layer, block in enumerate(model.blocks):
                component = getattr(block, "attn", None)
                if component is None:  # hybrid models: a layer without softmax attention
                    continue
                hf_attn = component.original_component
                component.__dict__["forward"] = _bridge_forward(component)  # bridges forward setattr
                stack.callback(component.__dict__.pop, "forward", None)
                routes[hf_attn] = partial(_transformers_kernel, observer=observers.get(layer))
                configs.append(hf_attn.config)
            stack.enter_context(routed_attention(routes, configs, mask="none"))
        yield


def final_residual(model: TLModel, tokens: Tensor, hooks: Sequence[tuple[str, Callable]] = ()) -> Tensor:
    """The residual after the last block [T, d_model], without computing logits (``hooks``: more
    forward hooks for the same pass)."""
    store: dict[str, Tensor] = {}

    def stop(x: Tensor, hook: Any) -> None:
        store["resid"] = x[0]
        raise _Stop

    with hooks_attached(model, [*hooks, (hook_name(model.cfg.n_layers - 1, "resid_post"), stop)]), suppress(_Stop):
        model(tokens[None], **forward_kwargs(model))
    return store["resid"]


def logits_from_residual(model: TLModel, resid: Tensor) -> Tensor:
    """Final norm, unembedding and output softcap of a final residual [n, d_model] -> [n, vocab]."""
    logits = model.unembed(model.ln_final(resid[None]))[0]
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if backend_of(model) == "bridge":
        cap = getattr(original_model(model).config.get_text_config(), "final_logit_softcapping", None)
    if cap and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


_PROBLEMS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def blockwise_problem(model: TLModel) -> str | None:
    """Why the blockwise mode cannot run ``model`` exactly (None: it can). One probe forward, cached.

    Checked: every attention layer goes through the kernel, and the logits computed through it
    (and through :func:`logits_from_residual`) equal the model's own on the probe input.
    """
    if model in _PROBLEMS:
        return _PROBLEMS[model]
    tokens = probe_ids(model.cfg.d_vocab).to(first_device(model))
    expected = probe_logits(model)[0]
    calls: set[int] = set()
    observers = {layer: (lambda *a, _layer=layer: calls.add(_layer)) for layer in range(model.cfg.n_layers)}
    problem = None
    try:
        with torch.enable_grad(), blockwise_attention_layers(model, observers):
            start = lambda x, hook: x.detach().requires_grad_(True)  # noqa: E731 - the graph starts here
            resid = final_residual(model, tokens, [(hook_name(0, "resid_pre"), start)])
            logits = logits_from_residual(model, resid)
            logits.sum().backward()  # the observers run in the backward pass
    except Exception as error:  # noqa: BLE001 - any failure means "not this way"
        problem = f"{type(error).__name__}: {error}"
    else:
        missing = sorted(set(attention_sites(model).attention_layers) - calls)
        scale = expected.abs().max().item()
        error = (logits.detach().double().cpu() - expected).abs().max().item() / max(scale, 1e-12)
        param = next(model.parameters())
        if missing:
            problem = f"layers {missing} do not go through the blockwise kernel"
        elif error > LOGIT_TOLERANCE[param.dtype]:
            problem = f"its logits differ from the model's by {error:.1e} (relative) on the probe input"
    _PROBLEMS[model] = problem
    return problem
