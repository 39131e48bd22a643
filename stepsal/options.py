"""Option names shared by the library and the command line, in one place.

Each ``Literal`` type lists the strings an option accepts; the tuple next to it (same order) is what
functions validate against and what the command line offers as ``choices``. Torch-free on purpose:
``stepsal --help`` imports this module. :class:`SaliencyOptions` gathers one Step-Saliency run's
settings as data.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from .errors import OptionError


def layer_numbers(given: Iterable[Any], name: str = "layers") -> list[int]:
    """Whole layer numbers (Python, numpy or torch integers), sorted and unique; a float, text or bool
    is an :class:`OptionError` naming ``name``."""
    given = list(given)
    try:
        numbers = {operator.index(layer) for layer in given if not isinstance(layer, bool)}
    except TypeError:
        numbers = None
    if numbers is None or any(isinstance(layer, bool) for layer in given):
        raise OptionError(f"{name} must be whole layer numbers; got {given!r}.")
    return sorted(numbers)


def check_layer_range(layers: Sequence[int], n_layers: int, name: str = "layers") -> None:
    """Refuse layers outside 0..n_layers - 1, naming them."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise OptionError(f"{name} {bad} out of range: {name} must be in 0..{n_layers - 1}, the model's layers.")


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


@dataclass(frozen=True, kw_only=True)
class SaliencyOptions:
    """Every setting of one Step-Saliency computation, as data: accepted by
    :func:`stepsal.step_saliency` (``options=``), :func:`stepsal.run_study` and the command line, and
    kept on each result (``result.options``).

    Args:
        target: "all" (mean next-token loss), "summary", "answer" (with ``answer``), a token id, or a
            callable on the logits [T, vocab] (kept on results by its description only).
        rule, norm, mode: see :data:`Rule`, :data:`Norm`, :data:`Mode`.
        per_head: also keep [layer, head, step, step] maps.
        token_level: also keep what each token receives from each query step.
        layers: the layers to compute (None: every layer with a softmax attention pattern).
        answer: the answer text or token span for ``target="answer"``.
    """

    target: str | int | Callable[..., Any] = "all"
    rule: Rule = "ag"
    norm: Norm = "causal"
    mode: Mode = "auto"
    per_head: bool = False
    token_level: bool = False
    layers: Sequence[int] | None = None  # kept as a sorted tuple
    answer: str | tuple[int, int] | list[int] | None = None  # a span is kept as a tuple

    def __post_init__(self) -> None:
        self.check(self.to_dict() | {"target": self.target})
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(layer_numbers(self.layers)))
        if isinstance(self.answer, list):
            object.__setattr__(self, "answer", tuple(self.answer))

    @staticmethod
    def check(settings: dict[str, Any]) -> None:
        """Refuse unknown option names with the ones allowed (before a typed construction sees them)."""
        for name, label, allowed in (("rule", "rule", RULES), ("norm", "normalisation", NORMS),
                                     ("mode", "mode", MODES)):
            if name in settings and settings[name] not in allowed:
                raise OptionError(f"unknown {label} {settings[name]!r}: use one of {allowed}.")
        target = settings.get("target", "all")
        if isinstance(target, str) and target not in TARGET_NAMES:
            raise OptionError(f"unknown target {target!r}: use one of {TARGET_NAMES}, a token id or a callable.")

    def replace(self, **changes: Any) -> SaliencyOptions:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; a callable target is written as its name."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if callable(self.target):  # marked, so that no name reads as a built-in target
            data["target"] = f"<callable {getattr(self.target, '__name__', '?')}>"
        for name in ("layers", "answer"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaliencyOptions:
        """Settings from :meth:`to_dict` (unknown keys are refused, naming the known ones)."""
        refuse_unknown_settings(cls, data, "saliency settings")
        cls.check(data)
        return cls(**data)


def refuse_unknown_settings(settings_class: type, data: dict[str, Any], what: str) -> None:
    """Refuse keys that are no field of a settings dataclass, naming the fields (for ``from_dict``)."""
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise OptionError(f"unknown {what} {unknown}: the settings are {sorted(known)}.")
