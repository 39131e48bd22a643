"""Answer extraction, answer checking and pass@k (against a brute-force count)."""

import itertools
import math

import pytest
from hypothesis import given, strategies as st

from stepsal.tasks import extract_answer, is_correct, pass_at_k

R1 = "<|im_start|>assistant\n<think>\nMaybe it is \\boxed{5}. Let me check again.\n</think>\n"


@pytest.mark.parametrize("text, expected", [
    (R1 + "The change is 8 dollars, so the answer is \\boxed{8}.", "8"),
    (R1 + "First \\boxed{7}, then corrected: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),   # the last, nested braces
    (R1 + "\\boxed{\\text{\\{1, 2\\}}}", "\\text{\\{1, 2\\}}"),
    (R1 + "So the final answer is 42.", "42"),                                # no box: the phrase
    (R1 + "Answer: **-3.5**", "-3.5"),
    (R1 + "We get 12 apples and then 20 in total", "20"),                     # else the last number
    (R1 + "No number here at all.", None),
    ("<think>\nThe answer is 4 and \\boxed{4}\n</think>\nIt is 1,234 in all.", "1,234"),  # thinking ignored
    ("no markers: the answer is 9", "9"),                                    # no thinking: the whole text
    ("So the answer is 90.<|im_end|>", "90"),                                # end-of-turn token: not the answer
    (R1 + "The answer is \\boxed{12}.<|im_end|>", "12"),
    ("Put your answer in \\boxed{}. I think it is 7 apples.", "7"),          # an echoed empty box: no answer
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("predicted, gold, expected", [
    ("1,234", 1234, True), ("1234.0", "1,234", True), ("-3.50", "-7/2", True), ("\\frac{3}{4}", "0.75", True),
    ("-\\frac{3}{4}", "-0.75", True), ("\\dfrac{6}{8}", "3/4", True), ("$12", 12, True), ("\\$1,000.00", 1000, True),
    ("12 dollars", "12", True), ("50%", 50, True), ("+5", 5, True), ("x = 5", "5", True), ("\u22127", -7, True),
    ("\\text{12 apples}", 12, True), ("8", 9, False), ("0.333", "1/3", False), ("1,2,3", 123, False),
    ("12", -12, False), (None, 3, False), ("", 3, False), ("Paris", "paris", True), ("Lyon", "Paris", False),
])
def test_is_correct(predicted, gold, expected):
    assert is_correct(predicted, gold) is expected


def brute_force_pass_at_k(n, c, k):
    """Share of all k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_count_over_all_subsets(case):
    n, c, k = case
    assert math.isclose(pass_at_k(n, c, k), brute_force_pass_at_k(n, c, k), abs_tol=1e-12)


def test_pass_at_k_known_values_and_bad_input():
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)  # pass@1 is the mean over samples
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    for bad in ((0, 0, 1), (4, 5, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*bad)
