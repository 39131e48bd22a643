"""The small reasoner: SmolLM2-135M-Instruct fine-tuned (LoRA) to write ``<think> steps </think> summary``.

The package ships only the LoRA adapter (fp16 safetensors, ``data/reasoner/``) and its metadata; the
full model is built on first use from the embedded base (``W + scale * B @ A`` per adapted linear
layer, in float32) and cached beside it. ``training/train_reasoner.py`` reproduces the adapter.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ModelNotFoundError, StepsalError
from .model_types import HFModel

DATA = Path(__file__).parent / "data" / "reasoner"
ADAPTER_FILE = "adapter.safetensors"
META_FILE = "reasoner.json"

# ChatML like the base, without the base's default system prompt; the generation prompt opens the
# thinking (as R1-distill templates do), so StepFlow acts from the first generated token.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


def lora_key(module_name: str, which: str) -> str:
    """The adapter file's key of one LoRA matrix: ``<module path>.lora_A`` or ``.lora_B``."""
    return f"{module_name}.lora_{which}"


def merge_lora(model: HFModel, tensors: dict[str, Any], scale: float) -> list[str]:
    """Add ``scale * B @ A`` to the weight of every linear layer the adapter names (in place).

    Returns the merged module names; an adapter naming a module the model lacks, or with shapes that
    do not fit, is an error (a wrong base or a corrupt file), never a silent partial merge.
    """
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    for name in names:
        if name not in modules or lora_key(name, "A") not in tensors or lora_key(name, "B") not in tensors:
            raise StepsalError(f"the reasoner adapter names {name!r}, which this base model lacks or the "
                               "adapter file is incomplete; reinstall stepsal or rerun training/train_reasoner.py.")
        weight = cast(Tensor, modules[name].weight)  # a linear layer's (nn.Module attributes are untyped)
        a = tensors[lora_key(name, "A")].to(torch.float32)
        b = tensors[lora_key(name, "B")].to(torch.float32)
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise StepsalError(f"adapter matrices for {name!r} have shapes {tuple(b.shape)} @ {tuple(a.shape)}, "
                               f"which do not fit its weight {tuple(weight.shape)}: a wrong base model or a corrupt "
                               "adapter file; reinstall stepsal or rerun training/train_reasoner.py.")
        with torch.no_grad():
            weight += (scale * (b @ a)).to(weight.dtype)
    return names


def read_adapter(folder: Path = DATA) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shipped adapter tensors and their metadata (rank, alpha, recorded check)."""
    adapter, meta = folder / ADAPTER_FILE, folder / META_FILE
    if not adapter.exists() or not meta.exists():
        raise ModelNotFoundError(f"the reasoner adapter is missing from {folder}; reinstall stepsal or "
                                 "rerun training/train_reasoner.py --out " + str(folder))
    return load_file(str(adapter)), json.loads(meta.read_text())


def build_reasoner(folder: Path, base_folder: Path, adapter_folder: Path = DATA) -> None:
    """Merge the adapter into the base, check the recorded log-probability, save (atomic rename)."""
    tensors, meta = read_adapter(adapter_folder)
    print(f"stepsal: building the small reasoner from the embedded base into {folder} (one time, ~10 s)",
          file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_folder, local_files_only=True)
    merge_lora(model, tensors, meta["lora_alpha"] / meta["rank"])
    tokenizer.chat_template = CHAT_TEMPLATE
    check_recorded(model, tokenizer, meta)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / META_FILE).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def completion_logprob(model: HFModel, tokenizer: Any, prompt: str, completion: str) -> float:
    """Summed log-probability of ``completion`` after ``prompt`` (chat template applied), float64;
    ``model``: a transformers or TransformerLens model."""
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prefix + completion, return_tensors="pt", add_special_tokens=False).input_ids
    start = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = model(ids)
    logits = getattr(out, "logits", out)[0, start - 1:-1].double()  # transformers or TransformerLens
    return float(logits.log_softmax(-1).gather(-1, ids[0, start:, None]).sum())


def check_recorded(model: HFModel, tokenizer: Any, meta: dict[str, Any], tolerance: float = 1e-3) -> float:
    """Compare the model's log-probability on the recorded prompt with the value training recorded."""
    check = meta["check"]
    got = completion_logprob(model, tokenizer, check["prompt"], check["completion"])
    if not math.isclose(got, check["logprob"], abs_tol=tolerance):
        raise StepsalError(f"the built reasoner gives log-probability {got:.4f} on its recorded prompt where "
                           f"training recorded {check['logprob']:.4f}: the base model or the adapter differs from "
                           "the ones it was trained with. Delete the cache folder and reinstall stepsal.")
    return got
