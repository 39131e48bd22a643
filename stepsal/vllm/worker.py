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
from torch.nn.functional import pad

from ..blockwise import eager_pattern
from ..errors import StepsalError, UnsupportedModelError
from ..formats import TraceFormat
from ..segments import SUMMARY, THINKING
from ..stepflow.config import StepFlow
from ..stepflow.hooks import FlowRun, FlowStats
from ..stepflow.oeb import bridge_groups, odds_equal_bridge
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
    # per OEB application: (OEB layer index, a group's counts [request, 4], this request's row); the
    # counts are rows, changed, mass before and mass after, as FlowRun.count_bridge adds them
    oeb_counts: list[tuple[int, Tensor, int]] = field(default_factory=list)

    def stats(self) -> FlowStats:
        """The run's statistics with the bridge counts the worker kept apart (added up here, once)."""
        rows, changed, before, after, count, norm = (t.cpu().clone() for t in self.run.stats.counters())  # clones:
        if self.oeb_counts:  # the forward made inference tensors, which the caller could not change
            layers = torch.tensor([index for index, _, _ in self.oeb_counts])
            counts = torch.stack([group[row] for _, group, row in self.oeb_counts]).cpu()
            summed = torch.zeros(len(rows), 4, dtype=torch.float64).index_add_(0, layers, counts)
            rows, changed, before, after = (t + summed[:, i] for i, t in enumerate((rows, changed, before, after)))
        return FlowStats(oeb_layers=self.run.oeb_layers, smi_layers=self.run.smi_layers, oeb_rows=rows,
                         oeb_changed=changed, oeb_before=before, oeb_after=after, smi_count=count, smi_norm=norm)


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
        self.smi_work: dict[int, list[Slice]] = {}  # this forward's, by layer (see _plan_layers)
        self.oeb_work: dict[int, dict[tuple[int, float], list[Slice]]] = {}
        self.labels_of: dict[tuple[int, ...], tuple[Tensor, ...]] = {}  # a group's OEB inputs, once per forward
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
            found[request.key] = {"stats": request.stats().to_plain(), "captured": request.captured}
        self.plain &= set(self.runner.requests)
        return found

    # ------------------------------------------------------------ the forward

    def _begin(self) -> None:
        """Label the scheduled tokens of every StepFlow request and note where each sits."""
        self._end()
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
        self._plan_layers()

    def _plan_layers(self) -> None:
        """Per layer, the requests whose SMI injects or whose OEB acts in this forward, and the OEB
        groups (same new-token count and tau_max: decode steps bridge as one batch)."""
        self.smi_work, self.oeb_work, self.labels_of = {}, {}, {}
        for piece in self.plan:
            run = piece.flow.run
            for layer in piece.flow.smi_index if run.labels.any_inject else ():
                self.smi_work.setdefault(layer, []).append(piece)
            for layer in piece.flow.oeb_index if run.any_active else ():
                groups = self.oeb_work.setdefault(layer, {})
                groups.setdefault((piece.n_new, run.flow.tau_max), []).append(piece)

    def _end(self) -> None:
        self.plan, self.smi_work, self.oeb_work, self.labels_of = [], {}, {}, {}

    def _attention_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: tuple, output: Tensor) -> None:
            smi, oeb = self.smi_work.get(layer, []), self.oeb_work.get(layer, {})
            if not (smi or oeb):
                return
            # the engine's forward context (vLLM is imported here only: it is absent where the type checker runs)
            from vllm.forward_context import get_forward_context  # pyright: ignore[reportMissingImports]

            metadata = get_forward_context().attn_metadata
            metadata = metadata[module.layer_name] if isinstance(metadata, dict) else metadata
            cache, table = PagedCache.of(module), metadata.block_table
            query, key, value = args[0], args[1], args[2]
            if layer not in self.checked:
                piece = smi[0] if smi else next(iter(oeb.values()))[0]
                rows, shape = slice(piece.start, piece.start + piece.n_new), (-1, module.num_kv_heads, module.head_size)
                cache.check(table[piece.batch_index], piece.offset + piece.n_new, key[rows].view(shape),
                            value[rows].view(shape), module.layer_name)
                self.checked.add(layer)
            for piece in smi:  # the values SMI averages, read where it injects in this forward
                _, values = cache.read(table[piece.batch_index], piece.offset + piece.n_new)
                piece.flow.run.set_values(layer, values.transpose(0, 1)[None])
            for group in oeb.values():
                self._bridge(module, layer, group, query, output, cache, table)
        return hook

    def _group_labels(self, group: list[Slice], device: torch.device) -> tuple[Tensor, ...]:
        """What OEB needs of a group, the same in every layer of a forward: query labels [r, q], key
        labels [r, (q,) k] (padded with -1 to the longest), query positions [r, q], visible keys [r, q, k],
        the segment and bridge masks (:func:`bridge_groups`) [r, q, k] and the group's output rows [r * q]."""
        name = tuple(piece.batch_index for piece in group)
        if name not in self.labels_of:
            n_new = group[0].n_new
            length = max(piece.offset + n_new for piece in group)
            labels = [piece.flow.run.bridge_labels(n_new, piece.offset + n_new, device) for piece in group]
            keys = [k for _, k in labels]
            if any(k.dim() == 3 for k in keys):  # a relabelled marker somewhere: keys as each query saw them
                keys = [k if k.dim() == 3 else k[:, None].expand(-1, n_new, -1) for k in keys]
            positions = torch.tensor([[p.offset + i for i in range(n_new)] for p in group], device=device)
            query_segment = torch.cat([q for q, _ in labels])
            key_segment = torch.cat([pad(k, (0, length - k.shape[-1]), value=-1) for k in keys])
            rows = torch.tensor([[p.start + i for i in range(n_new)] for p in group], device=device).flatten()
            self.labels_of[name] = (query_segment, key_segment, positions,
                                    torch.arange(length, device=device) <= positions[..., None],
                                    *bridge_groups(query_segment, key_segment, positions), rows)
        return self.labels_of[name]

    def _bridge(self, module: Any, layer: int, group: list[Slice], query: Tensor, output: Tensor, cache: PagedCache,
                table: Tensor) -> None:
        """OEB for requests with the same number of new tokens and tau_max: their eager patterns from the
        cache (keys left-aligned, each request masked at its own positions), bridged at once, written
        over their rows of ``output`` [tokens, head * d]."""
        impl, heads, d = module.impl, module.num_heads, module.head_size
        n_new = group[0].n_new
        query_segment, key_segment, positions, visible, same, bridge, rows = self._group_labels(group, query.device)
        keys, values = cache.read_many(table[[piece.batch_index for piece in group]], key_segment.shape[-1])
        queries = torch.stack([query[p.start:p.start + n_new].view(n_new, heads, d) for p in group]).transpose(1, 2)
        window = getattr(impl, "sliding_window", -1)
        if window not in (-1, None):
            visible = visible & (torch.arange(visible.shape[-1], device=query.device) > positions[..., None] - window)
        pattern = eager_pattern(queries, keys, impl.scale, getattr(impl, "logits_soft_cap", 0) or None,
                                getattr(impl, "sinks", None), visible[:, None])
        edit = odds_equal_bridge(pattern, query_segment, key_segment, positions, group[0].flow.run.flow.tau_max,
                                 (same, bridge))
        kv_heads = values.shape[1]  # z per KV group, as eager_pattern's scores: values not repeated
        z = torch.matmul(edit.pattern.to(values.dtype).reshape(len(group), kv_heads, -1, values.shape[2]), values)
        z = z.view(len(group), heads, n_new, -1).transpose(1, 2).reshape(len(group), n_new, -1)
        active = (query_segment == THINKING) | (query_segment == SUMMARY)
        counts = torch.stack([active.sum(-1).double() * heads, edit.changed.sum((1, 2)).double(),
                              (edit.mass_before * edit.changed).sum((1, 2)).double(),
                              (edit.mass_after * edit.changed).sum((1, 2)).double()], -1)  # [r, 4]
        for i, piece in enumerate(group):  # no tensor work per request: counts are added up when collected
            piece.flow.oeb_counts.append((piece.flow.oeb_index[layer], counts, i))
            if piece.flow.capture:
                piece.flow.captured["oeb"].append((layer, piece.offset, pattern[i].cpu(), edit.pattern[i].cpu()))
        output[rows] = z.reshape(-1, z.shape[-1])

    def _resid_post_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> None:
            work = [s for s in self.smi_work.get(layer, []) if s.flow.run.flow.smi_site == "resid_post"]
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
            work = [s for s in self.smi_work.get(layer, []) if s.flow.run.flow.smi_site == "z"]
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
