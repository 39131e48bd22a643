import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from tiny import THINK_TRACE

import stepsal
from stepsal import QUESTION, SUMMARY, THINKING, Trace, TraceFormatError
from stepsal.traces import keep_thinking_piece


def check_layout(trace: Trace) -> None:
    """Invariants every layout must satisfy, checked against the offsets independently."""
    layout = trace.layout
    steps = layout.token_step
    assert steps.shape == trace.tokens.shape == layout.token_segment.shape
    assert (steps >= 0).all(), "every token of a complete trace belongs to a step"
    assert torch.equal(steps, torch.sort(steps).values), "steps are contiguous and ordered"
    assert torch.equal(torch.unique(steps), torch.arange(layout.n_steps)), "no empty step"
    segments = layout.token_segment
    assert torch.equal(segments, torch.sort(segments).values), "segment order is Q -> T -> S"
    assert segments[0] == QUESTION
    previous_end = 0
    for step in layout.steps:
        first, last = step.token_span
        assert (steps[first:last] == step.index).all() and (steps == step.index).sum() == last - first
        assert (segments[first:last] == step.segment).all()
        spans = trace.offsets[first:last]
        # the tokens of this step cover exactly its characters, without gaps
        assert spans[0][0] == step.char_span[0] and max(e for _, e in spans) == step.char_span[1]
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start <= end
        assert step.text == trace.text[step.char_span[0]:step.char_span[1]]
        assert step.char_span[0] >= previous_end
        previous_end = step.char_span[1]


def test_think_trace_steps(tokenizer):
    trace = Trace.from_text(THINK_TRACE, tokenizer, fmt="think")
    check_layout(trace)
    kinds = [s.kind for s in trace.layout.steps]
    assert kinds == ["question"] + ["thinking"] * 4 + ["summary"] * 2
    texts = [" ".join(s.text.split()) for s in trace.layout.steps]
    assert texts[0].startswith("<|im_start|>user") and texts[0].endswith("<|im_start|>assistant")
    assert texts[1:5] == ["<think> First, we add the two numbers together.", "The sum of 2 and 2 is 4.",
                          "Then we multiply the sum by 3 to get 12.", "Let me check the product again."]
    assert texts[5] == "</think> The sum is 4 and the product is 12."
    assert texts[6] == "So the answer is 12.<|im_end|>"
    # exact alignment: decoding each step's tokens gives back its text
    for step in trace.layout.steps:
        assert tokenizer.decode(trace.tokens[slice(*step.token_span)]) == step.text


def test_harmony_format(tokenizer):
    text = ("<|start|>user<|message|>What is 3 times 4?<|end|><|start|>assistant<|channel|>analysis<|message|>"
            "We need to multiply three by four. Three times four equals twelve.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>The answer is twelve.<|return|>")
    trace = Trace.from_text(text, tokenizer, fmt="harmony")
    check_layout(trace)
    steps = trace.layout.steps
    assert [s.kind for s in steps] == ["question", "thinking", "thinking", "summary"]
    assert steps[1].text.startswith("<|start|>assistant<|channel|>analysis")
    assert steps[3].text.startswith("<|start|>assistant<|channel|>final")


def test_plain_format(tokenizer):
    text = ("Question: what is 2+2?\nReasoning: First, we add the two numbers together. "
            "The sum of two and two is four.\nAnswer: 4, because two and two make four.")
    trace = Trace.from_text(text, tokenizer, fmt="plain")
    check_layout(trace)
    assert [s.kind for s in trace.layout.steps] == ["question", "thinking", "thinking", "summary"]
    assert trace.layout.steps[3].text.startswith("Answer:")


def test_custom_format_strings_and_regex(tokenizer):
    text = "Q: why? [[BEGIN]] First long reasoning sentence. Second long reasoning sentence. [[END]] Final answer here."
    for fmt in (stepsal.custom_format("[[BEGIN]]", "[[END]]"),
                stepsal.custom_format(r"\[\[BEGIN\]\]", r"\[\[END\]\]", regex=True)):
        trace = Trace.from_text(text, tokenizer, fmt=fmt)
        check_layout(trace)
        assert [s.kind for s in trace.layout.steps] == ["question", "thinking", "thinking", "summary"]


def test_short_pieces_numbers_and_tables_join_the_following_step(tokenizer):
    text = ("Question? <think>Ok. 12. First real sentence is here. | a | b |. "
            "Second real sentence is here. 3.5 - 7. Third one is long enough.</think> Done and dusted, all good.")
    trace = Trace.from_text(text, tokenizer)
    check_layout(trace)
    thinking = [s.text for s in trace.layout.steps if s.segment == THINKING]
    # a step ends after each kept sentence; short pieces, numbers and table rows ride with the next one
    assert thinking == ["<think>Ok. 12. First real sentence is here.", " | a | b |. Second real sentence is here.",
                        " 3.5 - 7. Third one is long enough."]
    assert not keep_thinking_piece("| a | b |") and not keep_thinking_piece("12, 345.6")


def test_from_tokens_equals_from_text(tokenizer):
    from_text = Trace.from_text(THINK_TRACE, tokenizer)
    from_tokens = Trace.from_tokens(from_text.tokens, tokenizer)
    assert from_tokens.text == THINK_TRACE
    assert torch.equal(from_tokens.layout.token_step, from_text.layout.token_step)
    assert from_tokens.layout.steps == from_text.layout.steps


def test_from_tokens_with_non_canonical_ids(tokenizer):
    """Generated ids need not be the canonical tokenisation of their text: align them anyway."""
    canonical = tokenizer(THINK_TRACE, add_special_tokens=False).input_ids
    split = []
    for token in canonical:  # spell multi-character ordinary tokens byte by byte
        piece = tokenizer.convert_ids_to_tokens(token)
        if token >= 10 and len(piece) > 1 and all(p in tokenizer.get_vocab() for p in piece):
            split.extend(tokenizer.convert_tokens_to_ids(list(piece)))
        else:
            split.append(token)
    assert len(split) > len(canonical)
    trace = Trace.from_tokens(split, tokenizer)
    assert trace.text == THINK_TRACE and torch.equal(trace.tokens, torch.tensor(split))
    check_layout(trace)
    canonical_trace = Trace.from_text(THINK_TRACE, tokenizer)
    assert [s.text for s in trace.layout.steps] == [s.text for s in canonical_trace.layout.steps]


def test_dict_round_trip(tokenizer):
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    again = Trace.from_dict(trace.to_dict())
    assert torch.equal(again.layout.token_segment, trace.layout.token_segment)
    assert again.layout.steps == trace.layout.steps and again.offsets == trace.offsets


# ---------------------------------------------------------------- bad input


def test_missing_marker_names_the_fix(tokenizer):
    with pytest.raises(TraceFormatError, match="thinking marker .* not found.*custom_format"):
        Trace.from_text("Question: 2+2? Answer: 4.", tokenizer, fmt="think")


def test_missing_summary_marker(tokenizer):
    text = "Q? <think>First long reasoning sentence. Second long reasoning sentence."
    with pytest.raises(TraceFormatError, match="allow_missing_summary=True"):
        Trace.from_text(text, tokenizer)
    trace = Trace.from_text(text, tokenizer, allow_missing_summary=True)
    check_layout(trace)
    assert not trace.has_summary and SUMMARY not in trace.layout.token_segment


def test_empty_thinking(tokenizer):
    with pytest.raises(TraceFormatError, match="thinking segment .* is empty"):
        Trace.from_text("Q? <think>  \n </think> The answer.", tokenizer)


def test_fewer_than_two_steps(tokenizer):
    with pytest.raises(TraceFormatError, match="fewer than min_thinking_steps=2"):
        Trace.from_text("Q? <think>Only one long reasoning sentence.</think> The answer.", tokenizer)


def test_unknown_format_and_slow_tokenizer(tokenizer):
    with pytest.raises(TraceFormatError, match="unknown trace format"):
        Trace.from_text(THINK_TRACE, tokenizer, fmt="xml")
    with pytest.raises(stepsal.ModelMismatchError, match="expected a TransformerLens model"):
        Trace.from_text(THINK_TRACE, object())


# ---------------------------------------------------------------- properties

WORDS = st.sampled_from(["add", "the", "sum", "of", "two", "numbers", "then", "check", "it", "again",
                         "carefully", "12", "4.5", "café", "naïve", "x=3", "(a+b)", "so", "we", "get"])
SENTENCE = st.lists(WORDS, min_size=1, max_size=9).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=SENTENCE, sentences=st.lists(SENTENCE, min_size=1, max_size=8),
       paragraphs=st.lists(SENTENCE, min_size=1, max_size=3),
       separator=st.sampled_from([". ", ".\n", ".  \n\t"]))
def test_every_step_is_covered_by_exactly_its_tokens(tokenizer, question, sentences, paragraphs, separator):
    thinking = separator.join(sentences + ["and that is the long closing sentence"]) + "."
    text = f"Question: {question}?\n<think>\n{thinking}\n</think>\n" + "\n\n".join(paragraphs)
    trace = Trace.from_text(text, tokenizer, min_thinking_steps=1)
    check_layout(trace)
    # every kept sentence lies inside exactly one thinking step, one sentence per step
    thinking_steps = [s for s in trace.layout.steps if s.segment == THINKING]
    kept = [p for p in trace.kept_pieces if p[1] <= text.index("</think>")]
    assert len(thinking_steps) == len(kept)
    for step, (start, end) in zip(thinking_steps, kept, strict=True):
        assert step.char_span[0] <= start and end <= step.char_span[1]
    # the segments partition the text at the markers
    think_tokens = trace.layout.token_segment == THINKING
    first_thinking = int(think_tokens.nonzero()[0])
    assert trace.offsets[first_thinking][0] == text.index("<think>")


QUOTING = ("<|im_start|>user\nAnswer in this format:\n```\n<think>\nyour steps\n</think>\nthe answer\n```\n"
           "Never write `</think>` twice. What is 2+2 and then times 3?<|im_end|>\n<|im_start|>assistant\n")


def test_markers_quoted_in_code_are_not_the_models(tokenizer):
    import warnings

    text = QUOTING + THINK_TRACE.split("<|im_start|>assistant\n")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # markers inside code are not even candidates: no ambiguity warning
        trace = Trace.from_text(text, tokenizer)
    thinking_start = text.index("<think>\nFirst")
    assert trace.markers[0][0] == thinking_start and trace.markers[1][0] == text.index("</think>\nThe sum is 4")
    question = trace.layout.steps[0]
    assert question.kind == "question" and "Never write" in question.text
    assert [s.kind for s in trace.layout.steps].count("thinking") == 4


def test_a_marker_quoted_in_prose_warns_and_the_last_one_counts(tokenizer):
    text = THINK_TRACE.replace("What is 2+2", "What do <think> tags do? And what is 2+2")
    with pytest.warns(stepsal.StepsalWarning, match="2 thinking and 1 summary markers"):
        trace = Trace.from_text(text, tokenizer)
    assert trace.markers[0][0] == text.index("<think>\nFirst")


def test_the_tracker_ignores_markers_the_prompt_quotes(tokenizer):
    from test_stepflow import track

    prompt = QUOTING + "<think>\nFirst"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    segments, _, _ = track(tokenizer, stepsal.FORMATS["think"], ids, read_prompt=True)
    trace = Trace.from_text(prompt + ". The end is near now.\n</think>\nDone.", tokenizer, min_thinking_steps=1)
    real = trace.layout.token_segment.tolist()[:len(ids)]
    assert [segments[p] for p in range(len(ids))] == real
    assert real.index(stepsal.THINKING) >= len(ids) - 4  # only the prompt's last marker opens thinking


def test_a_custom_sentence_end_splits_what_the_default_does_not(tokenizer):
    text = THINK_TRACE.replace("together. The sum", "together; the sum").replace("is 4. Then", "is 4; then")
    default = Trace.from_text(text, tokenizer, min_thinking_steps=1)
    custom = Trace.from_text(text, tokenizer, sentence_end=r"[.;]\s+")
    assert len(custom.layout.steps_of(THINKING)) == len(default.layout.steps_of(THINKING)) + 2
