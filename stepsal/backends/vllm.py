"""The adapter for a vLLM engine (``vllm.LLM``): it decodes by itself, StepFlow per request.

The engine's workers carry the plugin (:mod:`stepsal.vllm.worker`); this adapter is the client side:
sizes from the engine's config, StepFlow layers validated as for other kinds, and
:meth:`VllmAdapter.generate_rows` for :func:`stepsal.generate`. There are no gradients and no
teacher-forced hooks in a serving engine: Step-Saliency runs on a TransformerLens model, from the
exact token ids the engine returns. vLLM itself is imported only when the engine is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedModelError
from ..model_types import VllmEngine
from .base import ATTENTION_LAYER_TYPES, DecodeStep, Decoding, EngineRow, ModelAdapter

if TYPE_CHECKING:
    from ..formats import TraceFormat
    from ..stepflow.config import StepFlow
    from ..stepflow.hooks import FlowRun


def is_vllm_engine(model: object) -> bool:
    """A ``vllm.LLM`` (recognised by its class, without importing vLLM)."""
    kind = type(model)
    return kind.__name__ == "LLM" and kind.__module__.split(".")[0] == "vllm"


class VllmAdapter(ModelAdapter):
    """A vLLM offline engine made by :func:`stepsal.vllm.load_engine` (or with its worker extension)."""

    kind = "vllm"

    def __init__(self, model: VllmEngine, tokenizer: Any = None):
        super().__init__(model, tokenizer or model.get_tokenizer())
        self.model_config = model.llm_engine.model_config
        self.config = self.model_config.hf_text_config

    @property
    def label(self) -> str:
        return str(self.model_config.model)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.model_config.get_vocab_size()

    @property
    def n_ctx(self) -> int | None:
        return self.model_config.max_model_len

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # prompts go to the engine as token-id lists

    @property
    def dtype(self) -> torch.dtype:
        return self.model_config.dtype

    def decode_step(self, batch: int, use_cache: bool) -> DecodeStep:
        raise UnsupportedModelError("a vLLM engine decodes by itself: stepsal.generate(llm, prompts, stepflow) sends "
                                    "the prompts to it (there is no token-by-token step to call).")

    def flow_layers(self, flow: StepFlow) -> tuple[list[int], list[int]]:
        oeb, smi = flow.layers(self.n_layers)
        smi = smi if flow.alpha > 0 else []
        types = list(getattr(self.config, "layer_types", None) or [])
        missing = sorted({layer for layer in oeb + smi if types and types[layer] not in ATTENTION_LAYER_TYPES})
        if missing:
            raise UnsupportedModelError(
                f"StepFlow inside vLLM acts on softmax-attention layers; layers {missing} of {self.label} are "
                f"{sorted({types[layer] for layer in missing})}. Choose oeb_layers / smi_layers among the others.")
        return oeb, smi

    def attach_flow(self, run: FlowRun) -> AbstractContextManager[None]:
        raise UnsupportedModelError(
            "StepFlow inside vLLM is set per request: stepsal.generate(llm, prompts, stepflow) or "
            "stepsal.vllm.run_requests. Teacher-forced forwards over a trace run on a TransformerLens model "
            "(stepsal.load_model).")

    @property
    def decodes_itself(self) -> bool:
        return True

    def generate_rows(self, rows: Sequence[Sequence[int]], flows: Sequence[StepFlow | None], fmt: TraceFormat,
                      decodings: Sequence[Decoding]) -> list[EngineRow]:
        from ..vllm.engine import Request, run_requests

        requests = [Request(list(row), flow, d.max_new_tokens, d.do_sample, d.temperature, d.top_p, d.seed,
                            d.stop_at_eos) for row, flow, d in zip(rows, flows, decodings, strict=True)]
        answers = run_requests(self.model, self.tokenizer, requests, fmt)
        return [EngineRow(answer.new_tokens, answer.stats) for answer in answers]
