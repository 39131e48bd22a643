"""Answers of reasoning traces: extract the final answer, compare it with the gold one, pass@k.

- :func:`extract_answer`: the last ``\\boxed{...}`` after the thinking (nested braces), else the
  last "final answer is / the answer is / Answer:" phrase, else the last number. Only the summary
  counts: a trace whose thinking never closes has no answer (a cut-off "... so 13 * " is no "13").
- :func:`is_correct`: numbers compared exactly as fractions after normalising thousands commas,
  signs, decimals, ``a/b``, ``\\frac``, currency, percent and unit words; math-verify (optional
  extra) for what that does not parse; else normalised text.
- :func:`pass_at_k`: the unbiased estimator (Chen et al., 2021) from n samples with c correct.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import StepsalError
from ..formats import TraceFormat, get_format

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
PHRASES = re.compile(r"(?:final answer is|the answer is|answer\s*:)\s*(?P<rest>[^\n]*)", re.IGNORECASE)
SPECIAL_TOKEN = re.compile(r"<\|[^<>|]*\|>")
NUMBER = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+\u2212]?\.\d+")


def after_thinking(text: str, fmt: str | TraceFormat = "think") -> str:
    """The part of a trace after its thinking (the summary), or the whole text when it has none."""
    fmt = get_format(fmt)
    closing = list(re.finditer(fmt.summary_start, text))
    return text[closing[-1].end():] if closing else text


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces nested inside are kept), or None."""
    found = None
    for match in BOXED.finditer(text):
        depth, position = 1, match.end()
        while position < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            position += 1
        if depth == 0:
            found = text[match.end():position - 1]
    return found


def thinking_closed(text: str, fmt: str | TraceFormat = "think", thinking_open: bool = False) -> bool:
    """Whether the thinking in ``text`` is over: its last thinking marker (or, with
    ``thinking_open``, the prompt's, before ``text``) is followed by a summary marker. A text with
    no thinking marker and ``thinking_open=False`` is a plain answer: True."""
    fmt = get_format(fmt)
    opened = [m.end() for m in re.finditer(fmt.thinking_start, text)]
    if not opened and not thinking_open:
        return True
    return any(m.start() >= (opened[-1] if opened else 0) for m in re.finditer(fmt.summary_start, text))


def extract_answer(text: str, fmt: str | TraceFormat = "think", thinking_open: bool = False) -> str | None:
    """The final answer of a generated trace, as written (None when there is nothing to take).

    The answer is read from the summary only: a text whose thinking never closes (the last thinking
    marker has no summary marker after it) has none. ``thinking_open=True`` says the prompt opened
    the thinking (a generated continuation after ``<think>``): then a text without the summary
    marker has no answer either. Texts without any marker otherwise count as a plain answer."""
    if not thinking_closed(text, fmt, thinking_open):
        return None
    part = SPECIAL_TOKEN.sub(" ", after_thinking(text, fmt))  # '<|im_end|>' and the like are not the answer
    boxed = last_boxed(part)
    if boxed is not None and boxed.strip():  # an empty \boxed{} (an echoed instruction) is no answer
        return boxed.strip()
    phrases = [m.group("rest") for m in PHRASES.finditer(part) if m.group("rest").strip()]
    if phrases:
        answer = phrases[-1].strip().strip("*").strip()
        boxed = last_boxed(answer)
        return (boxed if boxed is not None else re.sub(r"[.;,]+$", "", answer)).strip() or None
    numbers = NUMBER.findall(part)
    return numbers[-1].strip() if numbers else None


# ---------------------------------------------------------------- comparison

CURRENCY = "$€£¥₹"
LATEX_NOISE = re.compile(r"\\[,;:! ]|\\left|\\right|\\displaystyle|\$")
TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")


def normalize(answer: str) -> str:
    """Plain text of an answer: LaTeX spacing, ``\\text{}``, currency and unit words removed."""
    text = answer.strip().replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%")
    text = TEXT_COMMAND.sub(r"\1", text)
    text = LATEX_NOISE.sub("", text)
    text = FRAC.sub(r"(\1)/(\2)", text)
    text = re.sub(f"[{CURRENCY}]", "", text)
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text.strip())  # "x = 5"
    return text.strip().rstrip(".").strip()


def to_number(answer: str) -> Fraction | None:
    """The answer as an exact fraction, or None: '1,234' 1234, '-3.50' -7/2, '3/4', '\\frac{3}{4}',
    '$12', '12 dollars', '50%' (percent as a unit: 50), '+5' 5."""
    text = normalize(answer)
    text = re.sub(r"\s*(%|[a-zA-Z][a-zA-Z .]*)$", "", text)  # a trailing unit word or percent sign
    text = text.replace(" ", "")
    match = re.fullmatch(r"([-+]?)\(?([-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+)\)?(?:/\(?(\d+(?:\.\d+)?)\)?)?", text)
    if not match:
        return None
    sign, whole, denominator = match.groups()
    if "," in whole and not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", whole):
        return None  # commas that are not thousands separators: a list, not a number
    value = Fraction(whole.replace(",", ""))
    if denominator is not None:
        if Fraction(denominator) == 0:
            return None
        value /= Fraction(denominator)
    return -value if sign == "-" else value


def is_correct(predicted: str | None, gold: str | int | float) -> bool:
    """Whether ``predicted`` states ``gold``: as numbers when both parse (exactly), else through
    math-verify when it is installed, else as normalised text."""
    if predicted is None:
        return False
    gold_text = str(gold)
    got, expected = to_number(predicted), to_number(gold_text)
    if got is not None and expected is not None:
        return got == expected
    verdict = _math_verify(predicted, gold_text)
    if verdict is not None:
        return verdict
    squash = lambda text: re.sub(r"\s+", "", normalize(text)).lower()  # noqa: E731
    return squash(predicted) == squash(gold_text) != ""


def _math_verify(predicted: str, gold: str) -> bool | None:
    try:  # lazy: math_verify is optional (not a dependency); without it the plain comparisons decide
        from math_verify import parse, verify  # pyright: ignore[reportMissingImports]
    except ImportError:
        return None
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))
    except Exception:  # noqa: BLE001 - a parser failure is "no verdict", not an error
        return None


# ---------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k),
    computed as a product (no huge binomials)."""
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise StepsalError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss
