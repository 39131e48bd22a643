"""Incremental phase and step tracking during generation: O(1) work per token and row.

Each token's text comes from a table built once per tokenizer (no per-token decode). A bounded
window of recent text finds markers, also when split across tokens; marker tokens belong to the
segment they open and are relabelled when the marker completes; markers the prompt only quotes are
skipped (:meth:`RowTracker.read_prompt`). Thinking steps start where :mod:`stepsal.sentences` (the
rule :class:`~stepsal.Trace` uses) says; a token opens a step when its first non-whitespace
character lies at or past a new step start, which is how traces place tokens.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..formats import TraceFormat, code_spans, inside, prompt_thinking_from
from ..segments import QUESTION, SUMMARY, THINKING
from ..sentences import MIN_THINKING_CHARS, SENTENCE_END, StepSplitter, keep_thinking_piece
from ..traces import tokenizer_fingerprint

WINDOW_CHARS = 96
_TOKEN_TEXT_CACHE: dict[str, list[str]] = {}
_TOKEN_BYTES_CACHE: dict[str, list[bytes]] = {}


def token_texts(tokenizer: Any) -> list[str]:
    """Text of every token id, decoded once per tokenizer (the decode path never calls the tokenizer)."""
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


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any) -> list[bytes]:
    """UTF-8 bytes of every token id. A character split over several tokens (byte-level BPE, or
    SentencePiece's byte fallback) decodes to U+FFFD piece by piece; its tokens keep their bytes
    here, so that decoding the stream incrementally gives the same text as decoding the sequence."""
    key = "bytes:" + tokenizer_fingerprint(tokenizer)
    if key not in _TOKEN_BYTES_CACHE:
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        texts = token_texts(tokenizer)
        result = []
        for index, text in enumerate(texts):
            if "\ufffd" in text:
                piece = tokenizer.convert_ids_to_tokens(index)
                fallback = BYTE_FALLBACK.fullmatch(piece or "")
                if fallback:
                    result.append(bytes([int(fallback.group(1), 16)]))
                    continue
                if piece and all(char in byte_of for char in piece):
                    result.append(bytes(byte_of[char] for char in piece))
                    continue
            result.append(text.encode())
        _TOKEN_BYTES_CACHE[key] = result
    return _TOKEN_BYTES_CACHE[key]


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
    splitter: StepSplitter | None = None  # the thinking text's step starts (the rule traces use)
    step_starts: deque[int] = field(default_factory=deque)  # confirmed starts no token has reached yet
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
        self.step_starts.clear()
        if self.phase == THINKING:
            self.step = 0
            keep = partial(keep_thinking_piece, min_chars=self.min_step_chars)
            self.splitter = StepSplitter(SENTENCE_END, keep, offset=self.chars_dropped + marker.end())
            self.step_starts.extend(self.splitter.feed(self.window[marker.end():]))
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
        """A token opens a step when its first non-whitespace character is at or past a step start
        that no earlier token reached (several starts within one token make one step, as in traces);
        whitespace-only tokens stay in the step before them."""
        assert self.splitter is not None
        self.step_starts.extend(self.splitter.feed(text))
        if not text.strip():
            return TokenLabel(position, THINKING, self.step, False)
        anchor = self.chars_dropped + self.window_starts[-1] + len(text) - len(text.lstrip())
        opened = False
        while self.step_starts and self.step_starts[0] <= anchor:
            self.step_starts.popleft()
            opened = True
        if opened:
            self.step += 1
            self.step_opened = (position, anchor)  # if a marker turns out to start here, the step is undone
        return TokenLabel(position, THINKING, self.step, opened)


class SequenceTracker:
    """Phase and step tracking of one sequence fed token ids: a :class:`RowTracker` over the
    token-bytes table, with a UTF-8 decoder that yields a character split over tokens (whole) at
    the token that completes it. :class:`PhaseTracker` holds one per row; a serving engine one per
    request (:mod:`stepsal.vllm`)."""

    def __init__(self, table: list[bytes], fmt: TraceFormat, min_step_chars: int = MIN_THINKING_CHARS):
        self.table, self.row = table, RowTracker(fmt, min_step_chars)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def position(self) -> int:
        """How many tokens (pads included) were pushed."""
        return self.row.position

    def read_prompt(self, ids: Sequence[int]) -> None:
        """The prompt's ids, before they are pushed: see :meth:`RowTracker.read_prompt`."""
        self.row.read_prompt(b"".join(self.table[i] for i in ids).decode("utf-8", "replace"))

    def push(self, token: int) -> list[TokenLabel]:
        """One token: its label, plus relabels of earlier marker tokens."""
        return self.row.push(self.decoder.decode(self.table[token]))

    def pad(self) -> list[TokenLabel]:
        return [self.row.pad()]


def token_table(tokenizer: Any, vocab_size: int = 0) -> list[bytes]:
    """:func:`token_bytes`, padded to the model's ``vocab_size``: ids the tokenizer lacks (Qwen2.5 pads
    151665 tokens to 151936 embedding rows) have no text, as when the tokenizer decodes them."""
    table = token_bytes(tokenizer)
    return table + [b""] * (vocab_size - len(table)) if vocab_size > len(table) else table


class PhaseTracker:
    """One :class:`SequenceTracker` per row of a batch, fed token ids."""

    def __init__(self, tokenizer: Any, fmt: TraceFormat, batch: int, min_step_chars: int = MIN_THINKING_CHARS,
                 vocab_size: int = 0):
        """``vocab_size``: the model's (see :func:`token_table`)."""
        table = token_table(tokenizer, vocab_size)
        self.sequences = [SequenceTracker(table, fmt, min_step_chars) for _ in range(batch)]

    @property
    def rows(self) -> list[RowTracker]:
        return [sequence.row for sequence in self.sequences]

    def read_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Each row's prompt ids, before they are pushed: see :meth:`RowTracker.read_prompt`."""
        for sequence, ids in zip(self.sequences, prompts, strict=True):
            sequence.read_prompt(ids)

    def push(self, token_ids: Sequence[int], is_pad: Sequence[bool] | None = None) -> list[list[TokenLabel]]:
        """One token per row; returns each row's labels (one, or several after a marker)."""
        is_pad = is_pad or [False] * len(token_ids)
        return [sequence.pad() if pad else sequence.push(token)
                for sequence, token, pad in zip(self.sequences, token_ids, is_pad, strict=True)]
