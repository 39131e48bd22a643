"""StepFlow inside a vLLM worker: per-request phase tracking, OEB in attention, SMI at step starts.

:class:`StepFlowWorker` is a vLLM worker extension (``worker_extension_cls``): its methods join the
worker's, in every worker process. ``stepsal_install`` puts four kinds of PyTorch hooks on the model
once, for every request the engine will run:

- before each forward, each running request that asked for StepFlow (``SamplingParams.extra_args
  ["stepsal"]``) pushes its newly scheduled token ids through its own
  :class:`~stepsal.stepflow.tracker.SequenceTracker` (the rule :class:`~stepsal.Trace` uses) into its
  own :class:`~stepsal.stepflow.hooks.FlowRun`, and announces the positions this forward computes;
- after an attention layer wrote its keys and values, each such request whose settings put OEB on
  that layer (and whose queries are in thinking or summary) recomputes its rows of the output from
  the paged KV cache with the bridged pattern (:meth:`FlowRun.bridge`); SMI layers read the
  request's value vectors from the cache;
- SMI adds :meth:`FlowRun.inject_momentum` on the decoder layer's output (site ``resid_post``) or on
  the input of ``o_proj`` (site ``z``), at the request's step starts.

Requests without StepFlow are left to vLLM's own kernels, in the same batch. Each request's
statistics stay in the worker until ``stepsal_collect`` returns them. The hooks are plain Python:
the engine must run eagerly (``enforce_eager=True``) and schedule synchronously
(``async_scheduling=False``), which :func:`stepsal.vllm.load_engine` sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..blockwise import eager_pattern
from ..errors import StepsalError, UnsupportedModelError
from ..formats import TraceFormat
from ..stepflow.config import StepFlow
from ..stepflow.hooks import FlowRun
from ..stepflow.tracker import SequenceTracker
from .engine import EXTRA_ARGS_KEY
from .paged import PagedCache


@dataclass
class RequestFlow:
    """One request's StepFlow: its settings, tracker, run and (when asked) what it did per layer."""

    key: str
    run: FlowRun
    tracker: SequenceTracker
    oeb_index: dict[int, int]
    smi_index: dict[int, int]
    capture: bool
    captured: dict[str, list[Any]] = field(default_factory=lambda: {"oeb": [], "smi": []})


@dataclass
class Slice:
    """Where a request sits in the current forward: its rows of the flattened batch, its first
    position, and its row of the block table."""

    flow: RequestFlow
    batch_index: int
    start: int
    n_new: int
    offset: int


class EngineFlows:
    """The hooks and per-request state of one worker's model."""

    def __init__(self, runner: Any, table: list[bytes]):
        self.runner, self.table = runner, table
        self.model = runner.get_model()
        self.layers = list(self.model.model.layers)
        for index, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "attn") or not hasattr(attn, "o_proj"):
                raise UnsupportedModelError(
                    f"StepFlow inside vLLM needs decoder layers with self_attn.attn and self_attn.o_proj; layer "
                    f"{index} of {type(self.model).__name__} has not. Run this model through transformers instead.")
        self.requests: dict[str, RequestFlow] = {}  # vLLM request id -> its StepFlow, until collected
        self.plain: set[str] = set()  # request ids seen without StepFlow
        self.plan: list[Slice] = []
        self.checked: set[int] = set()  # layers whose cache layout was checked
        self.projecting = False  # inside _project's own o_proj calls
        self.handles = [self.model.register_forward_pre_hook(lambda module, args: self._begin()),
                        self.model.register_forward_hook(lambda module, args, output: self._end())]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            self.handles += [attn.attn.register_forward_hook(self._attention_hook(index)),
                             layer.register_forward_hook(self._resid_post_hook(index)),
                             attn.o_proj.register_forward_pre_hook(self._z_hook(index))]

    # ------------------------------------------------------------ requests

    def _admit(self, request_id: str) -> RequestFlow | None:
        state = self.runner.requests.get(request_id)
        params = getattr(state, "sampling_params", None)
        spec = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
        if spec is None:
            self.plain.add(request_id)
            return None
        flow = StepFlow.from_dict(spec["flow"])
        layers = flow.layers(len(self.layers))
        layers = (layers[0], layers[1] if flow.alpha > 0 else [])
        tracker = SequenceTracker(self.table, TraceFormat(**spec["format"]))
        prompt = list(state.prompt_token_ids)
        tracker.read_prompt(prompt[:spec.get("prompt_length") or len(prompt)])
        run = FlowRun.detached(flow, layers, self.runner.max_model_len, self.runner.device)
        request = RequestFlow(spec["key"], run, tracker, {layer: i for i, layer in enumerate(layers[0])},
                              {layer: i for i, layer in enumerate(layers[1])}, bool(spec.get("capture")))
        self.requests[request_id] = request
        return request

    def collect(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Statistics (and captures) of requests by stepsal key, each returned once (the caller asks
        once a request is finished; the runner may still hold it until the next step)."""
        wanted, found = set(keys), {}
        for request_id in [r for r, request in self.requests.items() if request.key in wanted]:
            request = self.requests.pop(request_id)
            found[request.key] = {"stats": request.run.stats.to("cpu"), "captured": request.captured}
        self.plain &= set(self.runner.requests)
        return found

    # ------------------------------------------------------------ the forward

    def _begin(self) -> None:
        """Label the scheduled tokens of every StepFlow request and note where each sits."""
        self.plan = []
        batch = self.runner.input_batch
        n_requests = batch.num_reqs
        if n_requests == 0:
            return
        if len(self.plain) > 4 * n_requests + 1024:  # plain requests that finished
            self.plain &= set(self.runner.requests)
        starts = self.runner.query_start_loc.np[:n_requests + 1].tolist()
        computed = batch.num_computed_tokens_cpu[:n_requests].tolist()
        for index, request_id in enumerate(batch.req_ids[:n_requests]):
            if request_id in self.plain:
                continue
            request = self.requests.get(request_id) or self._admit(request_id)
            if request is None:
                continue
            n_new = starts[index + 1] - starts[index]
            offset, end = computed[index], computed[index] + n_new
            ids = batch.token_ids_cpu[index, request.tracker.position:end].tolist()
            for token in ids:  # a prefix from the cache arrives with the first forward's tokens
                request.run.label([request.tracker.push(int(token))])
            request.run.begin_forward(offset, n_new)
            self.plan.append(Slice(request, index, starts[index], n_new, offset))

    def _end(self) -> None:
        self.plan = []

    def _attention_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: tuple, output: Tensor) -> None:
            work = [s for s in self.plan if layer in s.flow.run.smi_layers
                    or (layer in s.flow.oeb_index and s.flow.run.any_active)]
            if not work:
                return
            # the engine's, inside its forward (vLLM is absent where the type checker runs)
            from vllm.forward_context import get_forward_context  # pyright: ignore[reportMissingImports]

            metadata = get_forward_context().attn_metadata
            metadata = metadata[module.layer_name] if isinstance(metadata, dict) else metadata
            cache = PagedCache.of(module)
            query, key, value = args[0], args[1], args[2]
            heads, kv_heads, d = module.num_heads, module.num_kv_heads, module.head_size
            for piece in work:
                rows = slice(piece.start, piece.start + piece.n_new)
                blocks, length = metadata.block_table[piece.batch_index], piece.offset + piece.n_new
                if layer not in self.checked:
                    cache.check(blocks, length, key[rows].view(-1, kv_heads, d), value[rows].view(-1, kv_heads, d),
                                module.layer_name)
                    self.checked.add(layer)
                keys, values = cache.read(blocks, length)  # [kv_head, pos, d]
                run = piece.flow.run
                if layer in run.smi_layers:
                    run.set_values(layer, values.transpose(0, 1)[None])
                if layer in piece.flow.oeb_index and run.any_active:
                    output[rows] = self._bridged(module, piece, query[rows].view(-1, heads, d), keys, values, layer)
        return hook

    def _bridged(self, module: Any, piece: Slice, query: Tensor, keys: Tensor, values: Tensor, layer: int) -> Tensor:
        """One request's rows of an OEB layer's output [n, head * d]: its eager pattern from the cache,
        bridged."""
        impl = module.impl
        window = impl.sliding_window if getattr(impl, "sliding_window", -1) not in (-1, None) else None
        softcap = getattr(impl, "logits_soft_cap", 0) or None
        pattern = eager_pattern(query.transpose(0, 1)[None], keys[None], impl.scale, softcap,
                                getattr(impl, "sinks", None), None, window)
        flow = piece.flow
        edited = flow.run.bridge(flow.oeb_index[layer], pattern)
        edited = pattern if edited is None else edited
        if flow.capture:
            flow.captured["oeb"].append((layer, piece.offset, pattern[0].cpu(), edited[0].cpu()))
        group = query.shape[1] // keys.shape[0]
        z = torch.matmul(edited.to(values.dtype), values.repeat_interleave(group, 0)[None])  # [1, head, n, d]
        return z[0].transpose(0, 1).reshape(query.shape[0], -1)

    def _resid_post_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> None:
            work = [s for s in self.plan if layer in s.flow.smi_index and s.flow.run.flow.smi_site == "resid_post"]
            hidden = output[0] if isinstance(output, tuple) else output  # vLLM adds the residual at the next norm
            for piece in work:
                attn = self.layers[layer].self_attn
                self._inject(piece, layer, hidden, attn.attn.num_heads, partial(self._project, attn.o_proj))
        return hook

    def _project(self, o_proj: Any, z: Tensor) -> Tensor:
        """``z [..., head * d] @ W_O`` through the engine's own o_proj (its weights may be packed), bias
        taken off; the SMI pre-hook on o_proj stays out of it."""
        self.projecting = True
        try:
            flat = z.reshape(-1, z.shape[-1])
            out, zero = o_proj(flat), o_proj(torch.zeros_like(flat[:1]))
            out, zero = (out[0], zero[0]) if isinstance(out, tuple) else (out, zero)
            return (out - zero).reshape(*z.shape[:-1], -1)
        finally:
            self.projecting = False

    def _z_hook(self, layer: int) -> Callable:
        def pre_hook(module: Any, args: tuple) -> None:
            if self.projecting:
                return
            work = [s for s in self.plan if layer in s.flow.smi_index and s.flow.run.flow.smi_site == "z"]
            for piece in work:
                self._inject(piece, layer, args[0], self.layers[layer].self_attn.attn.num_heads, None)
        return pre_hook

    def _inject(self, piece: Slice, layer: int, x: Tensor, heads: int, w_o: Callable | None) -> None:
        """SMI on one request's rows of ``x`` ([tokens, d_model] after the layer, or [tokens, head * d]
        into o_proj), in place."""
        run = piece.flow.run
        if not run.labels.any_inject:
            return
        rows = slice(piece.start, piece.start + piece.n_new)
        mine = x[rows][None] if w_o is not None else x[rows].unflatten(-1, (heads, -1))[None]
        changed = run.inject_momentum(piece.flow.smi_index[layer], layer, mine, heads, w_o)
        if changed is None:
            return
        if piece.flow.capture:
            flow = piece.flow
            where = (changed != mine).flatten(2).any(-1)[0] if w_o is None else (changed != mine).any(-1)[0]
            flow.captured["smi"].append((layer, piece.offset, where.nonzero().flatten().cpu(),
                                         (changed - mine)[0].cpu()))
        x[rows] = changed[0].reshape(x[rows].shape)


class StepFlowWorker:
    """vLLM worker extension (``LLM(..., worker_extension_cls="stepsal.vllm.worker.StepFlowWorker")``):
    the methods :mod:`stepsal.vllm` calls through ``LLM.collective_rpc``."""

    model_runner: Any  # the worker's (vLLM sets it)

    def stepsal_install(self, table: list[bytes]) -> int:
        """Put the StepFlow hooks on this worker's model (once); returns its number of layers."""
        flows = getattr(self, "_stepsal_flows", None)
        if flows is None:
            config = self.model_runner.vllm_config
            if not config.model_config.enforce_eager or config.scheduler_config.async_scheduling:
                raise StepsalError("StepFlow inside vLLM runs Python hooks: create the engine with "
                                   "enforce_eager=True and async_scheduling=False (stepsal.vllm.load_engine does).")
            flows = EngineFlows(self.model_runner, table)
            self._stepsal_flows = flows
        return len(flows.layers)

    def stepsal_collect(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Each finished StepFlow request's statistics (and captures), once, by the key it was sent with."""
        flows = getattr(self, "_stepsal_flows", None)
        return {} if flows is None else flows.collect(keys)
