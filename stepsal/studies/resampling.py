"""Accuracy along the trace (resampling importance, Thought Anchors' black-box measure).

For a trace of a problem with a known answer, the model continues the trace from every prefix that
ends at a step boundary (k = 0: every token before the first thinking step's text, the opening marker
included; k = 1..S: through the end of thinking step k), ``n_rollouts`` times, and each
continuation's answer is read from its summary (:func:`stepsal.extract_answer`). Per prefix:
P(correct) with a Wilson interval and the answers' distribution; per thinking step k: the resampling
importance P(k) - P(k - 1) and the KL divergence of the answer distribution at k from the one at
k - 1 (Thought Anchors' counterfactual measure without its filter of resampled steps that resemble
the original, which needs a sentence embedder; Laplace smoothing over the answers seen at k - 1 and k).

Rollouts go to ``out/rollouts.jsonl`` as they finish (resumable, one writer at a time, settings checked
like :func:`stepsal.evaluate`). The rollouts of one prefix run as one batch through
:func:`stepsal.generate` (the fast path for a transformers model with ``tokenizer=``); they do not
share the prefix's KV cache (each row of the batch computes it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..backends import adapter_for
from ..errors import SettingsMismatchError, StepsalError, TraceFormatError
from ..generation import generate
from ..model_types import Model
from ..options import real_number, whole_number
from ..segments import THINKING
from ..stats import wilson_interval
from ..storage import frame_from_json, frame_to_json, read_json, reading, write_json, writer_lock
from ..tasks.answers import extract_answer, is_correct, to_number
from ..traces import StepLayout, Trace, require_trace
from ..vis.figures import plot_resampling
from ..vis.html import frame_section
from ..vis.labels import step_labels
from .evaluate import MAX_SEED
from .rows import RowKind, differing_setting, read_rows, set_aside_damaged_lines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROLLOUTS = RowKind(what="rollout", keys=("prefix", "rollout"), writer="stepsal resample",
                   skip_hint="resampling_importance reads on with a warning and redoes them")
ROLLOUT_FILE = "rollouts.jsonl"
NO_ANSWER = "<no answer>"
GREEDY_IGNORES = ("top_p", "seed")  # a greedy rollout does not depend on these


def prefix_ends(trace: Trace) -> list[int]:
    """Where each prefix ends (exclusive): k = 0 right after the opening thinking marker (which the
    layout counts as the first thinking step's start), k >= 1 at the end of thinking step k."""
    thinking = trace.layout.steps_of(THINKING)
    if not thinking:
        raise TraceFormatError("resampling importance continues a trace from its thinking steps; this trace has none.")
    steps = trace.layout.steps
    start, end = steps[thinking[0]].token_span
    marker = trace.marker_end_token(THINKING)
    first = marker + 1 if marker is not None and start <= marker < end - 1 else start
    return [first] + [steps[index].token_span[1] for index in thinking]


def answer_key(answer: Any) -> str:
    """The category of an answer for its distribution: the number it states, else its text."""
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return NO_ANSWER
    number = to_number(str(answer))
    return str(number) if number is not None else str(answer).strip()


def smoothed_kl(now: Counter, before: Counter) -> float:
    """KL(now || before) in nats, both Laplace-smoothed (+1) over the answers either holds."""
    keys = sorted(set(now) | set(before))
    n_now, n_before = sum(now.values()) + len(keys), sum(before.values()) + len(keys)
    return sum((now[key] + 1) / n_now * math.log(((now[key] + 1) / n_now) / ((before[key] + 1) / n_before))
               for key in keys)


@dataclass(kw_only=True)
class ResamplingImportance:
    """All rollouts (``rollouts``: one row per prefix k and rollout) and what they say per prefix."""

    rollouts: pandas.DataFrame
    layout: StepLayout
    gold: str
    n_prefixes: int
    confidence: float = 0.95

    @property
    def thinking_steps(self) -> list[int]:
        """The layout index of thinking step k (k = 1..S), in order."""
        return self.layout.steps_of(THINKING)

    def _per_prefix(self) -> list[pandas.DataFrame]:
        return [self.rollouts.loc[self.rollouts["prefix"] == k] for k in range(self.n_prefixes)]

    @property
    def p_correct(self) -> Float[Tensor, " prefix"]:
        """P(correct | prefix through step k), k = 0..S (NaN where no rollout finished)."""
        return torch.tensor([float(rows["correct"].mean()) if len(rows) else math.nan
                             for rows in self._per_prefix()], dtype=torch.float64)

    @property
    def interval(self) -> Float[Tensor, "prefix 2"]:
        """Wilson score interval of each P(correct) at ``confidence``."""
        return torch.tensor([wilson_interval(int(rows["correct"].sum()), len(rows), self.confidence)
                             for rows in self._per_prefix()], dtype=torch.float64)

    def answers(self) -> list[Counter]:
        """The answers' distribution per prefix (numbers as exact fractions, '<no answer>' for none)."""
        return [Counter(answer_key(answer) for answer in rows["answer"]) for rows in self._per_prefix()]

    @property
    def importance(self) -> Float[Tensor, " prefix"]:
        """P(k) - P(k - 1) for thinking step k = 1..S; NaN at k = 0."""
        p = self.p_correct
        return torch.cat([torch.tensor([math.nan], dtype=torch.float64), p[1:] - p[:-1]])

    @property
    def kl(self) -> Float[Tensor, " prefix"]:
        """KL of the answer distribution at k from the one at k - 1 (nats, Laplace-smoothed); NaN at k = 0."""
        dists = self.answers()
        return torch.tensor([math.nan] + [smoothed_kl(dists[k], dists[k - 1]) for k in range(1, self.n_prefixes)],
                            dtype=torch.float64)

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per prefix k: the step it ends with, rollouts, correct ones, P(correct) and its
        interval, importance, KL and the most frequent answer."""
        labels = step_labels(self.layout)
        p, interval, importance, kl = self.p_correct, self.interval, self.importance, self.kl
        rows = []
        for k, (group, dist) in enumerate(zip(self._per_prefix(), self.answers(), strict=True)):
            step = self.thinking_steps[k - 1] if k else -1
            rows.append({"prefix": k, "step": step, "label": labels[step] if k else "before thinking",
                         "rollouts": len(group), "correct": int(group["correct"].sum()), "p_correct": float(p[k]),
                         "ci_low": float(interval[k, 0]), "ci_high": float(interval[k, 1]),
                         "importance": float(importance[k]), "kl": float(kl[k]),
                         "top_answer": dist.most_common(1)[0][0] if dist else None})
        return pandas.DataFrame(rows)

    def __repr__(self) -> str:
        p = self.p_correct
        return (f"ResamplingImportance({self.n_prefixes - 1} thinking steps, {len(self.rollouts)} rollouts, gold "
                f"{self.gold!r}; P(correct) {float(p[0]):.2f} before thinking -> {float(p[-1]):.2f} after it)")

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.to_dataframe(), fig=self.plot())

    def plot(self, path: str | os.PathLike | None = None) -> Figure:
        """P(correct) along the trace with its interval, and the importance of each thinking step."""
        frame = self.to_dataframe()
        return plot_resampling(frame, self.confidence, path=path)

    def save(self, path: str | os.PathLike) -> Path:
        """JSON: the rollouts, the layout, the gold answer."""
        return write_json(path, "ResamplingImportance", {
            "rollouts": frame_to_json(self.rollouts), "layout": self.layout.to_dict(), "gold": self.gold,
            "n_prefixes": self.n_prefixes, "confidence": self.confidence})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ResamplingImportance:
        with reading(path, "ResamplingImportance"):
            data = read_json(path, "ResamplingImportance")
            return cls(rollouts=frame_from_json(data["rollouts"]), layout=StepLayout.from_dict(data["layout"]),
                       gold=str(data["gold"]), n_prefixes=int(data["n_prefixes"]),
                       confidence=float(data["confidence"]))


def resampling_importance(model: Model, trace: Trace, answer: str | int | float, *, n_rollouts: int = 8,
                          temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 256, seed: int = 0,
                          out: str | os.PathLike | None = None, confidence: float = 0.95, progress: bool = True,
                          tokenizer: Any = None) -> ResamplingImportance:
    """Continue ``trace`` from every step-boundary prefix and read the answers (module docstring).

    Args:
        model: a TransformerLens model, or a transformers model with ``tokenizer=`` (the fast path).
        trace: the trace (its question and thinking steps; what follows the prefixes is not read).
        answer: the gold answer (compared with :func:`stepsal.is_correct`).
        n_rollouts, temperature, top_p, max_new_tokens, seed: sampling, as in :func:`stepsal.evaluate`;
            ``temperature=0`` is one greedy rollout per prefix.
        out: a folder for ``rollouts.jsonl``: rollouts already there (same settings) are kept.
    """
    require_trace(trace, "resampling_importance")
    greedy = real_number(temperature, "temperature") == 0
    n = 1 if greedy else whole_number(n_rollouts, "n_rollouts", minimum=1)
    if not greedy and not (temperature > 0 and 0 < real_number(top_p, "top_p") <= 1):
        raise StepsalError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}.")
    adapter = adapter_for(model, tokenizer)
    settings = {"model": adapter.label, "trace": hashlib.sha1(json.dumps(trace.tokens.tolist()).encode()).hexdigest(),
                "max_new_tokens": whole_number(max_new_tokens, "max_new_tokens", minimum=1),
                "temperature": temperature, "top_p": top_p, "seed": whole_number(seed, "seed", 0, MAX_SEED)}
    ends = prefix_ends(trace)
    if out is None:
        rows = _rollouts(model, trace, ends, n, greedy, settings, [], None, progress, tokenizer)
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise StepsalError(f"out={str(out)!r} is a file; pass a folder for the rollouts.")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ROLLOUT_FILE
        with writer_lock(path, fix="write elsewhere (another --out)"):
            set_aside_damaged_lines(path, ROLLOUTS)
            kept = read_rows(path, ROLLOUTS)
            _check_settings(kept, settings, greedy, path, ends)
            rows = _rollouts(model, trace, ends, n, greedy, settings, kept, path, progress, tokenizer)
    frame = pandas.DataFrame([row for row in rows if row["rollout"] < n]).sort_values(["prefix", "rollout"])
    frame["correct"] = [is_correct(None if found is None or found != found else str(found), answer)
                        for found in frame["answer"]]  # read now: the gold answer is no setting of the rollouts
    return ResamplingImportance(rollouts=frame.reset_index(drop=True), layout=trace.layout, gold=str(answer),
                                n_prefixes=len(ends), confidence=confidence)


def _rollouts(model: Model, trace: Trace, ends: Sequence[int], n: int, greedy: bool, settings: dict[str, Any],
              kept: list[dict], path: Path | None, progress: bool, tokenizer: Any) -> list[dict]:
    """The kept rows plus the missing rollouts of every prefix (appended to ``path`` as they finish)."""
    done = {(row["prefix"], row["rollout"]) for row in kept}
    rows = list(kept)
    work = [k for k in range(len(ends)) if any((k, r) not in done for r in range(n))]
    sink = None if path is None else path.open("a")
    try:
        for k in tqdm(work, desc="rollouts", disable=not progress, unit="prefix"):
            batch_seed = None if greedy else settings["seed"] * 1_000_003 + k
            result = generate(model, [trace.tokens[:ends[k]]] * n, max_new_tokens=settings["max_new_tokens"],
                              do_sample=not greedy, temperature=settings["temperature"] if not greedy else 1.0,
                              top_p=settings["top_p"] if not greedy else 1.0, seed=batch_seed, fmt=trace.fmt,
                              tokenizer=tokenizer)
            for r, (text, tokens) in enumerate(zip(result.texts, result.tokens, strict=True)):
                if (k, r) in done:
                    continue
                found = extract_answer(text, trace.fmt, thinking_open=True)
                row = {"prefix": k, "rollout": r, "prefix_length": ends[k], "seed": batch_seed, "answer": found,
                       "text": text, "tokens": tokens[ends[k]:].tolist(), "settings": settings}
                rows.append(row)
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
            if sink is not None:
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    return rows


def _check_settings(rows: list[dict], settings: dict[str, Any], greedy: bool, path: Path,
                    ends: Sequence[int]) -> None:
    """Refuse to resume from rollouts that other settings (or another trace, or other prefix ends) produced."""
    for row in rows:
        k = row["prefix"]
        if not (isinstance(k, int) and 0 <= k < len(ends) and row.get("prefix_length") == ends[k]):
            raise SettingsMismatchError(
                f"{path} holds rollouts of prefix {k!r} ending at token {row.get('prefix_length')!r}; this run's "
                f"prefixes end at {list(ends)}. Use another out folder, or delete {path} to start again.")
        recorded = row.get("settings")
        if not isinstance(recorded, dict):
            continue
        name = differing_setting(recorded, settings, GREEDY_IGNORES if greedy else ())
        if name is not None:
            raise SettingsMismatchError(
                f"{path} holds rollouts made with {name}={recorded.get(name)!r}; this run asks for "
                f"{name}={settings[name]!r}. Use another out folder, or delete {path} to start again.")
