"""Option names shared by the library and the command line, in one place.

Each ``Literal`` type lists the strings an option accepts; the tuple next to it (same order) is what
functions validate against and what the command line offers as ``choices``. Torch-free on purpose:
``stepsal --help`` imports this module. :class:`SaliencyOptions` gathers one Step-Saliency run's
settings as data. The value checks (:func:`whole_number`, :func:`real_number`, :func:`flag`,
:func:`whole_numbers`) are the one place a number, a flag or a list of layers is refused with its name.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from .errors import OptionError


def whole_numbers(given: Any, name: str = "layers", what: str = "layer") -> list[int]:
    """Whole numbers (Python, numpy or torch integers), sorted and unique; one number, a float, text
    or bool is an :class:`OptionError` naming ``name``."""
    items = list(given) if isinstance(given, Iterable) and not isinstance(given, (str, bytes)) else None
    try:
        found = None if items is None else {operator.index(item) for item in items if not isinstance(item, bool)}
    except TypeError:
        found = None
    if found is None or any(isinstance(item, bool) for item in items or []):
        raise OptionError(f"{name} must be whole {what} numbers; got {given!r}"
                          + (f". Pass a list: [{given}]." if items is None and is_whole(given) else "."))
    return sorted(found)


def layer_numbers(given: Any, name: str = "layers") -> list[int]:
    """Whole layer numbers, sorted and unique (see :func:`whole_numbers`)."""
    return whole_numbers(given, name, "layer")


def whole_number(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; a float, text, bool or number outside is an
    :class:`OptionError` naming ``name`` and the range."""
    if not is_whole(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f" >= {minimum}" if maximum is None else f" in {minimum}..{maximum}") if minimum is not None else ""
        raise OptionError(f"{name} must be a whole number{bounds}; got {value!r}.")
    return operator.index(value)


def real_number(value: Any, name: str) -> float:
    """``value`` as a finite float; text, bool, NaN or inf is an :class:`OptionError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number; got {value!r}.")
    return float(value)


def flag(value: Any, name: str) -> bool:
    """``value`` if it is True or False (numpy bools too); text like "no" is an :class:`OptionError`."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise OptionError(f"{name} must be True or False; got {value!r}.")
    return bool(value)


def is_whole(value: Any) -> bool:
    """Whether ``value`` is an integer (Python, numpy or torch; not a bool)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


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
        for name in ("per_head", "token_level"):
            if name in settings:
                flag(settings[name], name)
        answer = settings.get("answer")
        if answer is not None and target != "answer":
            raise OptionError(f"answer={answer!r} is read only with target='answer' (the target is {target!r}); pass "
                              "target='answer' (the CLI: --target answer), or leave answer out.")
        if isinstance(answer, (list, tuple)) and (len(answer) != 2 or not all(map(is_whole, answer))):
            raise OptionError(f"an answer span is two whole token positions (start, end); got {answer!r}.")
        if answer is not None and not isinstance(answer, (str, list, tuple)):
            raise OptionError(f"answer must be the answer's text or a token span (start, end); got {answer!r}.")

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
