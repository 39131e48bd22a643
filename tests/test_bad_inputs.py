"""Bad inputs that used to give silent wrong results, one row each: what triggers it and what the user
now gets (an error class and message, a warning, or a value). Add a row, not a file."""

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import math
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import BACKENDS
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import THINK_TRACE, fake_generation, save_folder

import stepsal
import stepsal.generation
import stepsal.saliency
import stepsal.studies.evaluate
from stepsal.cli import main as cli_main
from stepsal.errors import DamagedFileError, OptionError, OutputBusyError, StepsalError, StepsalWarning
from stepsal.options import whole_number
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
class Matches:
    """The trigger's value, as text, matches this regular expression."""

    pattern: str


@dataclass(frozen=True)
class Case:
    id: str
    trigger: Callable[[Context], Any]
    expect: Raises | Warns | Value | Matches


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


ANSWERED = "6 and 7 make 13.\n</think>\nSo \\boxed{13}."


def evaluate_fake(ctx: Context, k: int = 3, during: Callable[[], Any] | None = None) -> stepsal.EvalResult:
    """evaluate into ctx.folder/eval: one problem, ``k`` samples of ANSWERED (``during``: called inside
    the first generate call)."""
    def fake(*args: Any, **kwargs: Any) -> SimpleNamespace:
        if during is not None:
            during()
        return fake_generation(ctx.tokenizer, [ANSWERED] * k)
    problem = WordProblem("p1", "What is 6 plus 7?", 13)
    with mock.patch.object(stepsal.studies.evaluate, "generate", fake):
        return stepsal.studies.evaluate.evaluate(ctx.model, [problem], out=ctx.folder / "eval", k=k, greedy=False,
                                                 progress=False)


def damaged_samples(ctx: Context, damage: Callable[[list[bytes]], list[bytes]]) -> Path:
    """ctx.folder/eval after a 3-sample evaluate, its samples.jsonl's lines changed by ``damage``."""
    evaluate_fake(ctx)
    path = ctx.folder / "eval" / "samples.jsonl"
    path.write_bytes(b"".join(damage(path.read_bytes().splitlines(keepends=True))))
    return ctx.folder / "eval"


MIDDLE_DAMAGED = lambda lines: [lines[0], b'{"problem": "p1", "cond\n', lines[2]]  # noqa: E731
LAST_CUT = lambda lines: [*lines[:2], lines[2][:40]]  # noqa: E731


STUDIED = ("First, 6 and 7 make 13 when added together. Let me check the sum again to be sure.\n</think>\n"
           "So the answer is \\boxed{13}.")


def study_fake(ctx: Context) -> stepsal.StudyResult:
    """run_study into ctx.folder/study: one problem, its greedy answer STUDIED."""
    problem = WordProblem("p1", "What is 6 plus 7?", 13)
    answer = lambda *args, **kwargs: fake_generation(ctx.tokenizer, [STUDIED])  # noqa: E731
    with mock.patch.object(stepsal.studies.evaluate, "generate", answer):
        return stepsal.run_study(ctx.model, [problem], out=ctx.folder / "study", progress=False)


def study_rerun_after_damage(ctx: Context) -> stepsal.StudyResult:
    study_fake(ctx)
    (saved,) = (ctx.folder / "study").glob("*/p1.greedy.0.safetensors")
    cut_file(saved)
    return study_fake(ctx)


def cli_result(ctx: Context, *argv: str) -> tuple[int, str]:
    """(exit code, stderr's stepsal lines) of ``stepsal *argv``."""
    capsys = ctx.request.getfixturevalue("capsys")
    capsys.readouterr()
    code = cli_main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(line for line in err.splitlines() if line.startswith(("stepsal", "warning")))


def rerun_after_damage(ctx: Context, damage: Callable[[list[bytes]], list[bytes]]) -> tuple[int, str]:
    """(rows loadable without any warning, what ``samples.jsonl.damaged`` holds) after a rerun."""
    folder = damaged_samples(ctx, damage)
    evaluate_fake(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = len(stepsal.load_samples(folder).frame)
    aside = folder / "samples.jsonl.damaged"
    return rows, aside.read_text() if aside.exists() else ""


def held_by_another_process(path: Path, then: Callable[[], Any]) -> Any:
    """``then()`` while a second Python process holds the writer lock on ``path``."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; d = os.open(sys.argv[1], os.O_RDONLY | (0 if os.path.isdir(sys.argv[1]) "
        "else os.O_CREAT)); fcntl.flock(d, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        return then()
    finally:
        holder.kill()
        holder.wait()


def saved_saliency(ctx: Context, meta: Callable[[dict], Any] = lambda meta: None,
                   tensors: Callable[[dict], Any] = lambda tensors: None, name: str = "r.safetensors") -> Path:
    """A saved StepSaliency result (token level) whose metadata and tensors ``meta`` / ``tensors`` change."""
    path = ctx.folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    stepsal.step_saliency(ctx.model, ctx.trace, token_level=True).save(path)
    with safe_open(str(path), framework="pt") as handle:
        data = json.loads(handle.metadata()["stepsal"])
    saved = load_file(str(path))
    meta(data)
    tensors(saved)
    save_file(saved, str(path), metadata={"stepsal": json.dumps(data)})
    return path


def cut_file(path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
    return path


def nan_sum(tensors: dict) -> None:
    tensors["sums"][0, 0, 0] = math.nan


def trace_data(ctx: Context, change: Callable[[dict], Any]) -> dict:
    data = ctx.trace.to_dict()
    change(data)
    return data


def report_with_damaged_file(ctx: Context) -> str:
    saved_saliency(ctx, name="a/0.safetensors")
    cut_file(saved_saliency(ctx, name="a/1.safetensors"))
    return stepsal.report_from_folder(ctx.folder).read_text()


def cached_model_with_cut_weights(ctx: Context) -> Path:
    folder = ctx.folder / "cache" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(100)}, str(folder / "model.safetensors"))
    cut_file(folder / "model.safetensors")
    with mock.patch.dict("os.environ", {"STEPSAL_CACHE": str(ctx.folder / "cache")}):
        return stepsal.embedded_folder("smollm2-135m")


def unchecked(function: Callable) -> Callable:
    """``function`` past the test suite's runtime type checker, which would refuse a wrong type before
    stepsal's own check (users without it get that check)."""
    return inspect.unwrap(function)


def load_tiny(ctx: Context, **kwargs: Any) -> Any:
    return stepsal.load_model(ctx.request.getfixturevalue("hf_models")["llama"], ctx.tokenizer, **kwargs)


def without_cuda(then: Callable[[], Any]) -> Any:
    with mock.patch("torch.cuda.is_available", lambda: False):
        return then()


def one_token_trace(ctx: Context) -> stepsal.Trace:
    return stepsal.Trace("a", torch.tensor([5]), [(0, 1)], stepsal.StepLayout.from_token_step([0], [1]))


def trace_file(ctx: Context) -> str:
    path = ctx.folder / "trace.txt"
    path.write_text(THINK_TRACE)
    return str(path)


def tiny_folder(ctx: Context) -> Path:
    folder = ctx.folder / "tiny-llama"
    save_folder(folder, ctx.request.getfixturevalue("hf_models")["llama"], ctx.tokenizer)
    return folder


def out_left_behind(ctx: Context, *argv: str) -> tuple[int, bool]:
    """(exit code, whether --out exists) of ``stepsal *argv --out <fresh folder>``."""
    out = ctx.folder / "never"
    code, _ = cli_result(ctx, *argv, "--out", str(out))
    return code, out.exists()


def problem_rows(ctx: Context, *rows: dict) -> Path:
    path = ctx.folder / "p.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def two_results(ctx: Context, layers_b: list[int]) -> Any:
    a = stepsal.step_saliency(ctx.model, ctx.trace)
    b = stepsal.step_saliency(ctx.model, ctx.trace, layers=layers_b)
    return stepsal.compare_groups([a, a], [b, b])


def validated(cls: type, **settings: Any) -> Any:
    """A dataclass's own checks (``__post_init__``) on ``settings``, past the test suite's runtime type
    checker (which would refuse a text alpha before them; users without it get these checks)."""
    made = object.__new__(cls)
    for field in dataclasses.fields(cls):
        object.__setattr__(made, field.name, settings.get(field.name, field.default))
    made.__post_init__()
    return made


def thinking_steps(ctx: Context, gap: str) -> int:
    text = THINK_TRACE.replace("together. The sum", f"together.{gap}The sum")
    trace = stepsal.Trace.from_text(text, ctx.tokenizer)
    return len(trace.layout.steps_of(stepsal.traces.THINKING))


KNOCKOUT = importlib.import_module("stepsal.studies.knockout")  # the package's `knockout` is the function
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
    Case("evaluate-row-records-stepsal-version", lambda ctx: evaluate_fake(ctx).frame["stepsal_version"].tolist(),
         Value([importlib.metadata.version("stepsal")] * 3)),
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
    Case("stepflow-alpha-text", lambda ctx: validated(StepFlow, alpha="0.1"),
         Raises(StepsalError, r"alpha must be a finite number; got '0\.1'")),
    # item 5e: a negative limit
    Case("load-problems-negative-limit", lambda ctx: load_problems(limit=-1),
         Raises(StepsalError, r"limit must be a whole number >= 0 \(or None for all problems\); got -1")),
    # item 5f: a zero-width space after a full stop ends the sentence, like a space
    Case("zero-width-space-after-stop", lambda ctx: thinking_steps(ctx, "\u200b") == thinking_steps(ctx, " "),
         Value(True)),
    # item 3: lines of a samples file that are no sample row are named, not dropped silently
    Case("samples-damaged-middle-line-warns", lambda ctx: stepsal.load_samples(damaged_samples(ctx, MIDDLE_DAMAGED)),
         Warns(StepsalWarning, r"samples\.jsonl: 1 line \(2\) is no sample row, so those samples are missing\. "
                               r"Rerun the stepsal eval that wrote the file")),
    Case("samples-damaged-middle-line-left-out",
         lambda ctx: len(stepsal.load_samples(damaged_samples(ctx, MIDDLE_DAMAGED)).frame), Value(2)),
    Case("samples-damaged-raise", lambda ctx: stepsal.load_samples(damaged_samples(ctx, MIDDLE_DAMAGED),
                                                                   bad_rows="raise"),
         Raises(DamagedFileError, r"samples\.jsonl: 1 line \(2\) is no sample row.*--skip-bad-rows")),
    Case("samples-not-utf8", lambda ctx: stepsal.load_samples(damaged_samples(ctx, lambda lines: [
        lines[0], b"\xff\xfe\n", lines[2]]), bad_rows="raise"), Raises(DamagedFileError, r"1 line \(2\) is no")),
    Case("samples-row-without-keys", lambda ctx: stepsal.load_samples(damaged_samples(ctx, lambda lines: [
        lines[0], b'{"problem": "p1"}\n', b"[1, 2]\n"]), bad_rows="raise"),
         Raises(DamagedFileError, r"2 lines \(2, 3\) are no")),
    Case("saved-eval-result-damaged",
         lambda ctx: stepsal.EvalResult.load(damaged_samples(ctx, MIDDLE_DAMAGED) / "samples.jsonl"),
         Raises(DamagedFileError, r"samples\.jsonl: 1 line \(2\) is no sample row")),
    Case("merge-damaged-line-refused",
         lambda ctx: cli_result(ctx, "eval", "--merge", "--out", str(damaged_samples(ctx, MIDDLE_DAMAGED))),
         Matches(r"^\(1, .stepsal eval: error: .*samples\.jsonl: 1 line \(2\) is no sample row.*--skip-bad-rows")),
    Case("merge-skip-bad-rows", lambda ctx: cli_result(
        ctx, "eval", "--merge", "--skip-bad-rows", "--out", str(damaged_samples(ctx, MIDDLE_DAMAGED))),
         Matches(r"^\(0, .*1 line \(2\) is no sample row")),
    Case("rerun-sets-damaged-line-aside", lambda ctx: rerun_after_damage(ctx, MIDDLE_DAMAGED),
         Value((3, '{"problem": "p1", "cond\n'))),
    Case("rerun-warns-of-damaged-line",
         lambda ctx: evaluate_fake(ctx) if damaged_samples(ctx, MIDDLE_DAMAGED) else None,
         Warns(StepsalWarning, r"samples\.jsonl: moved 1 damaged line \(2\) to .*samples\.jsonl\.damaged; their "
                               r"samples are redone")),
    Case("rerun-drops-cut-last-line", lambda ctx: rerun_after_damage(ctx, LAST_CUT), Value((3, ""))),
    # item 7: two writers into one output
    Case("evaluate-two-writers-one-process", lambda ctx: evaluate_fake(ctx, during=lambda: evaluate_fake(ctx)),
         Raises(OutputBusyError, r"another process is writing .*eval/samples\.jsonl: wait for it to finish, or write "
                                 r"elsewhere \(another --out\), or split the problems between processes with --shard")),
    Case("evaluate-two-processes", lambda ctx: held_by_another_process(
        (ctx.folder / "eval").mkdir() or ctx.folder / "eval" / "samples.jsonl", lambda: evaluate_fake(ctx)),
         Raises(OutputBusyError, r"another process is writing .*eval/samples\.jsonl")),
    Case("evaluate-other-shards-may-write", lambda ctx: len(held_by_another_process(
        (ctx.folder / "eval").mkdir() or ctx.folder / "eval" / "samples.1-of-2.jsonl",
        lambda: evaluate_fake(ctx)).frame),
         Value(3)),
    Case("study-two-processes", lambda ctx: held_by_another_process(ctx.folder, lambda: stepsal.run_study(
        ctx.model, [WordProblem("p1", "What is 6 plus 7?", 13)], out=ctx.folder, progress=False)),
         Raises(OutputBusyError, r"another process is writing .*: wait for it to finish, or write elsewhere "
                                 r"\(another --out\)\.")),
    # item 6: loads are checked and name the file
    Case("saliency-load-fewer-layers", lambda ctx: stepsal.StepSaliency.load(saved_saliency(
        ctx, meta=lambda meta: meta["layers"].pop())),
         Raises(DamagedFileError, r"r\.safetensors is no readable saved StepSaliency \(sums has shape \[2, 7, 7\]; "
                                  r"1 layer and a layout of 7 steps and \d+ tokens need \[1, 7, 7\]\)")),
    Case("saliency-load-nan-sums", lambda ctx: stepsal.StepSaliency.load(saved_saliency(ctx, tensors=nan_sum)),
         Raises(DamagedFileError, r"r\.safetensors is no readable saved StepSaliency \(sums holds NaN or inf\): it "
                                  r"is damaged, or was not written by StepSaliency\.save")),
    Case("saliency-load-wrong-shape", lambda ctx: stepsal.StepSaliency.load(saved_saliency(
        ctx, tensors=lambda tensors: tensors.update(sums=tensors["sums"][..., :-1].contiguous()))),
         Raises(DamagedFileError, r"sums has shape \[2, 7, 6\]")),
    Case("saliency-load-layout-shorter-than-tokens", lambda ctx: stepsal.StepSaliency.load(saved_saliency(
        ctx, meta=lambda meta: meta["layout"]["token_step"].pop())),
         Raises(DamagedFileError, r"\(step 6's token_span \(\d+, \d+\) does not match token_step \(\d+ tokens\)")),
    Case("saliency-load-negative-sums", lambda ctx: stepsal.StepSaliency.load(saved_saliency(
        ctx, tensors=lambda tensors: tensors["sums"].neg_())),
         Raises(DamagedFileError, r"sums holds negative sums, which rule 'ag' never gives")),
    Case("saliency-load-missing-key", lambda ctx: stepsal.StepSaliency.load(saved_saliency(
        ctx, meta=lambda meta: meta.pop("norm"))), Raises(DamagedFileError, r"\(missing key 'norm'\)")),
    Case("saliency-load-cut-file", lambda ctx: stepsal.StepSaliency.load(cut_file(saved_saliency(ctx))),
         Raises(DamagedFileError, r"r\.safetensors is no readable saved StepSaliency \(Error while deserializing")),
    Case("saliency-load-other-safetensors", lambda ctx: stepsal.StepSaliency.load(
        save_file({"w": torch.zeros(2)}, str(ctx.folder / "w.safetensors")) or ctx.folder / "w.safetensors"),
         Raises(DamagedFileError, r"w\.safetensors is no readable saved StepSaliency \(missing key 'stepsal'\)")),
    Case("saliency-load-missing-file", lambda ctx: stepsal.StepSaliency.load(ctx.folder / "none.safetensors"),
         Raises(FileNotFoundError, r"none\.safetensors")),
    Case("trace-from-dict-fewer-tokens", lambda ctx: stepsal.Trace.from_dict(trace_data(
        ctx, lambda data: data["tokens"].pop())),
         Raises(stepsal.TraceFormatError, r"the trace has \d+ tokens, \d+ offsets and a layout of \d+ tokens; they "
                                          r"must agree")),
    Case("trace-from-dict-offsets-outside-text", lambda ctx: stepsal.Trace.from_dict(trace_data(
        ctx, lambda data: data.update(text=data["text"][:10]))),
         Raises(stepsal.TraceFormatError, r"offsets reach outside its text of 10 characters")),
    Case("trace-from-dict-unknown-step", lambda ctx: stepsal.Trace.from_dict(trace_data(
        ctx, lambda data: data["layout"]["token_step"].__setitem__(0, 99))),
         Raises(stepsal.TraceFormatError, r"token_step holds steps outside -1\.\.6")),
    Case("saved-study-result-not-json", lambda ctx: stepsal.StudyResult.load(
        (ctx.folder / "study_result.json").write_text("{") and ctx.folder),
         Raises(DamagedFileError, r"study_result\.json is no readable saved StudyResult \(Expecting property name")),
    Case("study-recomputes-damaged-map", study_rerun_after_damage,
         Warns(StepsalWarning, r"p1\.greedy\.0\.safetensors is no readable saved StepSaliency \(.*\): it is damaged"
                               r".* Computing it again\.")),
    Case("study-recomputed-map-loads", lambda ctx: sum(map(len, study_rerun_after_damage(ctx).groups.values())),
         Value(1)),
    Case("report-skips-damaged-file", report_with_damaged_file,
         Warns(StepsalWarning, r"the report leaves out 1 damaged file: .*a/1\.safetensors is no readable saved")),
    Case("report-names-damaged-file", report_with_damaged_file,
         Matches(r"Skipped 1 \.safetensors file\(s\) that are damaged \(see the warning\): a/1\.safetensors")),
    Case("model-cache-cut-file", cached_model_with_cut_weights,
         Raises(DamagedFileError, r"smollm2-135m-instruct/model\.safetensors in stepsal's model cache is damaged "
                                  r"\(.*\); delete the folder and the next load rebuilds it: rm -rf .*smollm2-135m")),
    # item 8: errors that name the problem and the fix
    Case("device-cuda-without-cuda", lambda ctx: without_cuda(lambda: load_tiny(ctx, device="cuda")),
         Raises(stepsal.DeviceError, r"device='cuda', but this torch \(.*\) sees no CUDA GPU \(a CPU build of torch, "
                                     r"or a machine without one\); leave device unset for the CPU")),
    Case("device-unknown", lambda ctx: load_tiny(ctx, device="gpu"),
         Raises(OptionError, r"device 'gpu' is no torch device; pass 'cpu', 'cuda', 'cuda:1' or 'mps'")),
    Case("dtype-as-text", lambda ctx: str(next(load_tiny(ctx, dtype="float32").parameters()).dtype),
         Value("torch.float32")),
    Case("dtype-unknown-text", lambda ctx: load_tiny(ctx, dtype="float8"),
         Raises(OptionError, r"dtype 'float8' is not one stepsal loads models in; pass one of \(")),
    Case("sweep-layer-out-of-range", lambda ctx: stepsal.layer_sweep(
        ctx.model, [ctx.trace], lambda layer: stepsal.knockout(ctx.model, ctx.trace, "summary", "thinking",
                                                               layers=[layer]), layers=[99], progress=False),
         Raises(OptionError, r"layers \[99\] out of range: layers must be in 0\.\.1, the model's layers")),
    Case("knockout-layer-out-of-range",
         lambda ctx: stepsal.knockout(ctx.model, ctx.trace, "summary", "thinking", layers=[99]).__enter__(),
         Raises(OptionError, r"layers \[99\] out of range")),
    Case("sweep-layer-float", lambda ctx: unchecked(stepsal.layer_sweep)(
        ctx.model, [ctx.trace], lambda layer: stepsal.knockout(ctx.model, ctx.trace, "summary", "thinking",
                                                               layers=[layer]), layers=[1.0], progress=False),
         Raises(OptionError, r"layers must be whole layer numbers; got \[1\.0\]")),
    Case("stepflow-layer-float", lambda ctx: StepFlow(oeb_layers=[29.0]),
         Raises(OptionError, r"oeb_layers must be whole layer numbers; got \[29\.0\]")),
    Case("one-token-trace", lambda ctx: stepsal.step_saliency(ctx.model, one_token_trace(ctx)),
         Raises(StepsalError, r"target='all' is the mean next-token loss, which needs a trace of at least 2 tokens; "
                              r"this one has 1")),
    Case("sentence-end-bad-regex", lambda ctx: stepsal.Trace.from_text(THINK_TRACE, ctx.tokenizer, sentence_end="(["),
         Raises(OptionError, r"sentence_end '\(\[' is no regular expression \(unterminated character set")),
    Case("sentence-end-empty-match", lambda ctx: stepsal.Trace.from_text(THINK_TRACE, ctx.tokenizer, sentence_end="x*"),
         Raises(OptionError, r"sentence_end 'x\*' matches the empty string")),
    Case("trace-text-bytes", lambda ctx: unchecked(stepsal.Trace.from_text.__func__)(
        stepsal.Trace, THINK_TRACE.encode(), ctx.tokenizer),
         Raises(stepsal.TraceFormatError, r"needs the trace as a str; got bytes \(decode it first")),
    Case("trace-text-none", lambda ctx: unchecked(stepsal.Trace.from_text.__func__)(stepsal.Trace, None, ctx.tokenizer),
         Raises(stepsal.TraceFormatError, r"needs the trace as a str; got NoneType")),
    Case("from-tokens-negative-id", lambda ctx: stepsal.Trace.from_tokens([1, -3, 4], ctx.tokenizer),
         Raises(stepsal.TraceFormatError, r"token id -3 at position 1 is outside this tokenizer's vocabulary")),
    Case("from-tokens-id-past-vocabulary", lambda ctx: stepsal.Trace.from_tokens([1, 10**6], ctx.tokenizer),
         Raises(stepsal.TraceFormatError, r"token id 1000000 at position 1 is outside")),
    Case("from-tokens-float-ids", lambda ctx: stepsal.Trace.from_tokens(torch.tensor([1.0, 2.0]), ctx.tokenizer),
         Raises(stepsal.TraceFormatError, r"token ids must be whole numbers; got dtype torch\.float32")),
    Case("generate-max-new-tokens-float",
         lambda ctx: unchecked(stepsal.generation.generate)(ctx.model, "hi", max_new_tokens=2.5),
         Raises(StepsalError, r"max_new_tokens must be a whole number >= 1; got 2\.5")),
    Case("problems-file-empty", lambda ctx: load_problems((ctx.folder / "p.jsonl").write_text("\n")
                                                          and ctx.folder / "p.jsonl"),
         Raises(StepsalError, r"p\.jsonl holds no problems; each line needs a JSON object")),
    Case("problems-file-not-utf8", lambda ctx: load_problems((ctx.folder / "p.jsonl").write_bytes(
        b'{"id": "a", "question": "q", "answer": 1}\n{"id": "\xff"}\n') and ctx.folder / "p.jsonl"),
         Raises(StepsalError, r"p\.jsonl:2: not UTF-8 text \(byte 0xff\); save the problems file as UTF-8")),
    Case("cli-eval-empty-problems", lambda ctx: cli_result(ctx, "eval", "--problems", str(
        (ctx.folder / "p.jsonl").write_text("") or ctx.folder / "p.jsonl"), "--out", str(ctx.folder / "e")),
         Matches(r"^\(1, .stepsal eval: error: .*p\.jsonl holds no problems")),
    Case("cli-sweep-layer-out-of-range", lambda ctx: cli_result(
        ctx, "sweep", "--trace", trace_file(ctx), "--model", str(tiny_folder(ctx)), "--layers", "99",
        "--intervention", "knockout:summary:thinking", "--out", str(ctx.folder / "s")),
         Matches(r"^\(1, .stepsal sweep: error: layers \[99\] out of range: layers must be in 0\.\.1")),
    Case("cli-sweep-bad-layers-before-model", lambda ctx: cli_result(
        ctx, "sweep", "--trace", trace_file(ctx), "--model", str(ctx.folder / "no-such-model"), "--layers", "abc",
        "--intervention", "knockout:summary:thinking"),
         Matches(r"^\(1, .stepsal sweep: error: layers must look like '0,1,2' or 'off'; got 'abc'")),
    Case("cli-eval-refused-leaves-no-out",
         lambda ctx: out_left_behind(ctx, "eval", "--model", str(ctx.folder / "no-such-model"), "--limit", "1"),
         Value((1, False))),
    Case("cli-analyze-refused-leaves-no-out",
         lambda ctx: out_left_behind(ctx, "analyze", "--trace", trace_file(ctx), "--model",
                                     str(ctx.folder / "no-such-model")), Value((1, False))),
    Case("cli-merge-missing-folder-leaves-no-out", lambda ctx: out_left_behind(ctx, "eval", "--merge"),
         Value((1, False))),
    # item 8, more: what a second careful user tried (silent results first, then unclear errors)
    Case("evaluate-shard-out-of-range", lambda ctx: stepsal.evaluate(ctx.model, [WordProblem("p1", "q?", 1)],
                                                                     out=ctx.folder, shard=(2, 2)),
         Raises(StepsalError, r"shard must be \(i, n\) with whole numbers 0 <= i < n, like \(0, 4\); got \(2, 2\)")),
    Case("evaluate-negative-shard", lambda ctx: stepsal.evaluate(ctx.model, [WordProblem("p1", "q?", 1)],
                                                                 out=ctx.folder, shard=(-1, 2)),
         Raises(StepsalError, r"shard must be \(i, n\)")),
    Case("evaluate-duplicate-ids", lambda ctx: stepsal.evaluate(
        ctx.model, [WordProblem("p1", "q?", 3), WordProblem("p1", "q?", 4)], out=ctx.folder),
         Raises(StepsalError, r"problem id 'p1' appears twice; ids must be unique")),
    Case("evaluate-problems-as-dicts", lambda ctx: unchecked(stepsal.studies.evaluate.evaluate)(
        ctx.model, [{"id": "p1", "question": "q?", "answer": 1}], out=ctx.folder),
         Raises(StepsalError, r"each problem needs \.id, \.messages\(\) and \.answer .*got dict")),
    Case("evaluate-out-is-a-file", lambda ctx: stepsal.evaluate(
        ctx.model, [WordProblem("p1", "q?", 1)], out=(ctx.folder / "f").write_text("") or ctx.folder / "f"),
         Raises(StepsalError, r"out='.*/f' is a file; pass a folder")),
    Case("evaluate-seed-too-big", lambda ctx: stepsal.evaluate(ctx.model, [WordProblem("p1", "q?", 1)], out=ctx.folder,
                                                               seed=2**50),
         Raises(OptionError, r"seed must be a whole number in 0\.\.1099511627776; got 1125899906842624")),
    Case("evaluate-k-float", lambda ctx: unchecked(stepsal.studies.evaluate.evaluate)(
        ctx.model, [WordProblem("p1", "q?", 1)], out=ctx.folder, k=1.5),
         Raises(OptionError, r"k must be a whole number >= 0; got 1\.5")),
    Case("problem-question-null", lambda ctx: validated(WordProblem, id="a", question=None, answer=1),
         Raises(StepsalError, r"problem 'a': the question must be non-empty text; got None")),
    Case("problem-steps-text", lambda ctx: validated(WordProblem, id="a", question="q?", answer=1, n_steps="x"),
         Raises(StepsalError, r"problem 'a': steps must be a whole number or absent; got 'x'")),
    Case("problems-file-question-number", lambda ctx: load_problems(problem_rows(
        ctx, {"id": "a", "question": "", "answer": 1})),
         Raises(StepsalError, r"p\.jsonl:1: problem 'a': the question must be non-empty text; got ''")),
    Case("problems-path-is-folder", lambda ctx: load_problems(ctx.folder),
         Raises(StepsalError, r"is a folder; pass the problems file")),
    Case("generate-do-sample-text", lambda ctx: unchecked(stepsal.generation.generate)(
        ctx.model, "hi", max_new_tokens=1, do_sample="no"), Raises(OptionError, r"do_sample must be True or False")),
    Case("stepflow-at-summary-text", lambda ctx: validated(StepFlow, smi_at_summary="no"),
         Raises(OptionError, r"smi_at_summary must be True or False; got 'no'")),
    Case("saliency-per-head-text", lambda ctx: stepsal.SaliencyOptions.check({"per_head": "yes"}),
         Raises(OptionError, r"per_head must be True or False; got 'yes'")),
    Case("knockout-head-float", lambda ctx: next(unchecked(KNOCKOUT.knockout)(  # runs up to the hooks
        ctx.model, ctx.trace, "summary", "thinking", heads=[1.5])),
         Raises(OptionError, r"heads must be whole head numbers; got \[1\.5\]")),
    Case("knockout-no-layers", lambda ctx: stepsal.knockout(ctx.model, ctx.trace, "summary", "thinking",
                                                            layers=[]).__enter__(),
         Raises(StepsalError, r"layers must name at least one layer of 0\.\.1; got \[\]")),
    Case("answer-without-answer-target", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace, answer="12"),
         Raises(OptionError, r"answer='12' is read only with target='answer' \(the target is 'all'\)")),
    Case("cli-answer-without-answer-target", lambda ctx: cli_result(
        ctx, "analyze", "--trace", trace_file(ctx), "--model", str(tiny_folder(ctx)), "--answer", "12", "--out",
        str(ctx.folder / "a")), Matches(r"^\(1, .stepsal analyze: error: .*answer='12' is read only with target")),
    Case("cli-temperature-without-sample", lambda ctx: cli_result(
        ctx, "generate", "--prompt", "hi", "--temperature", "0.7", "--model", str(ctx.folder)),
         Matches(r"^\(1, .stepsal generate: error: --temperature/--top-p/--seed need --sample")),
    Case("cli-no-stepflow-with-layers", lambda ctx: cli_result(
        ctx, "eval", "--no-stepflow", "--oeb-layers", "9", "--limit", "1"),
         Matches(r"^\(1, .stepsal eval: error: --oeb-layers/--smi-layers set StepFlow's layers, and --no-stepflow")),
    Case("show-layer-in-maps-view", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace).show(layer=99),
         Raises(OptionError, r"layer= picks the layer of view='heads'")),
    Case("compare-different-layers", lambda ctx: two_results(ctx, [0]),
         Warns(StepsalWarning, r"computed over different layers, so the per-layer comparison is left out")),
    Case("sweep-no-traces", lambda ctx: stepsal.layer_sweep(ctx.model, [], lambda layer: None),
         Raises(StepsalError, r"traces must be a non-empty list of Trace")),
    Case("from-tokens-prompt-length-past-end",
         lambda ctx: stepsal.Trace.from_tokens(ctx.trace.tokens, ctx.tokenizer, prompt_length=10**6),
         Raises(OptionError, r"prompt_length must be a whole number in 0\.\.\d+; got 1000000")),
    Case("paired-unknown-mode", lambda ctx: evaluate_fake(ctx).paired("bogus"),
         Raises(OptionError, r"paired\(mode='bogus'\): the samples have modes \['sampled'\]")),
    Case("answer-span-floats", lambda ctx: stepsal.SaliencyOptions.check({"target": "answer", "answer": (1.0, 3.0)}),
         Raises(OptionError, r"an answer span is two whole token positions \(start, end\); got \(1\.0, 3\.0\)")),
    Case("target-returns-int", lambda ctx: unchecked(stepsal.saliency._checked_loss)(3),
         Raises(StepsalError, r"the target must return a scalar tensor computed from the logits; it returned int")),
    Case("layers-one-number", lambda ctx: validated(StepFlow, oeb_layers=3),
         Raises(OptionError, r"oeb_layers must be whole layer numbers; got 3\. Pass a list: \[3\]")),
    Case("saliency-of-text", lambda ctx: unchecked(stepsal.saliency.check_trace_fits)(ctx.model, THINK_TRACE),
         Raises(stepsal.ArgumentTypeError, r"Step-Saliency needs a stepsal Trace; got str\. Build one with "
                                           r"stepsal\.Trace\.from_text")),
    Case("saliency-options-dict", lambda ctx: unchecked(stepsal.saliency._merged_options)({"norm": "row"}, {}),
         Raises(stepsal.ArgumentTypeError, r"options must be a SaliencyOptions \(SaliencyOptions\.from_dict")),
    Case("plot-no-layers", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace).plot(layers=[]),
         Raises(StepsalError, r"no layer to draw")),
    Case("save-into-missing-folder", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace).save(
        ctx.folder / "nope" / "x.safetensors"), Raises(StepsalError, r"its folder .*nope does not exist")),
    Case("save-onto-folder", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace).save(ctx.folder),
         Raises(StepsalError, r"is a folder; pass a file path to save to")),
    Case("load-a-folder", lambda ctx: stepsal.StepSaliency.load(ctx.folder),
         Raises(stepsal.ResultsNotFoundError, r"is a folder; pass the saved StepSaliency file in it")),
    Case("generate-id-past-vocabulary", lambda ctx: stepsal.generate(ctx.model, torch.tensor([10**5]),
                                                                     max_new_tokens=1),
         Raises(StepsalError, r"token id 100000 in the prompt is outside the model's vocabulary")),
    Case("generate-token-id-list", lambda ctx: stepsal.generate(ctx.model, [5, 6, 7], max_new_tokens=1).tokens[0][:3]
         .tolist(), Value([5, 6, 7])),
    Case("generate-temperature-text", lambda ctx: unchecked(stepsal.generation.generate)(
        ctx.model, "hi", max_new_tokens=1, do_sample=True, temperature="1"),
         Raises(OptionError, r"temperature must be a finite number; got '1'")),
    Case("generate-seed-too-big", lambda ctx: stepsal.generate(ctx.model, "hi", max_new_tokens=1, do_sample=True,
                                                               seed=2**70),
         Raises(OptionError, r"seed must be a whole number in 0\.\.9223372036854775807")),
    Case("generate-flow-as-dict", lambda ctx: unchecked(stepsal.generation.generate)(ctx.model, "hi", {"alpha": 0.1}),
         Raises(StepsalError, r"stepflow must be a StepFlow \(StepFlow\(\.\.\.\), or StepFlow\.from_dict")),
    Case("generate-chat-without-template", lambda ctx: stepsal.generate(
        ctx.model, [{"role": "user", "content": "hi"}], max_new_tokens=1),
         Raises(StepsalError, r"this tokenizer has no chat template.*--prompt TEXT")),
    Case("stepflow-from-none", lambda ctx: unchecked(StepFlow.from_dict.__func__)(StepFlow, None),
         Raises(StepsalError, r"StepFlow\.from_dict needs a dict of settings")),
    Case("knockout-numpy-step", lambda ctx: unchecked(KNOCKOUT.group_mask)(ctx.trace, np.int64(3)).any().item(),
         Value(True)),
    Case("knockout-mask-as-list", lambda ctx: int(unchecked(KNOCKOUT.group_mask)(
        ctx.trace, [True] * 3 + [False] * (len(ctx.trace) - 3)).sum()), Value(3)),
    Case("knockout-group-none", lambda ctx: unchecked(KNOCKOUT.group_mask)(ctx.trace, None),
         Raises(StepsalError, r"unknown group None")),
    Case("sweep-one-trace", lambda ctx: unchecked(stepsal.layer_sweep)(ctx.model, ctx.trace, lambda layer: None),
         Raises(StepsalError, r"traces must be a non-empty list of Trace; got Trace \(pass \[trace\]\)")),
    Case("sweep-intervention-returns-none", lambda ctx: stepsal.layer_sweep(ctx.model, [ctx.trace], lambda layer: None,
                                                                            progress=False),
         Raises(StepsalError, r"the intervention must return a context manager .*returned NoneType")),
    Case("sweep-metric-returns-vector", lambda ctx: stepsal.layer_sweep(
        ctx.model, [ctx.trace], lambda layer: stepsal.knockout(ctx.model, ctx.trace, "summary", "thinking",
                                                               layers=[layer]),
        metric=lambda logits, plain, trace: logits, progress=False),
         Raises(StepsalError, r"the metric must return one number per trace; it returned shape")),
    Case("compare-confidence-percent", lambda ctx: stepsal.compare_groups([], [], confidence=95.0),
         Raises(OptionError, r"confidence must lie in \(0, 1\), e\.g\. 0\.95")),
    Case("compare-no-bootstrap", lambda ctx: stepsal.compare_groups([], [], n_boot=0),
         Raises(OptionError, r"n_boot must be a whole number >= 1; got 0")),
    Case("compare-traces-not-results", lambda ctx: stepsal.compare_groups([ctx.trace] * 2, [ctx.trace] * 2),
         Raises(StepsalError, r"group 'correct' must be a list of StepSaliency results .*\['Trace'\]")),
    Case("compare-one-label", lambda ctx: unchecked(stepsal.compare_groups)([], [], labels=("a",)),
         Raises(StepsalError, r"labels must be two names")),
    Case("comparison-from-empty-dict", lambda ctx: stepsal.GroupComparison.from_dict({}),
         Raises(StepsalError, r"not a GroupComparison's to_dict \(missing key 'rows'\)")),
    Case("metrics-plot-unknown-measure", lambda ctx: stepsal.step_saliency(ctx.model, ctx.trace).metrics().plot(
        measures=["bogus"]), Raises(OptionError, r"unknown measures \['bogus'\]: use some of")),
    Case("min-thinking-steps-text", lambda ctx: whole_number("2", "min_thinking_steps", minimum=0),
         Raises(OptionError, r"min_thinking_steps must be a whole number >= 0; got '2'")),
    Case("custom-format-bad-regex", lambda ctx: stepsal.custom_format("<think", "[", regex=True),
         Raises(stepsal.TraceFormatError, r"summary_start '\[' is no regular expression .*regex=False")),
    Case("custom-format-not-text", lambda ctx: unchecked(stepsal.custom_format)(1, 2),
         Raises(stepsal.TraceFormatError, r"custom_format needs non-empty text markers")),
    Case("cli-trace-not-utf8", lambda ctx: cli_result(
        ctx, "analyze", "--trace", str((ctx.folder / "t.txt").write_bytes(b"\xff") and ctx.folder / "t.txt")),
         Matches(r"^\(1, .stepsal analyze: error: --trace .*t\.txt is not UTF-8 text \(byte 0xff at 0\)")),
    Case("cli-model-folder-without-config", lambda ctx: cli_result(
        ctx, "analyze", "--trace", trace_file(ctx), "--model", str(ctx.folder), "--out", str(ctx.folder / "o")),
         Matches(r"^\(1, .stepsal analyze: error: .* has no config\.json, so it is no saved model")),
    Case("cli-knockout-bad-steps", lambda ctx: cli_result(
        ctx, "sweep", "--trace", trace_file(ctx), "--intervention", "knockout:summary:3+x"),
         Matches(r"^\(1, .stepsal sweep: error: --intervention knockout:summary:3\+x: a group is question")),
    Case("cli-problems-folder", lambda ctx: cli_result(ctx, "eval", "--problems", str(ctx.folder)),
         Matches(r"^\(1, .stepsal eval: error: --problems .* is a folder; pass the JSONL file")),
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
                value = case.trigger(ctx)
            if isinstance(expect, Matches):
                assert re.search(expect.pattern, str(value)), value
            else:
                assert value == expect.expected
