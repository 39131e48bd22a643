"""Bad inputs that used to give silent wrong results, one row each: what triggers it and what the user
now gets (an error class and message, a warning, or a value). Add a row, not a file."""

import dataclasses
import json
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import BACKENDS
from tiny import THINK_TRACE

import stepsal
import stepsal.studies.evaluate
from stepsal.errors import OptionError, StepsalError
from stepsal.stepflow.config import StepFlow
from stepsal.tasks.answers import extract_answer, is_correct
from stepsal.tasks.problems import WordProblem, load_problems


class Context:
    """What a row's trigger may use; the models load only for rows that ask for them."""

    def __init__(self, request: pytest.FixtureRequest, folder: Path):
        self.request, self.folder = request, folder

    @property
    def tokenizer(self) -> Any:
        return self.request.getfixturevalue("tokenizer")

    @property
    def model(self) -> Any:
        return self.request.getfixturevalue("tl_models")[("llama", BACKENDS[0])]

    @property
    def trace(self) -> stepsal.Trace:
        return stepsal.Trace.from_text(THINK_TRACE, self.tokenizer)


@dataclass(frozen=True)
class Raises:
    error: type[BaseException]
    match: str


@dataclass(frozen=True)
class Warns:
    warning: type[Warning]
    match: str


@dataclass(frozen=True)
class Value:
    expected: Any


@dataclass(frozen=True)
class Case:
    id: str
    trigger: Callable[[Context], Any]
    expect: Raises | Warns | Value


# ---------------------------------------------------------------- helpers the rows use

def problems_file(ctx: Context, problem_id: Any) -> Path:
    path = ctx.folder / "problems.jsonl"
    rows = [{"id": "ok-1", "question": "What is 1 plus 1?", "answer": 2},
            {"id": problem_id, "question": "What is 2 plus 2?", "answer": 4}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluated_row(ctx: Context, generated: str) -> tuple[Any, Any, Any]:
    """(answer, correct, closed_think) of the row evaluate writes for one generated continuation of a
    prompt that opened the thinking (as R1-style chat templates do)."""
    prompt = ctx.tokenizer("<|im_start|>assistant\n<think>\n")["input_ids"]
    tokens = torch.tensor(prompt + ctx.tokenizer(generated)["input_ids"])
    fake = SimpleNamespace(texts=[generated], tokens=[tokens], prompt_lengths=[len(prompt)], stats=None)
    problem = WordProblem("p1", "What is 6 plus 7?", 13)
    with mock.patch.object(stepsal.studies.evaluate, "generate", lambda *args, **kwargs: fake):
        stepsal.studies.evaluate.evaluate(ctx.model, [problem], out=ctx.folder / "eval", k=0, greedy=True,
                                          progress=False)
    row = json.loads((ctx.folder / "eval" / "samples.jsonl").read_text().splitlines()[0])
    return row["answer"], row["correct"], row["closed_think"]


def validated_flow(**settings: Any) -> StepFlow:
    """StepFlow's own checks on ``settings``, past the test suite's runtime type checker (which would
    refuse a text alpha before them; users without it get these checks)."""
    flow = object.__new__(StepFlow)
    for field in dataclasses.fields(StepFlow):
        object.__setattr__(flow, field.name, settings.get(field.name, field.default))
    flow.__post_init__()
    return flow


def thinking_steps(ctx: Context, gap: str) -> int:
    text = THINK_TRACE.replace("together. The sum", f"together.{gap}The sum")
    trace = stepsal.Trace.from_text(text, ctx.tokenizer)
    return len(trace.layout.steps_of(stepsal.traces.THINKING))


CUT_OFF = "<think>\nFirst, 6 and 7 make 13, so 13 * "

CASES = [
    # item 2: an answer comes from the summary only; unfinished thinking has none
    Case("unclosed-thinking-last-number", lambda ctx: extract_answer(CUT_OFF), Value(None)),
    Case("unclosed-thinking-not-correct", lambda ctx: is_correct(extract_answer(CUT_OFF), 13), Value(False)),
    Case("continuation-without-summary",
         lambda ctx: extract_answer("First, 6 and 7 make 13, so 13 * ", thinking_open=True), Value(None)),
    Case("continuation-with-summary",
         lambda ctx: extract_answer("6 and 7 make 13.\n</think>\nThe answer is \\boxed{13}.", thinking_open=True),
         Value("13")),
    Case("evaluate-row-unfinished", lambda ctx: evaluated_row(ctx, "First, 6 and 7 make 13, so 13 * "),
         Value((None, False, False))),
    Case("evaluate-row-finished", lambda ctx: evaluated_row(ctx, "6 and 7 make 13.\n</think>\nSo \\boxed{13}."),
         Value(("13", True, True))),
    # item 4: problem ids become file names
    *[Case(f"problem-id-{name}", lambda ctx, bad=bad: load_problems(problems_file(ctx, bad)),
           Raises(StepsalError, rf"problems\.jsonl:2: problem id .* is not usable in file names \({why}\); use ids"))
      for name, bad, why in [("parent-path", "../../../x", "it contains a path separator"),
                             ("absolute", "/tmp/x", "it contains a path separator"),
                             ("backslash", "a\\b", "it contains a path separator"),
                             ("dot-dot", "..", "it contains '..'"),
                             ("nul", "a\0b", "it contains a NUL character"),
                             ("drive", "C:x", "it is an absolute path"),
                             ("empty", "", "it is empty")]],
    Case("problem-id-built-directly", lambda ctx: WordProblem("../x", "What is 1 plus 1?", 2),
         Raises(StepsalError, r"WordProblem: problem id '\.\./x' is not usable in file names")),
    Case("problem-id-fine", lambda ctx: [p.id for p in load_problems(problems_file(ctx, "gsm-7.b_2"))],
         Value(["ok-1", "gsm-7.b_2"])),
    # item 5a: signed maps are no distributions
    Case("metrics-on-signed-maps", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, rule="ag_signed").metrics(),
         Raises(OptionError, r"metrics\(\).*rule='ag_signed'.*Compute the measures on rule='ag'")),
    Case("reference-measures-on-signed-maps",
         lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, rule="ag_signed").reference_measures(),
         Raises(OptionError, r"reference_measures\(\).*rule='ag_signed'")),
    # item 5b: target='answer' searches the summary only
    Case("answer-only-in-question",
         lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, target="answer", answer="What is 2+2"),
         Raises(StepsalError, r"does not occur in the trace's summary \(only before it")),
    Case("answer-only-in-thinking",
         lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, target="answer", answer="Let me check"),
         Raises(StepsalError, r"does not occur in the trace's summary \(only before it")),
    # item 5c: a token id is no Python index; refused before the forward pass
    Case("negative-token-id", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, target=-1),
         Raises(OptionError, r"target=-1 is no token id of this model \(ids are 0\.\.\d+; a negative")),
    Case("token-id-past-vocabulary",
         lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, target=ctx.model.cfg.d_vocab),
         Raises(OptionError, r"target=\d+ is no token id of this model")),
    # item 5d: StepFlow numbers
    Case("stepflow-alpha-nan", lambda ctx: StepFlow(alpha=math.nan),
         Raises(StepsalError, r"alpha must be a finite number; got nan\. The paper uses 0\.06")),
    Case("stepflow-alpha-inf", lambda ctx: StepFlow(alpha=math.inf), Raises(StepsalError, r"alpha must be a finite")),
    Case("stepflow-tau-max-nan", lambda ctx: StepFlow(tau_max=math.nan),
         Raises(StepsalError, r"tau_max must be a finite number; got nan\. The paper uses 0\.15")),
    Case("stepflow-alpha-text", lambda ctx: validated_flow(alpha="0.1"),
         Raises(StepsalError, r"alpha must be a finite number; got '0\.1'")),
    # item 5e: a negative limit
    Case("load-problems-negative-limit", lambda ctx: load_problems(limit=-1),
         Raises(StepsalError, r"limit must be a whole number >= 0 \(or None for all problems\); got -1")),
    # item 5f: a zero-width space after a full stop ends the sentence, like a space
    Case("zero-width-space-after-stop", lambda ctx: thinking_steps(ctx, "\u200b") == thinking_steps(ctx, " "),
         Value(True)),
    Case("zero-width-joiner-after-stop", lambda ctx: thinking_steps(ctx, "\u200d") == thinking_steps(ctx, " "),
         Value(True)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, request: pytest.FixtureRequest):
    with tempfile.TemporaryDirectory() as folder:
        ctx = Context(request, Path(folder))
        expect = case.expect
        if isinstance(expect, Raises):
            with pytest.raises(expect.error, match=expect.match):
                case.trigger(ctx)
        elif isinstance(expect, Warns):
            with pytest.warns(expect.warning, match=expect.match):
                case.trigger(ctx)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # marker-count notes and the like are not what a row checks
                assert case.trigger(ctx) == expect.expected
