"""Generation with a KV cache on either backend, with StepFlow hooks attached.

The loop is ours (not TransformerLens's ``generate``): it feeds the hooks absolute positions,
tracks phases and steps per row as tokens arrive (one host transfer of the sampled ids per step),
and supports left-padded batches. See docs/performance.md for speed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .backends import Model, ModelAdapter, adapter_for
from .backends.base import Decoding
from .errors import StepsalError, StepsalWarning, TraceFormatError
from .formats import TraceFormat, get_format, prompt_thinking_from
from .models import load_model
from .options import flag, is_whole, real_number, whole_number
from .segments import SUMMARY, THINKING
from .stepflow.config import StepFlow
from .stepflow.hooks import FlowRun, FlowStats
from .stepflow.tracker import PhaseTracker
from .traces import Trace
from .vis.figures import plot_bars
from .vis.html import generation_html
from .vis.tables import records_frame

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

Prompt = str | Sequence[dict] | Sequence[int] | Tensor  # text, chat messages, token ids


GENERATION_COLUMNS = ("row", "prompt_tokens", "new_tokens", "thinking_steps", "thinking_tokens", "summary_tokens",
                      "trace_error", "text")


@dataclass(kw_only=True)
class Generation:
    """Result of :func:`generate`: one entry per row."""

    texts: list[str]  # the generated continuation of each row
    tokens: list[Tensor]  # prompt + continuation of each row, without padding
    prompt_lengths: list[int]
    traces: list[Trace | None]  # segmented full sequences, ready for step_saliency
    trace_errors: list[str | None]  # why a row has no trace (e.g. it never reached thinking)
    stats: FlowStats | None = None  # of the whole batch
    flow: StepFlow | None = field(default=None, repr=False)
    request_stats: list[FlowStats | None] | None = None  # per row, from engines that run rows apart (vLLM)

    @property
    def text(self) -> str:
        return self.texts[0]

    def __repr__(self) -> str:
        lengths = [len(t) - p for t, p in zip(self.tokens, self.prompt_lengths, strict=True)]
        traced = sum(t is not None for t in self.traces)
        flow = f"; {self.stats!r}" if self.stats is not None else "; no StepFlow"
        return f"Generation({len(self.texts)} row(s), new tokens {lengths}, {traced} with a trace{flow})"

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per generated row: prompt and new tokens; where it has a trace, its thinking steps and
        the tokens of thinking and summary (else ``trace_error`` says why not); the generated text."""
        records = []
        for row, (text, tokens, start, trace, error) in enumerate(zip(
                self.texts, self.tokens, self.prompt_lengths, self.traces, self.trace_errors, strict=True)):
            record = {"row": row, "prompt_tokens": start, "new_tokens": len(tokens) - start, "trace_error": error,
                      "text": text}
            if trace is not None:
                segments = trace.layout.token_segment
                record.update(thinking_steps=len(trace.layout.steps_of(THINKING)),
                              thinking_tokens=int((segments == THINKING).sum()),
                              summary_tokens=int((segments == SUMMARY).sum()))
            records.append(record)
        return records_frame(records, GENERATION_COLUMNS)

    def plot(self, **kwargs: Any) -> Figure:
        """New tokens per row, and those of thinking and summary (rows with a trace): the matplotlib Figure."""
        return plot_bars(self.to_dataframe(), "row", ["new_tokens", "thinking_tokens", "summary_tokens"],
                         title="tokens per generated row", ylabel="tokens", **kwargs)

    def _repr_html_(self) -> str:
        rows = [(repr(trace) if trace is not None else f"no trace: {error}", text)
                for text, trace, error in zip(self.texts, self.traces, self.trace_errors, strict=True)]
        frame = self.to_dataframe().drop(columns=["trace_error", "text"])
        return generation_html(repr(self), rows, self.stats._repr_html_() if self.stats is not None else "", frame)

    @property
    def trace(self) -> Trace:
        if self.traces[0] is None:
            raise TraceFormatError(f"the generated sequence has no trace: {self.trace_errors[0]}")
        return self.traces[0]


# ---------------------------------------------------------------- prompts


def encode_prompts(tokenizer: Any, prompt: Prompt | Sequence[Prompt]) -> list[list[int]]:
    """Token ids per row from text, chat messages, token tensors or lists of these."""
    if isinstance(prompt, Tensor):
        rows = prompt[None] if prompt.dim() == 1 else prompt
        return [row.tolist() for row in rows]
    if isinstance(prompt, str):
        return [tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if isinstance(prompt, Sequence) and prompt and all(is_whole(item) for item in prompt):  # token ids
        return [[int(cast("int", item)) for item in prompt]]
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        if getattr(tokenizer, "chat_template", None) is None:
            raise StepsalError("this tokenizer has no chat template, so chat messages cannot become a prompt; pass "
                               "the prompt as text with the template applied (the CLI: --prompt TEXT).")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return [tokenizer(text, add_special_tokens=False)["input_ids"]]
    if isinstance(prompt, Sequence) and prompt:  # a batch (chat messages returned above)
        return [ids for one in cast("Sequence[Prompt]", prompt) for ids in encode_prompts(tokenizer, one)]
    raise StepsalError("prompt must be text, chat messages (a list of {'role', 'content'}), token ids, "
                       "or a list of these for a batch; got an empty or unknown value.")


def _sample(logits: Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> Tensor:
    """Next token per row from the last logits [batch, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- the loop


@torch.no_grad()
def generate(model: Model | ModelAdapter | str | os.PathLike, prompt_or_messages: Prompt | Sequence[Prompt],
             stepflow: StepFlow | None = None, *, max_new_tokens: int = 256, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, fmt: str | TraceFormat = "think",
             use_cache: bool = True,
             stop_at_eos: bool = True, marker_in_output: bool = False, tokenizer: Any = None) -> Generation:
    """Generate with the KV cache on and, optionally, StepFlow attached.

    Args:
        model: a TransformerLens model from :func:`stepsal.load_model` (either backend), a name or
            folder for :func:`stepsal.load_model` (then loaded with ``backend="bridge"``, the faster
            for decoding), or a plain transformers causal LM with ``tokenizer=``: the fast path,
            StepFlow through transformers' attention functions and module hooks at the speed of
            transformers itself (docs/performance.md); greedy tokens and StepFlow statistics equal
            the hook path's. Or a vLLM engine from :func:`stepsal.vllm.load_engine`: each row one request
            of one batch (sampled rows seeded ``seed + row``), StepFlow inside the engine, each row's
            statistics in ``request_stats`` (docs/scale.md).
        prompt_or_messages: text (used as is: include the chat template), chat messages (the
            template is applied with the generation prompt), token ids, or a list of these (a
            left-padded batch; each row tracks its own phases).
        stepflow: a :class:`StepFlow`, or None for plain generation.
        max_new_tokens, do_sample, temperature, top_p, seed: decoding; greedy by default.
        fmt: the trace format whose markers delimit thinking and summary.
        use_cache: KV cache (default); False recomputes the whole sequence every step (for checks).
        stop_at_eos: a row stops at the tokenizer's EOS token.
        marker_in_output: with StepFlow, allow prompts without the thinking marker (the model is
            expected to write it); by default such a prompt is refused, since StepFlow would do nothing.
        tokenizer: the tokenizer of a plain transformers model (TransformerLens models bring their own).

    Returns:
        :class:`Generation`: texts, token sequences, traces and StepFlow statistics.
    """
    whole_number(max_new_tokens, "max_new_tokens", minimum=1)
    if flag(do_sample, "do_sample"):
        real_number(temperature, "temperature")
        real_number(top_p, "top_p")
    if seed is not None:
        whole_number(seed, "seed", 0, 2**63 - 1)
    if stepflow is not None and not isinstance(stepflow, StepFlow):
        raise StepsalError(f"stepflow must be a StepFlow (StepFlow(...), or StepFlow.from_dict(settings)); got "
                           f"{type(stepflow).__name__}.")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise StepsalError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}.")
    fmt = get_format(fmt)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, backend="bridge")
    adapter = adapter_for(model, tokenizer)
    if adapter.tokenizer is None:
        raise StepsalError(f"{type(adapter.model).__name__} has no tokenizer, and generate needs one: "
                           "generate(model, prompt, tokenizer=tokenizer).")
    if (warning := adapter.generation_warning()) is not None:
        warnings.warn(warning, StepsalWarning, stacklevel=3)
    tokenizer = adapter.tokenizer
    rows = encode_prompts(tokenizer, prompt_or_messages)
    if any(len(r) == 0 for r in rows):
        raise StepsalError("a prompt has no tokens.")
    vocab = adapter.vocab_size
    if (bad := next((i for r in rows for i in r if not 0 <= i < vocab), None)) is not None:
        raise StepsalError(f"token id {bad} in the prompt is outside the model's vocabulary (0..{vocab - 1}).")
    if stepflow is not None:
        layers = adapter.flow_layers(stepflow)
        if not marker_in_output:
            _require_thinking_marker(tokenizer, rows, fmt)
    batch, prompt_length = len(rows), max(len(r) for r in rows)
    n_ctx = adapter.n_ctx
    if n_ctx is not None and prompt_length + max_new_tokens > n_ctx:
        raise StepsalError(f"prompt ({prompt_length}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                           f"context of {n_ctx}; lower max_new_tokens.")
    if adapter.decodes_itself:  # a serving engine: each row its own request (seeded seed + row), own statistics
        decodings = [Decoding(max_new_tokens, do_sample, temperature, top_p, None if seed is None else seed + i,
                              stop_at_eos) for i in range(len(rows))]
        engine_rows = adapter.generate_rows(rows, [stepflow] * len(rows), fmt, decodings)
        parts = [row.stats for row in engine_rows if row.stats is not None]
        full = [torch.tensor(ids + row.new_tokens) for ids, row in zip(rows, engine_rows, strict=True)]
        result = _collect(tokenizer, full, rows, fmt, FlowStats.total(parts) if parts else None, stepflow,
                          [row.stats for row in engine_rows])
        if result.stats is not None and not result.stats.acted():
            reached = any(trace is not None for trace in result.traces)
            warnings.warn(_never_acted_reason(reached, fmt), StepsalWarning, stacklevel=3)
        return result
    device = adapter.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens = torch.full((batch, prompt_length), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, prompt_length), dtype=torch.long)
    for b, ids in enumerate(rows):  # left padding: every row ends at the same position
        tokens[b, prompt_length - len(ids):] = torch.tensor(ids)
        mask[b, prompt_length - len(ids):] = 1
    tokens, mask = tokens.to(device), mask.to(device)

    run, tracker = None, None
    if stepflow is not None:
        run = FlowRun(stepflow, adapter, batch, prompt_length + max_new_tokens, layers)
        tracker = PhaseTracker(tokenizer, fmt, batch, vocab_size=adapter.vocab_size)
        tracker.read_prompts(rows)  # markers the prompt only quotes (in code, or closed history) do not count
        for position in range(prompt_length):
            pads = [len(ids) < prompt_length - position for ids in rows]
            ids = [r[position - (prompt_length - len(r))] if not pad else pad_id
                   for r, pad in zip(rows, pads, strict=True)]
            run.label(tracker.push(ids, pads))
    generator = None  # made on the logits' device (the last GPU of a split model)
    decode = adapter.decode_step(batch, use_cache)
    stop_ids = {tokenizer.eos_token_id} - {None} if stop_at_eos else set()
    finished = [False] * batch
    attached = adapter.attach_flow(run) if run is not None else nullcontext()
    with attached:
        n_new = prompt_length
        for _ in range(max_new_tokens):
            if run is not None:
                run.begin_forward(tokens.shape[1] - n_new if use_cache else 0, n_new if use_cache else tokens.shape[1])
            logits = decode(tokens, mask, n_new if use_cache else tokens.shape[1])
            if seed is not None and generator is None:
                generator = torch.Generator(device=logits.device).manual_seed(seed)
            chosen = _sample(logits[:, -1], do_sample, temperature, top_p, generator)
            chosen_ids = chosen.tolist()  # the one host transfer per step
            pads = list(finished)
            chosen_ids = [pad_id if pad else t for t, pad in zip(chosen_ids, pads, strict=True)]
            tokens = torch.cat([tokens, torch.tensor(chosen_ids, device=device)[:, None]], dim=1)
            mask = torch.cat([mask, torch.tensor([0 if p else 1 for p in pads], device=device)[:, None]], dim=1)
            if run is not None and tracker is not None:  # both or neither
                run.label(tracker.push(chosen_ids, pads))
            finished = [f or t in stop_ids for f, t in zip(finished, chosen_ids, strict=True)]
            n_new = 1
            if all(finished):
                break
    if run is not None and not run.stats.acted():
        reached = any(THINKING in segments for segments in run.host_segments())
        warnings.warn(_never_acted_reason(reached, fmt), StepsalWarning, stacklevel=3)  # past torch.no_grad
    full = [tokens[b][mask[b].bool()].cpu() for b in range(batch)]
    return _collect(tokenizer, full, rows, fmt, run.stats if run is not None else None, stepflow)


def _never_acted_reason(reached: bool, fmt: TraceFormat) -> str:
    """Why StepFlow changed nothing, in words (so that a zero table is not read as a result); ``reached``:
    whether some row reached the thinking segment."""
    if not reached:
        return (f"StepFlow never acted: no row reached the thinking segment (marker /{fmt.thinking_start}/ never "
                "appeared). End the prompt with the thinking marker (R1-style templates do; the CLI's "
                "--start-thinking), or use a model that writes it.")
    return ("StepFlow never acted: the rows reached thinking, but no OEB row was below its bridge target and no "
            "new thinking step started in the SMI layers. Generate longer, or check tau_max and the layers.")


def _require_thinking_marker(tokenizer: Any, rows: list[list[int]], fmt: TraceFormat) -> None:
    for ids in rows:
        text = tokenizer.decode(ids)
        if prompt_thinking_from(text, fmt) == len(text):  # no open marker: none at all, in code, or closed
            raise TraceFormatError(
                f"StepFlow acts on thinking and summary tokens, but the prompt leaves no thinking marker "
                f"/{fmt.thinking_start}/ open outside code (format {fmt.name!r}). End the prompt with it "
                "(R1-style chat templates do: '...<|im_start|>assistant\\n<think>\\n'), pass the format that matches "
                "the model, or marker_in_output=True if the model writes the marker itself.")


def _collect(tokenizer: Any, full: list[Tensor], rows: list[list[int]], fmt: TraceFormat, stats: FlowStats | None,
             flow: StepFlow | None, request_stats: list[FlowStats | None] | None = None) -> Generation:
    """The Generation of each row's full sequence ``full`` (prompt ``rows`` + continuation)."""
    texts, traces, errors = [], [], []
    for row, ids in zip(full, rows, strict=True):
        texts.append(tokenizer.decode(row[len(ids):]))
        try:
            traces.append(Trace.from_tokens(row, tokenizer, fmt, min_thinking_steps=1, allow_missing_summary=True,
                                            prompt_length=len(ids)))
            errors.append(None)
        except TraceFormatError as error:
            traces.append(None)
            errors.append(str(error))
    return Generation(texts=texts, tokens=full, prompt_lengths=[len(r) for r in rows], traces=traces,
                      trace_errors=errors, stats=stats, flow=flow, request_stats=request_stats)
