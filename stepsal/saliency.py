"""Step-Saliency: attention x gradient on each layer's ``hook_pattern``, pooled into step maps.

One forward and one backward pass. A forward hook on each layer's pattern registers a gradient hook
on that tensor; when the backward pass reaches it, the layer's [H, T, T] saliency is computed and
pooled at once (``P @ I @ P.T``), so at most one layer's saliency exists at any time.

Long traces (``mode="blockwise"``, memory linear in T): attention runs through the blockwise kernel
(:mod:`stepsal.blockwise`), which never forms an [H, T, T] tensor. The forward pass keeps only
each block's input residual and stops before the logits; the loss is taken over chunks of rows of
logits; the backward pass recomputes one block at a time, and the kernel's backward pass hands
each block of queries' A and dL/dA = dL/dz . v to the pooler. Where the kernel cannot reproduce a
model (checked on a probe input, see :func:`stepsal.blockwise_layers.blockwise_problem`), the
blockwise mode recomputes blocks with the model's own attention instead (one layer's [H, T, T]
tensors at a time), with a warning that says why.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers.cache_utils import Cache

from .backends import TransformerLensAdapter, transformerlens_adapter
from .blockwise_layers import blockwise_attention_layers, blockwise_problem, final_residual, logits_from_residual
from .errors import (
    ArgumentTypeError,
    ModelMismatchError,
    NoGradientError,
    NonFiniteGradientError,
    OptionError,
    StepsalError,
)
from .hookpoints import forward_kwargs, hook_name, hooks_attached, model_label
from .metrics import LayerMetrics, layer_metrics, reference_measures as _reference_measures
from .model_types import TLModel
from .options import MODES, NORMS, RULES, TARGET_NAMES, Mode, SaliencyOptions, check_layer_range, layer_numbers
from .pooling import normalize, pool
from .receivers import ReceiverHeads, receiver_heads
from .segments import SUMMARY
from .sites import attention_sites
from .storage import file_to_write, reading, written_whole
from .targets import RowTarget, Target, make_target, row_target
from .traces import StepLayout, Trace, require_trace, tokenizer_fingerprint
from .vis.figures import plot_step_maps
from .vis.html import saliency_html
from .vis.labels import maps_title, maps_widget_title, received_title, step_names
from .vis.report import ResultView
from .vis.tables import saliency_frame, wide
from .vis.widgets import colored_tokens_widget, step_maps_widget

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

    from .vis.render import Widget


def saliency_scores(pattern: Float[Tensor, "head query key"], grad: Float[Tensor, "head query key"],
                    rule: str, out: Tensor | None = None) -> Float[Tensor, "head query key"]:
    """Token-level saliency per head: |A * dL/dA| ("ag"), A * dL/dA ("ag_signed") or |dL/dA| ("g");
    into ``out`` when given."""
    if rule == "g":
        return torch.abs(grad, out=out)
    scores = torch.mul(pattern, grad, out=out)
    return scores.abs_() if rule == "ag" else scores


# ---------------------------------------------------------------- result


@dataclass
class StepSaliency:
    """Step-Saliency of one trace.

    ``sums`` holds the raw block sums; ``maps`` normalises them with ``norm`` (any other
    normalisation is one call away: ``normalized("row")``). Shapes: maps [layer, step_q, step_k],
    head_maps [layer, head, step_q, step_k] (when computed with ``per_head=True``).
    """

    sums: Float[Tensor, "layer step_q step_k"]
    layout: StepLayout
    layers: list[int]
    norm: str = "causal"
    rule: str = "ag"
    target: str = "all"
    model: str = ""
    head_sums: Float[Tensor, "layer head step_q step_k"] | None = None
    token_sums: Float[Tensor, "layer step_q token"] | None = None  # with token_level=True
    token_texts: list[str] | None = None  # the scored tokens' texts, for views
    options: SaliencyOptions | None = field(default=None, repr=False)  # the settings (None: a callable target, loaded)
    _members: Tensor | None = field(default=None, repr=False)

    @property
    def members(self) -> Float[Tensor, "step token"]:
        if self._members is None:
            self._members = self.layout.membership(dtype=torch.float64)
        return self._members

    def normalized(self, norm: str) -> Float[Tensor, "layer step_q step_k"]:
        return normalize(self.sums.double(), self.members, norm).float()

    @property
    def maps(self) -> Float[Tensor, "layer step_q step_k"]:
        return self.normalized(self.norm)

    @property
    def head_maps(self) -> Float[Tensor, "layer head step_q step_k"]:
        if self.head_sums is None:
            raise StepsalError("per-head maps were not computed: call step_saliency(..., per_head=True).")
        return normalize(self.head_sums.double(), self.members, self.norm).float()

    def metrics(self) -> LayerMetrics:
        """Per-layer Shallow Lock-in and Deep Decay measures (docs/paper.md section 5)."""
        return layer_metrics(self)

    def receiver_heads(self, proximity: int = 4) -> ReceiverHeads:
        """Heads whose maps point later steps at a few steps (needs ``per_head=True``; see
        :mod:`stepsal.receivers`)."""
        return receiver_heads(self, proximity)

    def reference_measures(self) -> dict[str, Float[Tensor, " layer"]]:
        """The paper's code's measures per layer (final/analysis block intensity, their ratio)."""
        return _reference_measures(self)

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: the sums as tensors, everything else as JSON metadata."""
        path = file_to_write(path)
        tensors = {"sums": self.sums.contiguous()}
        for name in ("head_sums", "token_sums"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        meta = {"layers": self.layers, "norm": self.norm, "rule": self.rule, "target": self.target,
                "model": self.model, "layout": self.layout.to_dict(), "token_texts": self.token_texts}
        meta["options"] = None if self.options is None else self.options.to_dict()
        with written_whole(path) as partial:
            save_file(tensors, str(partial), metadata={"stepsal": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> StepSaliency:
        """What :meth:`save` wrote, checked (:meth:`check`); a damaged file is a
        :class:`DamagedFileError` naming it."""
        with reading(path, "StepSaliency"):
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["stepsal"])
            tensors = load_file(str(path))
            result = cls(sums=tensors["sums"], layout=StepLayout.from_dict(meta["layout"]),
                         layers=[_whole(layer) for layer in meta["layers"]], norm=meta["norm"], rule=meta["rule"],
                         target=meta["target"], model=meta["model"], head_sums=tensors.get("head_sums"),
                         token_sums=tensors.get("token_sums"), token_texts=meta.get("token_texts"),
                         options=_loaded_options(meta.get("options")))
            result.check()
        return result

    def check(self) -> None:
        """Raise :class:`StepsalError` naming the first disagreement between the sums' shapes, the
        layers, the layout and the token texts, or a NaN / inf / negative (for rules "ag", "g") sum."""
        n_layers, n_steps, n_tokens = len(self.layers), self.layout.n_steps, self.layout.n_tokens
        if self.norm not in NORMS or self.rule not in RULES:
            raise StepsalError(f"norm {self.norm!r} / rule {self.rule!r}: not among {NORMS} / {RULES}.")
        expected = {"sums": (n_layers, n_steps, n_steps), "head_sums": (n_layers, None, n_steps, n_steps),
                    "token_sums": (n_layers, n_steps, n_tokens)}
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is None:
                continue
            if tensor.ndim != len(shape) or any(want not in (None, got)
                                                for want, got in zip(shape, tensor.shape, strict=True)):
                wanted = "[" + ", ".join("head" if want is None else str(want) for want in shape) + "]"
                raise StepsalError(f"{name} has shape {list(tensor.shape)}; {n_layers} layer{'s' * (n_layers != 1)} "
                                   f"and a layout of "
                                   f"{n_steps} steps and {n_tokens} tokens need {wanted}.")
            if not bool(torch.isfinite(tensor).all()):
                raise StepsalError(f"{name} holds NaN or inf.")
            if self.rule != "ag_signed" and bool((tensor < 0).any()):
                raise StepsalError(f"{name} holds negative sums, which rule {self.rule!r} never gives.")
        if self.token_texts is not None and len(self.token_texts) != n_tokens:
            raise StepsalError(f"{len(self.token_texts)} token texts for a layout of {n_tokens} tokens.")

    # ------------------------------------------------------------ views (stepsal.vis)

    def received(self, source: str | int = "summary") -> tuple[Tensor, bool]:
        """[token, layer]: saliency each token receives from the ``source`` steps' queries ("summary"
        or a step index), as a share of what those queries give in that layer; and whether that is at
        token resolution (computed with ``token_level=True``), else each token carries its step's
        block (divided by the step's length)."""
        if source == "summary":
            rows = self.layout.steps_of(SUMMARY)
            if not rows:
                raise StepsalError("the trace has no summary steps: pass source=<step index>.")
        elif isinstance(source, int) and 0 <= source < self.layout.n_steps:
            rows = [source]
        else:
            raise StepsalError(f"source must be 'summary' or a step index in 0..{self.layout.n_steps - 1}; "
                               f"got {source!r}.")
        if self.token_sums is not None:
            received = self.token_sums[:, rows].sum(1).double()  # [layer, token]
            token_level = True
        else:
            sizes = self.members.sum(-1)  # tokens per step
            per_step = self.sums[:, rows].sum(1).double() / sizes.clamp(min=1)  # [layer, step]
            received = per_step[:, self.layout.token_step.clamp(min=0)] * (self.layout.token_step >= 0)
            token_level = False
        total = received.sum(-1, keepdim=True)
        return torch.nan_to_num(received / torch.where(total > 0, total, 1)).T.float(), token_level

    def show(self, view: str = "maps", *, norm: str = "row", layer: int | None = None,
             source: str | int = "summary") -> Widget:
        """A circuitsvis widget (offline): ``"maps"`` all layers' step maps (steps as tokens, layers
        as heads), ``"heads"`` per-head maps of ``layer`` (needs ``per_head=True``), ``"tokens"`` the
        trace's tokens coloured by the saliency they receive from ``source`` ("summary" or a step
        index), per layer. ``norm``: the maps' normalisation (default "row": comparable across layers)."""
        names = [f"layer {i}" for i in self.layers]
        if layer is not None and view != "heads":
            raise OptionError(f"layer= picks the layer of view='heads'; view={view!r} shows every layer. Drop layer, "
                              "or pass view='heads'.")
        if view == "maps":
            return step_maps_widget(self.normalized(norm), step_names(self.layout), names,
                                    title=maps_widget_title(self.rule, norm, self.target))
        if view == "heads":
            if layer is None:
                raise StepsalError("view='heads' needs layer=<a computed layer>.")
            if self.head_sums is None:
                raise StepsalError("per-head maps were not computed: call step_saliency(..., per_head=True).")
            if layer not in self.layers:
                raise StepsalError(f"layer {layer} was not computed; this result has layers {self.layers}.")
            maps = normalize(self.head_sums[self.layers.index(layer)].double(), self.members, norm).float()
            heads = [f"L{layer}H{head}" for head in range(maps.shape[0])]
            return step_maps_widget(maps, step_names(self.layout), heads,
                                    title=f"Layer {layer}, per head ({norm} norm)")
        if view == "tokens":
            if self.token_texts is None:
                raise StepsalError("this result has no token texts (saved by an older stepsal); recompute it.")
            values, token_level = self.received(source)
            return colored_tokens_widget(self.token_texts, values, names, title=received_title(source, token_level))
        raise OptionError(f"unknown view {view!r}: use 'maps', 'heads' or 'tokens'.")

    def plot(self, layers: list[int] | None = None, norm: str | None = None, **kwargs: Any) -> Figure:
        """Heatmaps of the step maps with Q/T/S boundaries: the matplotlib Figure (``fig.axes``: its panels).
        ``norm`` defaults to "row", as in the widgets (each query step's row sums to 1: the causal and block
        maps' rows differ by orders of magnitude, so most of them draw black); signed maps keep their own."""
        norm = norm or (self.norm if self.rule == "ag_signed" else "row")
        return plot_step_maps(self.normalized(norm), self.layers, self.layout, panels=layers,
                              title=maps_title(self.rule, norm, self.target), **kwargs)

    def to_dataframe(self, norm: str | None = None) -> pandas.DataFrame:
        """Long format: one row per (layer, step_q, step_k) with the steps' kinds and the map value."""
        norm = norm or self.norm
        return saliency_frame(self.normalized(norm), self.layers, self.layout, norm=norm, rule=self.rule,
                              target=self.target, model=self.model)

    def report_view(self) -> ResultView:
        """What a report section shows of this result, as plain data (see :func:`stepsal.write_report`)."""
        metrics = self.metrics()
        has_tokens = self.token_texts is not None and bool(self.layout.steps_of(SUMMARY))
        received, token_level = self.received("summary") if has_tokens else (None, False)
        receivers, receiver_maps = None, None
        if self.head_sums is not None and self.rule != "ag_signed":
            heads = self.receiver_heads()
            receivers = heads.to_dataframe().dropna(subset=["kurtosis"]).head(5)
            receiver_maps = torch.stack([heads.head_maps[self.layers.index(int(layer)), int(head)]
                                         for layer, head in zip(receivers["layer"], receivers["head"], strict=True)]
                                        ) if len(receivers) else None
        return ResultView(headline=repr(self), model=self.model, layers=list(self.layers), layout=self.layout,
                          row_maps=self.normalized("row"), rule=self.rule, norm=self.norm,
                          target=self.target, per_trace=metrics.per_trace(),
                          layer_measures=wide(metrics.to_dataframe()), token_texts=self.token_texts,
                          received=received, received_token_level=token_level, receiver_heads=receivers,
                          receiver_maps=receiver_maps)

    def __repr__(self) -> str:
        extra = (" per-head" if self.head_sums is not None else "") + \
                (" token-level" if self.token_sums is not None else "")
        return (f"StepSaliency({self.model or 'model?'}: {len(self.layers)} layers x {self.layout.n_steps} steps "
                f"({self.layout.n_tokens} tokens), rule={self.rule}, norm={self.norm}, target={self.target}{extra})")

    def _repr_html_(self) -> str:
        return saliency_html(repr(self), self.plot(max_panels=4), self.metrics().per_trace())


# ---------------------------------------------------------------- pooling inside gradient hooks


class _LayerPooler:
    """Builds the forward hooks on ``hook_pattern``; pools each layer's saliency in its grad hook.

    A pattern waits in ``pending`` until its gradient arrives. The gradient hook must not close
    over the pattern tensor itself: tensor -> autograd node -> hook -> tensor is a cycle through
    C++ that Python's garbage collector cannot break, and every layer's pattern would leak.
    """

    def __init__(self, layers: list[int], members: Tensor, rule: str, per_head: bool, n_heads: int,
                 token_level: bool = False):
        self.layers, self.members, self.rule, self.per_head = layers, members, rule, per_head
        n_steps, n_tokens = members.shape
        self.sums = torch.zeros(len(layers), n_steps, n_steps, device=members.device)
        self.head_sums = (torch.zeros(len(layers), n_heads, n_steps, n_steps, device=members.device)
                          if per_head else None)
        # what each key token receives from each query step: P @ I, [layer, step, token]
        self.token_sums = torch.zeros(len(layers), n_steps, n_tokens, device=members.device) if token_level else None
        self._members_by_device = {members.device: members}
        self.pending: dict[int, Tensor] = {}
        self.done: set[int] = set()
        self.nonfinite: list[int] = []

    def forward_hook(self, layer: int) -> Callable[[Tensor, Any], None]:
        row = self.layers.index(layer)

        def on_pattern(pattern: Tensor, hook: Any) -> None:
            if pattern.requires_grad:
                self.pending[row] = pattern
                pattern.register_hook(partial(self._pool, row))

        return on_pattern

    def observer(self, layer: int) -> Callable[[int, int, Tensor, Tensor], None]:
        """Pools the blockwise kernel's blocks: A and dL/dA [H, b, n] of queries from ``start``, keys
        from ``key_start`` (keys outside the block have A = 0 and add nothing)."""
        row = self.layers.index(layer)
        work: list[Tensor] = []  # the largest block's [H, b, T], allocated at the first (widest) block

        @torch.no_grad()
        def on_block(start: int, key_start: int, weights: Tensor, grad: Tensor) -> None:
            if not work:
                work.append(torch.empty(weights.shape[0] * weights.shape[1] * self.members.shape[1],
                                        dtype=torch.promote_types(weights.dtype, grad.dtype), device=weights.device))
            scores = saliency_scores(weights, grad, self.rule,  # [H, b, n]
                                     out=work[0][:weights.numel()].view(weights.shape))
            members = self._members_on(scores.device)
            queries = members[:, start:start + scores.shape[1]]
            keys = members[:, key_start:key_start + scores.shape[2]]
            mean_over_heads = scores.mean(0)
            if self.head_sums is not None:  # per_head
                self.head_sums[row] += (queries @ scores @ keys.transpose(0, 1)).to(self.sums.device)
            self.sums[row] += (queries @ mean_over_heads @ keys.transpose(0, 1)).to(self.sums.device)
            if self.token_sums is not None:
                self.token_sums[row, :, key_start:key_start + scores.shape[2]] += \
                    (queries @ mean_over_heads).to(self.sums.device)
            self.done.add(layer)

        return on_block

    def check_finite(self, layer: int) -> None:
        if not torch.isfinite(self.sums[self.layers.index(layer)]).all():
            self.nonfinite.append(layer)

    def _members_on(self, device: torch.device) -> Tensor:
        """The membership matrix on a layer's device (layers split over GPUs), copied once per device."""
        if device not in self._members_by_device:
            self._members_by_device[device] = self.members.to(device)
        return self._members_by_device[device]

    @torch.no_grad()
    def _pool(self, row: int, grad: Tensor) -> None:
        pattern = self.pending.pop(row)
        scores = saliency_scores(pattern[0], grad[0], self.rule)  # [H, T, T], this layer only
        del pattern
        members = self._members_on(scores.device)
        if self.head_sums is not None:  # per_head
            self.head_sums[row] = pool(scores.float(), members).to(self.sums.device)
            self.sums[row] = self.head_sums[row].mean(0)
        if not self.per_head or self.token_sums is not None:
            mean_over_heads = scores.mean(0).float()  # [T, T], once per layer
            if not self.per_head:
                self.sums[row] = pool(mean_over_heads, members).to(self.sums.device)
            if self.token_sums is not None:
                self.token_sums[row] = (members @ mean_over_heads).to(self.sums.device)
        # NaN and inf survive the pooling product (0 * NaN = NaN), so checking [S, S] is enough
        self.check_finite(self.layers[row])
        self.done.add(self.layers[row])


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (they are not needed); the previous flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _leaf_hook(store: dict[str, Tensor]) -> Callable[[Tensor, Any], Tensor]:
    """Replace an activation by a detached leaf that requires grad (the backward pass ends there)."""

    def make_leaf(x: Tensor, hook: Any) -> Tensor:
        store["leaf"] = x.detach().requires_grad_(True)
        return store["leaf"]

    return make_leaf


# ---------------------------------------------------------------- the two modes


def _backward_patterns(model: TLModel, tokens: Tensor, target_fn: Callable, pooler: _LayerPooler) -> Tensor:
    store: dict[str, Tensor] = {}
    # the backward pass needs to go no deeper than the lowest requested layer
    hooks = [(hook_name(pooler.layers[0], "resid_pre"), _leaf_hook(store))]
    hooks += [(hook_name(layer, "pattern"), pooler.forward_hook(layer)) for layer in pooler.layers]
    with hooks_attached(model, hooks):
        logits = model(tokens[None], **forward_kwargs(model))
        loss = _checked_loss(target_fn(logits[0]))
        torch.autograd.grad(loss, store["leaf"])
    return loss.detach()


def _strip_caches(value: Any) -> Any:
    """Drop KV-cache objects from captured block arguments (a recomputation must not append to them)."""
    if isinstance(value, Cache):
        return None
    if isinstance(value, tuple):
        return tuple(_strip_caches(v) for v in value)
    if isinstance(value, dict):
        return {k: (False if k == "use_cache" else _strip_caches(v)) for k, v in value.items()}
    return value


def _backward_recompute(model: TLModel, tokens: Tensor, target_fn: Callable, pooler: _LayerPooler) -> Tensor:
    """The recompute mode: blocks recomputed with the model's own attention (where the kernel does not reach)."""
    n_layers = model.cfg.n_layers
    block_inputs: list[Any] = [None] * n_layers
    store: dict[str, Tensor] = {}
    # 1. forward with no graph through the blocks: keep block inputs, a leaf after the last block
    with _capture_block_inputs(model, block_inputs), \
            hooks_attached(model, [(hook_name(n_layers - 1, "resid_post"), _leaf_hook(store))]):
        logits = model(tokens[None], **forward_kwargs(model))
    loss = _checked_loss(target_fn(logits[0]))
    (grad,) = torch.autograd.grad(loss, store["leaf"])
    del logits
    # 2. backward one block at a time: recompute it from its input, pull the gradient through it
    for layer in reversed(range(pooler.layers[0], n_layers)):
        args, kwargs = block_inputs[layer]
        block_inputs[layer] = None
        fwd_hooks = [(hook_name(layer, "pattern"), pooler.forward_hook(layer))] if layer in pooler.layers else []
        with hooks_attached(model, fwd_hooks):
            grad = _recompute_block(model, layer, args, kwargs, grad)
    return loss.detach()


def _capture_block_inputs(model: TLModel, block_inputs: list[Any]) -> ExitStack:
    """Forward pre-hooks (removed when the returned stack closes) that keep each block's inputs."""

    def capture(layer: int) -> Callable:
        def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
            block_inputs[layer] = (_strip_caches(args), _strip_caches(kwargs))
        return pre_hook

    stack = ExitStack()
    for layer, block in enumerate(model.blocks):
        stack.callback(block.register_forward_pre_hook(capture(layer), with_kwargs=True).remove)
    return stack


def _recompute_block(model: TLModel, layer: int, args: tuple, kwargs: dict, grad: Tensor) -> Tensor:
    """Run block ``layer`` again from its input and pull ``grad`` (dL/d its output) back to its input."""
    if args:
        resid = args[0].detach().requires_grad_(True)
        out = model.blocks[layer](resid, *args[1:], **kwargs)
    else:
        resid = kwargs["hidden_states"].detach().requires_grad_(True)
        out = model.blocks[layer](**{**kwargs, "hidden_states": resid})
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(out, resid, grad.to(out.device))  # layers may sit on several GPUs
    return grad


LOGIT_ROWS = 512  # rows of logits per chunk in the blockwise mode: [512, vocab] at a time


def _loss_and_grad(model: TLModel, resid: Tensor, tokens: Tensor, rows: RowTarget | None,
                   target_fn: Callable) -> tuple[Tensor, Tensor]:
    """The target and dL/d(final residual) [T, d], from logits computed a chunk of rows at a time."""
    grad = torch.zeros_like(resid)
    if rows is None:  # a callable target reads the logits of every row
        leaf = resid.detach().requires_grad_(True)
        loss = _checked_loss(target_fn(logits_from_residual(model, leaf)))
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad
    total = torch.zeros((), device=resid.device)
    for start in range(rows.start, rows.end, LOGIT_ROWS):
        end = min(rows.end, start + LOGIT_ROWS)
        leaf = resid[start:end].detach().requires_grad_(True)
        logits = logits_from_residual(model, leaf)
        if rows.token_id is not None:
            part = logits[-1, rows.token_id].float()
        else:
            part = torch.nn.functional.cross_entropy(logits.float(), tokens[start + 1:end + 1].to(logits.device),
                                                     reduction="sum") / (rows.end - rows.start)
        (grad[start:end],) = torch.autograd.grad(part, leaf)
        total = total + part.detach()
    return _checked_loss(total, graph=False), grad  # each chunk's gradient was taken above


def _backward_blockwise(model: TLModel, tokens: Tensor, target_fn: Callable, pooler: _LayerPooler,
                     rows: RowTarget | None) -> Tensor:
    n_layers = model.cfg.n_layers
    block_inputs: list[Any] = [None] * n_layers
    # 1. forward with no graph (parameters are frozen), keeping each block's input; no logits
    with _capture_block_inputs(model, block_inputs), blockwise_attention_layers(model):
        resid = final_residual(model, tokens)
    loss, grad = _loss_and_grad(model, resid, tokens, rows, target_fn)
    grad = grad[None]  # [1, T, d], as the blocks' outputs
    del resid
    # 2. backward one block at a time; the kernel's backward pass feeds the pooler
    for layer in reversed(range(pooler.layers[0], n_layers)):
        args, kwargs = block_inputs[layer]
        block_inputs[layer] = None
        observers = {layer: pooler.observer(layer)} if layer in pooler.layers else {}
        with blockwise_attention_layers(model, observers):
            grad = _recompute_block(model, layer, args, kwargs, grad)
        if layer in pooler.layers:
            pooler.check_finite(layer)
    return loss


def _checked_loss(loss: Tensor, graph: bool = True) -> Tensor:
    """A finite scalar target; with ``graph``, one that depends on the logits."""
    if not isinstance(loss, Tensor):
        raise StepsalError(f"the target must return a scalar tensor computed from the logits; it returned "
                           f"{type(loss).__name__}.")
    if loss.dim() != 0:
        raise StepsalError(f"the target must return a scalar; it returned shape {tuple(loss.shape)}.")
    if not torch.isfinite(loss):
        raise NonFiniteGradientError(
            f"the target value is {loss.item()}; check the target, or run the model in float32.")
    if graph and not loss.requires_grad:
        raise NoGradientError("the target does not depend on the model's logits (it holds no gradient), so "
                              "there is no saliency to compute; return a value computed from the logits.")
    return loss


BLOCKWISE_FROM = 1024  # from this many tokens the blockwise mode is also the faster one (docs/performance.md)


def _choose_mode(model: TLModel, trace: Trace, rule: str, mode: Mode) -> Callable:
    """The backward pass to run: pattern hooks, the blockwise kernel, or (where the kernel cannot
    reproduce the model, or ``mode="recompute"``) blocks recomputed with the model's own attention."""
    if mode == "recompute":
        return _backward_recompute
    fits = mode == "auto" and _normal_mode_fits(model, len(trace))
    if mode == "patterns" or (fits and len(trace) < BLOCKWISE_FROM):
        return _backward_patterns  # no probe of the kernel needed
    problem = "rule='g' reads dL/dA of masked (future) keys too" if rule == "g" else blockwise_problem(model)
    if fits:
        return _backward_blockwise if problem is None else _backward_patterns
    if problem is None:
        return _backward_blockwise
    warnings.warn(f"Step-Saliency's blockwise mode cannot use the blockwise kernel on {model_label(model)} "
                  f"({problem}); it recomputes blocks with the model's own attention instead (mode='recompute'), "
                  "which holds one layer's [head, T, T] attention tensors at a time.", stacklevel=3)
    return _backward_recompute


def resolve_mode(mode: Mode | None, checkpoint: bool | None) -> Mode:
    """``mode``, or the deprecated ``checkpoint=`` (None/True/False: "auto"/"blockwise"/"patterns")."""
    if checkpoint is not None:
        if mode is not None:
            raise StepsalError("pass mode=..., not checkpoint= as well (checkpoint= is its deprecated name).")
        warnings.warn("step_saliency(checkpoint=...) is deprecated: use mode='blockwise' (True) or "
                      "mode='patterns' (False).", DeprecationWarning, stacklevel=3)
        return "blockwise" if checkpoint else "patterns"
    mode = "auto" if mode is None else mode
    if mode not in MODES:
        raise OptionError(f"unknown mode {mode!r}: use one of {MODES}.")
    return mode


def _normal_mode_fits(model: TLModel, n_tokens: int) -> bool:
    """Whether autograd's saved patterns of all layers (about 2 x L x H x T^2) fit in a quarter of memory."""
    param = model.embed.W_E if hasattr(model, "embed") else next(model.parameters())
    need = 2 * model.cfg.n_layers * model.cfg.n_heads * n_tokens ** 2 * param.element_size()
    if param.device.type == "cuda":
        available = torch.cuda.mem_get_info(param.device)[0]
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need < available / 4


# ---------------------------------------------------------------- public entry point


def step_saliency(model: TLModel, trace: Trace, target: Target = "all", rule: str = "ag",
                  norm: str = "causal", per_head: bool = False, *,
                  answer: str | tuple[int, int] | None = None, layers: list[int] | None = None,
                  mode: Mode | None = None, token_level: bool = False, options: SaliencyOptions | None = None,
                  checkpoint: bool | None = None) -> StepSaliency:
    """Step-Saliency of one trace: attention x gradient pooled into step -> step maps per layer.

    Args:
        model: a TransformerLens model from :func:`stepsal.load_model`.
        trace: the scored sequence and its layout (:class:`stepsal.Trace`).
        target: ``"all"`` (mean next-token loss, the reference), ``"summary"``, ``"answer"`` (with
            ``answer=``), a token id (its logit at the last position) or a callable on logits [T, V].
        rule: ``"ag"`` |A*g| (paper), ``"ag_signed"`` A*g, ``"g"`` |g|.
        norm: ``"causal"`` (default), ``"block"`` (reference) or ``"row"``.
        per_head: also keep [layer, head, step, step] maps.
        layers: the layers to compute (default: every layer with a softmax attention pattern, which
            is all of them except in hybrid models; ``result.layers`` names them).
        mode: how the backward pass runs. ``"patterns"``: gradient hooks on every layer's pattern
            (holds all layers' [H, T, T] patterns). ``"blockwise"``: memory linear in T: attention
            through the blockwise kernel (no [H, T, T] tensor), one block recomputed at a time, logits
            in chunks of rows; equal to the pattern result to float rounding (where the kernel does not
            cover a model it warns and recomputes). ``"recompute"``: blocks recomputed with the model's
            own attention (one layer's [H, T, T] at a time). ``"auto"`` (default): blockwise from 1024
            tokens (where it is also faster) and whenever all layers' patterns would not fit in a
            quarter of memory, else patterns.
        checkpoint: deprecated name of ``mode``: True = "blockwise", False = "patterns".
        token_level: also keep what each token receives from each query step ([layer, step, token],
            for ``show("tokens")`` at token resolution).
        options: all of the above as one :class:`stepsal.SaliencyOptions` (then pass no other setting).

    Returns:
        :class:`StepSaliency` with ``maps`` [layer, step_q, step_k] and per-layer ``metrics()``.
    """
    settings = {"target": target, "rule": rule, "norm": norm, "per_head": per_head, "answer": answer,
                "layers": layers, "mode": resolve_mode(mode, checkpoint), "token_level": token_level}
    options = _merged_options(options, settings)
    target, rule, norm, per_head = options.target, options.rule, options.norm, options.per_head
    answer = cast("str | tuple[int, int] | None", options.answer)  # SaliencyOptions keeps a span as a tuple
    token_level, layers = options.token_level, (None if options.layers is None else list(options.layers))
    adapter = transformerlens_adapter(model, "Step-Saliency")
    check_trace_fits(adapter, trace)
    sites = attention_sites(model)
    if layers is None:  # hybrid models: the layers with a softmax pattern (result.layers names them)
        layers = sites.attention_layers
        if not layers:
            sites.require_attention(list(range(adapter.n_layers)), f"Step-Saliency on {adapter.label}")
    else:
        layers = layer_numbers(layers)
        check_layer_range(layers, adapter.n_layers)
        if not layers:
            raise OptionError(f"layers must name at least one layer of 0..{adapter.n_layers - 1}; got [].")
        sites.require_attention(layers, f"Step-Saliency on {adapter.label}")
    description, target_fn = make_target(target, trace, answer, adapter.vocab_size)
    device = adapter.device
    tokens = trace.tokens.to(device)
    pooler = _LayerPooler(layers, trace.layout.membership(device=device), rule, per_head, adapter.n_heads,
                          token_level)
    run = _choose_mode(model, trace, rule, options.mode)
    if run is _backward_blockwise:
        run = partial(_backward_blockwise, rows=row_target(target, trace, answer, adapter.vocab_size))
    try:
        with frozen_parameters(model), torch.enable_grad():
            run(model, tokens, target_fn, pooler)
    finally:
        pooler.pending.clear()  # patterns whose gradient never came (an exception, an unused layer)
    if pooler.nonfinite:
        raise NonFiniteGradientError(
            f"NaN/inf saliency in layers {sorted(set(pooler.nonfinite))}. Run the model in float32 "
            "(load_model(..., dtype=torch.float32)) or use a target with finite gradients.")
    missing = sorted(set(layers) - pooler.done)
    if missing:
        raise NoGradientError(f"the gradient never reached hook_pattern in layers {missing}; the target "
                              "does not depend on them (for example a callable that ignores the logits).")
    return StepSaliency(sums=pooler.sums.cpu(), layout=trace.layout, layers=layers, norm=norm, rule=rule,
                        target=description, model=adapter.label,
                        head_sums=None if pooler.head_sums is None else pooler.head_sums.cpu(),
                        token_sums=None if pooler.token_sums is None else pooler.token_sums.cpu(),
                        token_texts=[trace.text[start:end] for start, end in trace.offsets], options=options)


def _loaded_options(data: dict[str, Any] | None) -> SaliencyOptions | None:
    """Saved settings; a callable target was saved by name only, so those come back as None."""
    if data is None or not (isinstance(data["target"], int) or data["target"] in TARGET_NAMES):
        return None
    return SaliencyOptions.from_dict(data)


def _whole(value: Any) -> int:
    """A saved layer index: an int (not a bool or float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StepsalError(f"layer {value!r} is no whole number.")
    return value


def _merged_options(options: SaliencyOptions | None, settings: dict[str, Any]) -> SaliencyOptions:
    """``options``, or the keyword settings as options; both at once is refused (which would win?)."""
    if options is None:
        return SaliencyOptions.from_dict(settings)
    if not isinstance(options, SaliencyOptions):
        raise ArgumentTypeError(f"options must be a SaliencyOptions (SaliencyOptions.from_dict(settings) for a dict); "
                                f"got {type(options).__name__}.")
    defaults = SaliencyOptions()
    given = sorted(name for name, value in settings.items() if value is not None and value != getattr(defaults, name))
    if given:
        raise StepsalError(f"step_saliency got options= and the settings {given} too: put them in the options "
                           f"(options.replace({given[0]}=...)).")
    return options


def check_trace_fits(model: TLModel | TransformerLensAdapter, trace: Trace) -> None:
    """Refuse a trace the model cannot score: longer than its context, another tokenizer's, or ids
    outside its vocabulary."""
    require_trace(trace, "Step-Saliency")
    adapter = transformerlens_adapter(model, "Step-Saliency")
    n_ctx = adapter.n_ctx
    if n_ctx is not None and len(trace) > n_ctx:
        raise ModelMismatchError(
            f"the trace has {len(trace)} tokens ({trace.layout.n_steps} steps) but {adapter.label} has a context of "
            f"{n_ctx}. "
            "Shorten the trace (keep the question, the steps of interest and the summary).")
    if (trace.tokenizer_fingerprint and adapter.tokenizer is not None
            and trace.tokenizer_fingerprint != tokenizer_fingerprint(adapter.tokenizer)):
        raise ModelMismatchError(
            "the trace was tokenised with a different tokenizer than the model's. Rebuild it "
            "with Trace.from_text(text, model) using this model.")
    if int(trace.tokens.max()) >= adapter.vocab_size or int(trace.tokens.min()) < 0:
        raise ModelMismatchError(
            f"token ids reach {int(trace.tokens.max())} but the model's vocabulary has "
            f"{adapter.vocab_size} entries; the trace does not belong to this model.")
