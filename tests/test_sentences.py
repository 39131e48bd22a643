"""One step rule: Trace segmentation and the generation tracker place the same step boundaries.

The tracker follows text token by token; traces split the whole text. Both call
:mod:`stepsal.sentences`, and these tests hold them equal on tables, lists, numbers, code, CJK and
other scripts' stops, with token boundaries anywhere.
"""

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import stepsal
from stepsal.sentences import SENTENCE_END, StepSplitter, keep_thinking_piece, step_starts
from stepsal.stepflow.tracker import PhaseTracker, RowTracker
from stepsal.traces import THINKING, Trace, align_tokens, segment_text


def expected_steps(text: str, pieces: list[str]) -> list[int]:
    """Thinking step per token (-1 elsewhere) as Trace places them."""
    offsets, position = [], 0
    for piece in pieces:
        offsets.append((position, position + len(piece)))
        position += len(piece)
    _, steps = align_tokens(text, offsets, segment_text(text, "think", allow_missing_summary=True))
    labels = [-1] * len(pieces)
    for index, step in enumerate(s for s in steps if s.segment == THINKING):
        labels[step.token_span[0]:step.token_span[1]] = [index] * step.n_tokens
    return labels


def tracked_steps(pieces: list[str]) -> tuple[list[int], list[int]]:
    """Thinking step per token (-1 elsewhere) and the positions where SMI would inject."""
    row, got, injects = RowTracker(stepsal.FORMATS["think"]), {}, []
    for piece in pieces:
        for label in row.push(piece):
            got[label.position] = label.step if label.segment == THINKING else -1
            if label.inject and label.segment == THINKING:
                injects.append(label.position)
    return [got[p] for p in range(len(pieces))], injects


def cut(text: str, sizes: list[int], whole: tuple[str, ...] = ("<think>", "</think>")) -> list[str]:
    """Pieces of the given sizes; the markers stay whole (reasoning models' tokenizers have them as
    one token each: see test_a_split_marker_undoes_the_step_its_first_characters_opened)."""
    pieces, position, sizes = [], 0, iter(sizes)
    while position < len(text):
        marker = next((m for m in whole if text.startswith(m, position)), None)
        size = len(marker) if marker else next(sizes, len(text))
        following = [text.find(m, position + 1) for m in whole]
        size = min([size] + [f - position for f in following if f > position and not marker])
        pieces.append(text[position:position + size])
        position += size
    return pieces


# traces of different kinds on which two copies of the rule once disagreed (a table row, a Markdown
# table, a Chinese trace ending in a stop), and more
DRIFT_TRACES = [
    "Q?\n<think>First sentence is long enough. | alpha | beta | gamma |. Second sentence is long enough.</think> "
    "Done and dusted here.",
    "Q?\n<think>We lay the values out in a table. \n| x | y |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n. Then we read "
    "off the second row. The sum is seven.</think>\nSeven.",
    "问题：多少？\n<think>\n首先我们把两个数相加得到四。然后我们把和乘以三得到十二。最后再检查一遍结果。</think>\n答案是十二。",
    "Q?\n<think>1. First we add the numbers up. 2. Then we multiply by three. 3. 12. Done with the check now."
    "</think>\nTwelve.",
    "Q?\n<think>Compute it in code first.\n```\nx = 1. y = 2. z = x + y\n```\nSo the value is three here. "
    "Then we are done.</think>\nThree.",
]


@pytest.mark.parametrize("text", DRIFT_TRACES)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_trace_and_tracker_agree_on_traces_that_once_drifted(text, size):
    pieces = cut(text, [size] * len(text))
    labels, injects = tracked_steps(pieces)
    assert labels == expected_steps(text, pieces)
    starts = [p for p in range(1, len(labels)) if labels[p] >= 1 and labels[p] != labels[p - 1]]
    assert injects == starts  # SMI acts exactly where the trace has a step start


def test_the_table_row_example_from_the_issue(tokenizer):
    """Two thinking steps in the trace, and two during generation (the tracker once found three)."""
    text = DRIFT_TRACES[0]
    trace = Trace.from_text(text, tokenizer, min_thinking_steps=1)
    thinking = [s for s in trace.layout.steps if s.segment == THINKING]
    # the table row is no step of its own: it opens the second step, which "Second sentence" continues
    assert len(thinking) == 2 and thinking[1].text.lstrip().startswith("| alpha")
    tracker = PhaseTracker(tokenizer, stepsal.FORMATS["think"], 1)
    steps, injects = {}, []
    for token in trace.tokens.tolist():
        for label in tracker.push([token])[0]:
            steps[label.position] = label.step if label.segment == THINKING else -1
            if label.inject and label.segment == THINKING:
                injects.append(label.position)
    assert max(steps.values()) == 1
    assert injects == [thinking[1].token_span[0]]


FRAGMENTS = st.sampled_from([
    "we add", "the sum", " of two numbers", "then check", "12", "4.5", "-", "---", "|", " | ", "| a | b |",
    "|---|", "1.", "2)", "- item", "\n", "\n\n", " ", ". ", ".\n", ".", "。", "！", "？", "。。", "？！", "। ",
    "我们先相加", "然后乘以三", "\n```\nx = 1. y = 2. Then z.\n```\n", "x = 1. y", "`code`", ", ", "so", "42.",
    " 7 ", "\t",
])


@settings(max_examples=300, deadline=None)
@given(body=st.lists(FRAGMENTS, min_size=1, max_size=30).map("".join),
       sizes=st.lists(st.integers(1, 6), min_size=120, max_size=120), summary=st.booleans())
def test_tracker_equals_trace_on_any_text_and_any_token_boundaries(body, sizes, summary):
    """Tables, lists, numbers, code fences, newlines, CJK and Devanagari stops; tokens of 1-6
    characters (a stop may share its token with the next sentence)."""
    text = "Question: why?\n<think>\n" + body + ("\n</think>\nThe answer is here." if summary else "")
    if not body.strip():
        return
    pieces = cut(text, sizes)
    labels, injects = tracked_steps(pieces)
    assert labels == expected_steps(text, pieces)
    starts = [p for p in range(1, len(labels)) if labels[p] >= 1 and labels[p] != labels[p - 1]]
    assert injects == starts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(FRAGMENTS.filter(lambda f: f.isascii()), min_size=1, max_size=20).map("".join))
def test_tracker_equals_trace_with_a_real_tokenizer(tokenizer, body):
    if not body.strip():
        return
    text = "Question: why?\n<think>\n" + body + "\n</think>\nThe answer is here."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    trace = Trace.from_tokens(ids, tokenizer, min_thinking_steps=0)
    tracker = PhaseTracker(tokenizer, stepsal.FORMATS["think"], 1)
    steps = {}
    for token in ids:
        for label in tracker.push([token])[0]:
            steps[label.position] = label.step if label.segment == THINKING else -1
    expected = [-1] * len(ids)
    for index, step in enumerate(s for s in trace.layout.steps if s.segment == THINKING):
        expected[step.token_span[0]:step.token_span[1]] = [index] * step.n_tokens
    assert [steps[p] for p in range(len(ids))] == expected


def naive_step_starts(text: str, delimiter: re.Pattern[str]) -> list[int]:
    """The rule written out directly: a kept piece followed by non-whitespace text ends a step."""
    pieces, position = [], 0
    for match in delimiter.finditer(text):
        pieces.append((position, match.start(), match.end()))
        position = match.end()
    return [end for start, stop, end in pieces if keep_thinking_piece(text[start:stop]) and text[end:].strip()]


@settings(max_examples=300, deadline=None)
@given(text=st.lists(FRAGMENTS, max_size=40).map("".join), sizes=st.lists(st.integers(1, 9), min_size=200,
                                                                            max_size=200))
def test_splitter_in_chunks_equals_the_rule_written_out(text, sizes):
    whole, _ = step_starts(text, 0, len(text), SENTENCE_END, keep_thinking_piece)
    assert whole == naive_step_starts(text, SENTENCE_END)
    splitter = StepSplitter(offset=5)
    chunked = [start for piece in cut(text, sizes) for start in splitter.feed(piece)] + splitter.close()
    assert chunked == [start + 5 for start in whole]


def test_splitter_custom_delimiters_confirm_starts_only_before_text():
    """A kept piece opens a step only if non-whitespace text follows it (delimiters included)."""
    line = re.compile(r"\n")
    text = "a long enough first line\n\n\n"
    assert step_starts(text, 0, len(text), line, keep_thinking_piece)[0] == []
    text = "a long enough first line\n\n\nx"
    assert step_starts(text, 0, len(text), line, keep_thinking_piece)[0] == [25]
    splitter = StepSplitter(line)
    assert [s for ch in text for s in splitter.feed(ch)] == [25]


def test_a_split_marker_undoes_the_step_its_first_characters_opened():
    """'...结果。</' opens a step at '<' (text follows a kept sentence); when '</think>' completes,
    the tracker relabels those tokens into the last step. Labels then equal the trace's; the step
    start was acted on when its token was processed (only with a marker split over tokens)."""
    text = DRIFT_TRACES[2]
    pieces = cut(text, [1] * len(text), whole=())
    labels, injects = tracked_steps(pieces)
    assert labels == expected_steps(text, pieces)
    starts = [p for p in range(1, len(labels)) if labels[p] >= 1 and labels[p] != labels[p - 1]]
    assert injects == starts + [text.index("</think>")]


def test_splitter_finds_a_blank_line_whose_whitespace_run_outgrows_the_lookback():
    """A delimiter that starts before a long run of whitespace (a paragraph break with 70 spaces on
    the empty line) is found fed one character at a time, as in one piece."""
    from stepsal.sentences import BLANK_LINE, keep_summary_piece

    text = "Paragraph one is long.\n" + " " * 70 + "\nParagraph two is long."
    whole, _ = step_starts(text, 0, len(text), BLANK_LINE, keep_summary_piece)
    splitter = StepSplitter(BLANK_LINE, keep_summary_piece)
    assert whole == [text.index("Paragraph two")]
    assert [start for char in text for start in splitter.feed(char)] + splitter.close() == whole
