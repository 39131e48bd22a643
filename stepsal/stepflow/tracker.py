"""Incremental phase and step tracking during generation: O(1) work per token and row.

Each token's text comes from a table built once per tokenizer (no per-token decode). A bounded
window of recent text finds markers, also when split across tokens; marker tokens belong to the
segment they open and are relabelled when the marker completes; markers the prompt only quotes are
skipped (:meth:`RowTracker.read_prompt`). A thinking step ends at a sentence end ('.' + whitespace,
CJK 。！？, ...) of a kept sentence (at least ``min_step_chars`` wide, not a number); the next token
with non-whitespace text opens the next step, as in :mod:`stepsal.traces`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..formats import TraceFormat, code_spans, inside, prompt_thinking_from
from ..traces import MIN_THINKING_CHARS, QUESTION, SPACED_STOPS, SUMMARY, THINKING, WIDE_STOPS, text_width

WINDOW_CHARS = 96
_TOKEN_TEXT_CACHE: dict[str, list[str]] = {}


def token_texts(tokenizer: Any) -> list[str]:
    """Text of every token id, decoded once per tokenizer (the decode path never calls the tokenizer)."""
    from ..traces import tokenizer_fingerprint

    key = tokenizer_fingerprint(tokenizer)
    if key not in _TOKEN_TEXT_CACHE:
        # decode each token after a reference token and cut the reference off: SentencePiece
        # decoders strip a leading space from a sequence's first token ('▁The' alone gives 'The')
        reference = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        prefix = tokenizer.decode(reference, clean_up_tokenization_spaces=False)
        pairs = tokenizer.batch_decode([reference + [i] for i in range(len(tokenizer))],
                                       clean_up_tokenization_spaces=False)
        _TOKEN_TEXT_CACHE[key] = [
            pair[len(prefix):] if reference and pair.startswith(prefix)
            else tokenizer.decode([i], clean_up_tokenization_spaces=False)  # rare: decode alone
            for i, pair in enumerate(pairs)]
    return _TOKEN_TEXT_CACHE[key]


@dataclass
class TokenLabel:
    """What the tracker decided for one token (absolute position ``position`` in its row)."""

    position: int
    segment: int
    step: int  # thinking step index, -1 outside thinking
    inject: bool  # SMI acts here: first token of a thinking step after the first, or summary start


@dataclass
class RowTracker:
    """Phase and step state of one sequence."""

    fmt: TraceFormat
    min_step_chars: int = MIN_THINKING_CHARS
    phase: int = QUESTION
    position: int = 0
    window: str = ""
    window_starts: list[int] = field(default_factory=list)  # window offset of each recent token
    window_positions: list[int] = field(default_factory=list)
    step: int = -1
    sentence_chars: int = 0  # characters of the current sentence after its first non-whitespace one
    sentence_is_number: bool = True  # only digits, '.', ',', '-' and spaces so far
    sentence_closed: bool = False  # a kept sentence ended: the next non-whitespace text opens a step
    previous_ends_with_period: bool = False
    kept_run_open: bool = False  # this token ended inside the stop run that closed a kept sentence
    step_opened: tuple[int, int] = (-1, -1)  # (position, absolute character) where the current step opened
    chars_dropped: int = 0  # characters that left the window (absolute offset of window[0])
    skip_spans: list[tuple[int, int]] = field(default_factory=list)  # code in the prompt: no markers there
    thinking_from: int = 0  # thinking markers before this character are quoted, not emitted

    def read_prompt(self, prompt: str) -> None:
        """Markers the prompt quotes are not the model's: ignore those inside its code, and thinking
        markers before the prompt's open one (or before its end when it opens none: chat history)."""
        self.skip_spans = code_spans(prompt)
        self.thinking_from = prompt_thinking_from(prompt, self.fmt)

    def push(self, text: str) -> list[TokenLabel]:
        """Consume one token's text. Returns its label, plus relabels of earlier marker tokens."""
        position = self.position
        self.position += 1
        self._append(text, position)
        marker = self._completed_marker(len(text))
        if marker is not None:
            return self._enter_next_phase(marker, position)
        if self.phase == THINKING:
            return [self._thinking_token(text, position)]
        return [TokenLabel(position, self.phase, -1, False)]

    def pad(self) -> TokenLabel:
        """A padding position (outside every segment)."""
        self.position += 1
        return TokenLabel(self.position - 1, -1, -1, False)

    # ------------------------------------------------------------ internals

    def _append(self, text: str, position: int) -> None:
        self.window_starts.append(len(self.window))
        self.window_positions.append(position)
        self.window += text
        excess = len(self.window) - WINDOW_CHARS
        if excess > 0:
            self.chars_dropped += excess
            self.window = self.window[excess:]
            self.window_starts = [s - excess for s in self.window_starts]
            while len(self.window_starts) > 1 and self.window_starts[1] <= 0:
                self.window_starts.pop(0)
                self.window_positions.pop(0)

    def _completed_marker(self, new_chars: int) -> re.Match[str] | None:
        """A match of the next phase's marker that ends inside the newest token's text."""
        if self.phase == SUMMARY:
            return None
        pattern = self.fmt.thinking_start if self.phase == QUESTION else self.fmt.summary_start
        fresh_from = len(self.window) - new_chars
        for match in re.finditer(pattern, self.window):
            start = self.chars_dropped + match.start()
            quoted = inside(start, self.skip_spans) or (self.phase == QUESTION and start < self.thinking_from)
            if match.end() > fresh_from and match.end() > 0 and not quoted:
                return match
        return None

    def _enter_next_phase(self, marker: re.Match[str], position: int) -> list[TokenLabel]:
        """Switch phase; relabel the tokens from the marker's first character to this token."""
        first = max(i for i, start in enumerate(self.window_starts) if start <= max(marker.start(), 0))
        # a token whose first non-whitespace character precedes the marker stays in the segment
        # where its text began (traces place tokens by that character too)
        end = self.window_starts[first + 1] if first + 1 < len(self.window_starts) else len(self.window)
        text = self.window[max(self.window_starts[first], 0):end]
        if end - len(text.lstrip()) < marker.start():
            first += 1
        before, last_step = self.phase, self.step
        self.phase = THINKING if self.phase == QUESTION else SUMMARY
        self.sentence_closed = False
        self.previous_ends_with_period = self.kept_run_open = False
        if self.phase == THINKING:
            self.step = 0
            self._new_sentence(self.window[marker.end():])
            labels = [TokenLabel(p, THINKING, 0, False) for p in self.window_positions[first:]]
            return labels or [TokenLabel(position, before, -1, False)]
        self.step = -1
        undone = []
        opened_at, opened_char = self.step_opened
        if last_step >= 1 and opened_char >= self.chars_dropped + marker.start():
            # the "step" was opened by the marker's first characters: it was the previous step all along
            last_step -= 1
            stays = [p for p in self.window_positions[:first] if p >= opened_at]
            undone = [TokenLabel(p, THINKING, last_step, False) for p in stays]
        labels = [TokenLabel(p, SUMMARY, -1, False) for p in self.window_positions[first:]]
        labels = labels or [TokenLabel(position, THINKING, last_step, False)]
        labels[-1].inject = last_step >= 0  # the summary starts; act at the token that completed the marker
        return undone + labels

    def _thinking_token(self, text: str, position: int) -> TokenLabel:
        """Sentence ends as in traces: a kept sentence (>= min_step_chars, not a number) ended by a
        stop ('.' + whitespace, a CJK stop run, ...) closes the step; the first token with
        non-whitespace text after it opens the next."""
        if self.previous_ends_with_period and text[:1].isspace():
            # the stop closed the previous token (and was counted there); this one starts with whitespace
            self.sentence_closed = self.sentence_closed or self._sentence_kept(period_counted=True)
            self._new_sentence("")
        # a token that carries on the run of CJK stops that ended a kept sentence starts inside that
        # sentence end, so (placed by its first character, as in traces) it does not open the next step
        continues_run = self.kept_run_open and LEADING_WIDE_STOPS.match(text) is not None
        self.previous_ends_with_period = text.endswith(tuple(SPACED_STOPS))
        inject = False
        if self.sentence_closed and text.strip() and not continues_run:
            self.step += 1
            self.sentence_closed = False
            inject = True
            # where the opening text starts: if a marker turns out to start there, the step is undone
            token_start = self.chars_dropped + self.window_starts[-1]
            self.step_opened = (position, token_start + len(text) - len(text.lstrip()))
        rest, kept_run_open = text, continues_run and self.kept_run_open
        while (end := TOKEN_SENTENCE_END.search(rest)) is not None:  # every stop inside this token
            self._add_to_sentence(rest[:end.start()])
            kept = self._sentence_kept()
            # a kept sentence's closure stays pending across a short piece ("。先。"), as in traces
            self.sentence_closed = self.sentence_closed or kept
            rest = ONE_STOP.sub("", rest[end.start():], count=1)  # the stop run and the whitespace after it
            kept_run_open = (kept or kept_run_open) and not rest  # the closing run reaches the end
            self._new_sentence("")
        self._add_to_sentence(rest)
        self.kept_run_open = kept_run_open and text.endswith(tuple(WIDE_STOPS))
        return TokenLabel(position, THINKING, self.step, inject)

    def _new_sentence(self, text: str) -> None:
        self.sentence_chars, self.sentence_is_number = 0, True
        self._add_to_sentence(text)

    def _add_to_sentence(self, text: str) -> None:
        if self.sentence_chars == 0:
            text = text.lstrip()
        self.sentence_chars += text_width(text)
        if self.sentence_is_number and text and re.sub(r"[\d.,\-\s]", "", text):
            self.sentence_is_number = False

    def _sentence_kept(self, period_counted: bool = False) -> bool:
        length = self.sentence_chars - (1 if period_counted else 0)  # traces measure without the period
        return length >= self.min_step_chars and not self.sentence_is_number


# a sentence end inside one token's text: a spaced stop with its whitespace, or a CJK stop
TOKEN_SENTENCE_END = re.compile(f"[{re.escape(SPACED_STOPS)}]\\s|[{WIDE_STOPS}]")
ONE_STOP = re.compile(f"^(?:[{re.escape(SPACED_STOPS)}]\\s+|[{WIDE_STOPS}]+\\s*)")
LEADING_WIDE_STOPS = re.compile(f"^[{WIDE_STOPS}]+")


class PhaseTracker:
    """One :class:`RowTracker` per row of a batch, fed token ids."""

    def __init__(self, tokenizer: Any, fmt: TraceFormat, batch: int, min_step_chars: int = MIN_THINKING_CHARS,
                 vocab_size: int = 0):
        """``vocab_size``: the model's; ids the tokenizer lacks (Qwen2.5 pads 151665 tokens to
        151936 embedding rows) have no text, as when the tokenizer decodes them."""
        self.texts = token_texts(tokenizer)
        if vocab_size > len(self.texts):
            self.texts = self.texts + [""] * (vocab_size - len(self.texts))
        self.rows = [RowTracker(fmt, min_step_chars) for _ in range(batch)]

    def read_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Each row's prompt ids, before they are pushed: see :meth:`RowTracker.read_prompt`."""
        for row, ids in zip(self.rows, prompts):
            row.read_prompt("".join(self.texts[i] for i in ids))

    def push(self, token_ids: Sequence[int], is_pad: Sequence[bool] | None = None) -> list[list[TokenLabel]]:
        """One token per row; returns each row's labels (one, or several after a marker)."""
        is_pad = is_pad or [False] * len(token_ids)
        return [[row.pad()] if pad else row.push(self.texts[token])
                for row, token, pad in zip(self.rows, token_ids, is_pad)]
