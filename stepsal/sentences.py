"""Where a step ends: the one rule that both :class:`stepsal.Trace` and generation follow.

Thinking is split into sentences, the summary into paragraphs (docs/paper.md section 2). A piece is the
text between two delimiters; a step ends after each *kept* piece (long enough, not a number, not a
table), and the text after it opens the next step, provided some non-whitespace text follows.

:class:`StepSplitter` applies this rule to text that arrives in chunks (one token at a time during
generation) and reports each step start once it is certain; :func:`step_starts` is the same splitter
fed a whole segment at once. Because there is one implementation, a trace and the tracker that
follows its generation cannot disagree on where a step begins. Torch-free.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from .errors import OptionError

# a sentence ends at '.' + whitespace (the reference's rule), at the full stops of scripts that
# need no space after them (CJK: 。！？, a run of them is one end), or at other scripts' stops +
# whitespace (। ۔ ։ ።)
SPACED_STOPS = ".\u0964\u06d4\u0589\u1362"
WIDE_STOPS = "\u3002\uff01\uff1f\uff61"
# zero-width characters (U+200B/C/D, U+FEFF) that Python's \s does not match count as whitespace
# after a stop: '.' + U+200B between two sentences ends the first
ZERO_WIDTH = "\u200b\u200c\u200d\ufeff"
SENTENCE_END = re.compile(f"[{re.escape(SPACED_STOPS)}][\\s{ZERO_WIDTH}]+|[{WIDE_STOPS}]+[\\s{ZERO_WIDTH}]*")
BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
MIN_THINKING_CHARS = 15
MIN_SUMMARY_CHARS = 10

Keep = Callable[[str], bool]


def sentence_pattern(sentence_end: str | re.Pattern[str] | None) -> re.Pattern[str]:
    """The regular expression that ends a thinking sentence: ``SENTENCE_END`` for None, else the
    user's, refused (:class:`OptionError`) when it does not compile or matches the empty string."""
    if sentence_end is None:
        return SENTENCE_END
    try:
        pattern = re.compile(sentence_end)
    except (re.error, TypeError) as error:
        raise OptionError(f"sentence_end {sentence_end!r} is no regular expression ({error}); pass one like "
                          r"r'[.!?]\s+'.") from None
    if pattern.fullmatch(""):
        raise OptionError(f"sentence_end {sentence_end!r} matches the empty string, so it would end a sentence "
                          r"everywhere; pass one that matches the text between sentences, like r'[.!?]\s+'.")
    return pattern


def text_width(text: str) -> int:
    """Characters, with wide ones (CJK) counted twice: 15 of them would be a long CJK sentence."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def is_table(piece: str) -> bool:
    """Markdown table rows or separators only (every non-empty line)."""
    lines = [line.strip() for line in piece.strip().splitlines() if line.strip()]
    return bool(lines) and all(
        (line.startswith("|") and line.endswith("|"))
        or ("-" in line and re.fullmatch(r"[|:\- ]+", line) is not None)
        for line in lines
    )


def keep_thinking_piece(piece: str, min_chars: int = MIN_THINKING_CHARS) -> bool:
    """Reference rule: keep sentences of >= 15 characters (width, CJK counted twice) that are not
    numbers or table rows."""
    stripped = piece.strip()
    if text_width(stripped) < min_chars:
        return False
    if re.sub(r"[.,\-\s]", "", stripped).isdigit():
        return False
    return not is_table(stripped)


def keep_summary_piece(piece: str) -> bool:
    """Reference rule: keep paragraphs of >= 10 characters that are not tables."""
    stripped = piece.strip()
    return len(stripped) >= MIN_SUMMARY_CHARS and not is_table(stripped)


def too_few_steps(n_thinking: int, minimum: str, lower: str) -> str:
    """The message for a trace with fewer thinking steps than asked (``minimum``: how the caller set
    it, e.g. "min_thinking_steps=2"; ``lower``: what to lower)."""
    return (f"the thinking segment has {n_thinking} step(s), fewer than {minimum}. Steps are sentences ending "
            f"in '. ' of at least {MIN_THINKING_CHARS} characters (CJK: 。！？ end sentences, each character "
            f"counts twice); pass a longer trace, lower {lower}, or split sentences another way "
            "(sentence_end=<regex>).")


class StepSplitter:
    """Step starts of one segment's text, fed in chunks; for the built-in delimiters (and any whose
    unfinished match starts within ``lookback`` characters or just before trailing whitespace) the
    same for any chunking as for the whole text at once.

    A delimiter match is *settled* once a character follows that it does not take (the default
    delimiters end in a greedy run of stops or whitespace); the piece before it is then judged with
    ``keep``. A kept piece makes the end of its delimiter a step start, *confirmed* when non-whitespace
    text arrives from there on. Positions are absolute: ``offset`` is the position of the first
    character fed. Work per chunk is bounded by the chunk, ``lookback`` and a trailing whitespace run;
    memory by the current piece.
    """

    def __init__(self, delimiter: re.Pattern[str] = SENTENCE_END, keep: Keep = keep_thinking_piece,
                 offset: int = 0, lookback: int = 64):
        self.delimiter, self.keep, self.lookback = delimiter, keep, lookback
        self.buffer = ""  # text from the start of the current piece
        self.buffer_start = offset  # absolute position of buffer[0]
        self.scan_from = 0  # buffer index where the next delimiter search begins
        self.pending: int | None = None  # a step start waiting for non-whitespace text
        self.starts: list[int] = []  # confirmed step starts
        self.kept_pieces: list[tuple[int, int]] = []  # (start, end) of kept pieces, absolute

    def feed(self, text: str) -> list[int]:
        """Consume the next chunk; returns the step starts it confirmed."""
        before = len(self.starts)
        self.buffer += text
        self._scan(final=False)
        return self.starts[before:]

    def close(self) -> list[int]:
        """The segment ended: settle what is left (a delimiter at the very end opens nothing)."""
        before = len(self.starts)
        self._scan(final=True)
        end = self.buffer_start + len(self.buffer)
        if self.keep(self.buffer):
            self.kept_pieces.append((self.buffer_start, end))
        return self.starts[before:]

    def _scan(self, final: bool) -> None:
        while True:
            match = next((m for m in self.delimiter.finditer(self.buffer, self.scan_from) if m.end() > 0), None)
            if match is None:
                # a delimiter may still begin within the last ``lookback`` characters, or at the
                # character before a trailing run of whitespace (a stop waiting for more of it)
                blank_run = len(self.buffer) - len(self.buffer.rstrip())
                self.scan_from = max(0, min(len(self.buffer) - self.lookback, len(self.buffer) - blank_run - 1))
                break
            if match.end() == len(self.buffer) and not final:  # more of it may still come
                self.scan_from = match.start()
                break
            if self.keep(self.buffer[:match.start()]):
                self.kept_pieces.append((self.buffer_start, self.buffer_start + match.start()))
                self._confirm(match.start())
                self.pending = self.buffer_start + match.end()
            self._confirm(match.end())
            self.buffer_start += match.end()  # the next piece starts after the delimiter
            self.buffer = self.buffer[match.end():]
            self.scan_from = 0
        self._confirm(len(self.buffer))

    def _confirm(self, upto: int) -> None:
        """Confirm the pending start if non-whitespace text lies between it and buffer[upto]."""
        if self.pending is not None and self.buffer[max(0, self.pending - self.buffer_start):upto].strip():
            self.starts.append(self.pending)
            self.pending = None


def step_starts(text: str, lo: int, hi: int, delimiter: re.Pattern[str], keep: Keep
                ) -> tuple[list[int], list[tuple[int, int]]]:
    """Starts of the steps after the first in ``text[lo:hi]``, and the kept pieces (absolute spans)."""
    splitter = StepSplitter(delimiter, keep, offset=lo)
    splitter.feed(text[lo:hi])
    splitter.close()
    return splitter.starts, splitter.kept_pieces
