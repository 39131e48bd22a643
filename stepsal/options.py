"""Option names shared by the library and the command line, in one place.

Each ``Literal`` type lists the strings an option accepts; the tuple next to it (same order) is what
functions validate against and what the command line offers as ``choices``. Torch-free on purpose:
``stepsal --help`` imports this module.
"""

from __future__ import annotations

from typing import Literal, get_args

Rule = Literal["ag", "ag_signed", "g"]
"""Step-Saliency attribution rule: attention x gradient, the same signed, or the gradient alone."""
RULES: tuple[str, ...] = get_args(Rule)

Norm = Literal["block", "causal", "row"]
"""How block sums of a step x step map are normalised: by all token pairs, by causally valid pairs,
or so that each query step's row sums to 1."""
NORMS: tuple[str, ...] = get_args(Norm)

TargetName = Literal["all", "summary", "answer"]
"""A built-in saliency target: next-token loss over every token, over the summary, or over the answer."""
TARGET_NAMES: tuple[str, ...] = get_args(TargetName)

SmiSite = Literal["resid_post", "z"]
"""Where Step Momentum Injection adds its momentum: after the layer's residual stream, or per head."""
SMI_SITES: tuple[str, ...] = get_args(SmiSite)

SweepMetric = Literal["loss", "summary_loss", "summary_kl"]
"""What a layer sweep measures per trace: next-token loss, the summary's loss, or the summary's KL
from the plain model."""
SWEEP_METRICS: tuple[str, ...] = get_args(SweepMetric)

Backend = Literal["hooked", "bridge"]
"""TransformerLens model class: ``HookedTransformer`` or ``TransformerBridge``."""
BACKENDS: tuple[str, ...] = get_args(Backend)

DTypeName = Literal["float32", "bfloat16", "float16"]
"""The torch dtype a model is loaded in, by name."""
DTYPE_NAMES: tuple[str, ...] = get_args(DTypeName)

Mode = Literal["auto", "patterns", "blockwise", "recompute"]
"""How Step-Saliency's backward pass runs: chosen by trace length and memory, through the attention
pattern hooks, through the blockwise kernel (memory linear in T), or recomputing one block at a time
with the model's own attention."""
MODES: tuple[str, ...] = get_args(Mode)
