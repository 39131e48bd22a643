"""What stepsal needs from a kind of model, in one small interface.

Each kind of model (TransformerLens's HookedTransformer and TransformerBridge, a plain transformers
model) gets one :class:`ModelAdapter`; entry points resolve it once with
:func:`stepsal.backends.adapter_for` and ask it, instead of telling kinds apart themselves. A new
kind (a serving engine, nnsight) is one new module with one subclass, registered with
:func:`stepsal.backends.register_adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import UnsupportedModelError
from ..model_types import Model

# one set of attention layer types, for every adapter: the softmax-attention layers of transformers
# configs (hybrid models add "linear_attention", "mamba", ...)
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})

if TYPE_CHECKING:
    from ..formats import TraceFormat
    from ..stepflow.config import StepFlow
    from ..stepflow.hooks import FlowRun, FlowStats


@dataclass(frozen=True)
class Decoding:
    """How :func:`stepsal.generate` continues its prompts (handed to engines that decode by themselves)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    stop_at_eos: bool


@dataclass
class EngineRow:
    """One row an engine generated: its new token ids and, with StepFlow, its own statistics."""

    new_tokens: list[int]
    stats: FlowStats | None


@runtime_checkable
class DecodeStep(Protocol):
    def __call__(self, tokens: Tensor, mask: Tensor, n_new: int) -> Tensor:
        """Logits [batch, n, vocab] ending at the last of ``tokens`` [batch, k] (mask: 1 = real)."""
        ...


class ModelAdapter(ABC):
    """One kind of model, as stepsal uses it. ``model`` is the wrapped object itself."""

    kind: str  # "hooked", "bridge", "transformers", ...

    def __init__(self, model: Model, tokenizer: Any = None):
        self.model, self.tokenizer = model, tokenizer

    # ------------------------------------------------------------ sizes and placement
    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abstractmethod
    def n_heads(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def n_ctx(self) -> int | None: ...

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where input ids go (the first device of a split model)."""

    @property
    def label(self) -> str:
        return type(self.model).__name__

    # ------------------------------------------------------------ generation
    @abstractmethod
    def decode_step(self, batch: int, use_cache: bool) -> DecodeStep:
        """A function that runs the model on new tokens (with a KV cache of its own when ``use_cache``)."""

    def generation_warning(self) -> str | None:
        """A warning to give before generating with this model (None: none)."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (recorded with evaluation samples)."""
        return next(self.model.parameters()).dtype

    @property
    def decodes_itself(self) -> bool:
        """Whether the model is a serving engine that runs its own decoding loop (:meth:`generate_rows`)."""
        return False

    def generate_rows(self, rows: Sequence[Sequence[int]], flows: Sequence[StepFlow | None], fmt: TraceFormat,
                      decodings: Sequence[Decoding]) -> list[EngineRow]:
        """Generation by a serving engine, as one batch: each row with its own StepFlow (or none) and
        decoding; each row's new token ids and statistics. Only where :attr:`decodes_itself`."""
        raise UnsupportedModelError(f"{self.label} is decoded by stepsal's token loop: stepsal.generate calls its "
                                    "decode_step (only serving engines, decodes_itself, take rows as a batch).")

    # ------------------------------------------------------------ StepFlow
    @abstractmethod
    def flow_layers(self, flow: StepFlow) -> tuple[list[int], list[int]]:
        """(OEB layers, SMI layers) of ``flow`` on this model, validated (refusals name the fix)."""

    @abstractmethod
    def attach_flow(self, run: FlowRun) -> AbstractContextManager[None]:
        """StepFlow's effects wired into this model for the duration, removed on exit (also on an exception)."""

    def value_layout(self) -> dict[int, str]:
        """Per layer, how value vectors are laid out where StepFlow reads them ("pos_head" or "head_pos")."""
        return {}

