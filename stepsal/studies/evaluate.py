"""Accuracy with and without StepFlow: paired samples, pass@1 / pass@k / majority vote, paired statistics.

Every problem is answered greedily and with ``k`` samples (R1's defaults: temperature 0.6, top-p
0.95), once per condition ("baseline", and "stepflow" when a :class:`StepFlow` is given). The two
conditions use the same seeds, so a sample differs between them only where StepFlow changed the
model's distribution (common random numbers: the comparison is paired per problem and per sample).

Samples go to JSONL files in a folder, one row per sample, written as each problem finishes;
rerunning skips what is there (resumable). ``shard=(i, n)`` takes every n-th problem from the i-th,
for cluster schedulers or ``accelerate launch`` ranks (each writes its own file, locked while it runs
so no second process writes it too; :func:`load_samples` merges a folder). A line that is no sample
row is never dropped silently: loading warns (or refuses) naming it, a rerun moves it aside and redoes it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas
import torch
from tqdm.auto import tqdm

from ..backends import ModelAdapter, adapter_for
from ..backends.base import Decoding
from ..errors import (
    OptionError,
    ResultsNotFoundError,
    SettingsMismatchError,
    StepsalError,
)
from ..formats import get_format, prompt_thinking_from
from ..generation import encode_prompts, generate
from ..model_types import Model
from ..options import flag, is_whole, whole_number
from ..stats import bootstrap_mean_interval
from ..stepflow.config import StepFlow
from ..stepflow.hooks import FlowStats
from ..storage import file_to_write, plain, writer_lock
from ..tasks.answers import extract_answer, is_correct, pass_at_k, to_number
from ..vis.figures import plot_bars
from ..vis.html import frame_section
from .rows import BadRows, RowKind, differing_setting, read_rows, set_aside_damaged_lines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_SEED = 2**40  # a problem's (or prefix's) seed is seed * 1_000_003 + an offset < 2**32: within torch's 2**63
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}
SAMPLE_FILE = "samples{suffix}.jsonl"


def shard_file(folder: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return folder / SAMPLE_FILE.format(suffix="" if count == 1 else f".{index}-of-{count}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) as a tuple; anything else is an error naming the form."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise StepsalError(f"--shard takes i/n with integers, like 0/4; got {text!r}.") from None
    if not 0 <= index < count:
        raise StepsalError(f"--shard i/n needs 0 <= i < n; got {text!r}.")
    return index, count


def check_shard(shard: Any) -> tuple[int, int]:
    """``shard`` if it is (i, n) with whole numbers 0 <= i < n."""
    if not (isinstance(shard, (tuple, list)) and len(shard) == 2 and all(map(is_whole, shard))
            and 0 <= shard[0] < shard[1]):
        raise StepsalError(f"shard must be (i, n) with whole numbers 0 <= i < n, like (0, 4); got {shard!r}.")
    return int(shard[0]), int(shard[1])


def check_problems(problems: Sequence[Any]) -> None:
    """Problems need ``id``, ``messages()`` and ``answer``, and ids must be unique (rows are keyed by them)."""
    seen = set()
    for problem in problems:
        if not (hasattr(problem, "id") and callable(getattr(problem, "messages", None)) and hasattr(problem, "answer")):
            raise StepsalError(f"each problem needs .id, .messages() and .answer (stepsal.load_problems or "
                               f"stepsal.WordProblem(id, question, answer)); got {type(problem).__name__}.")
        if problem.id in seen:
            raise StepsalError(f"problem id {problem.id!r} appears twice; ids must be unique (samples are keyed by "
                               "them).")
        seen.add(problem.id)


def accelerate_shard() -> tuple[tuple[int, int], str] | None:
    """(rank, world size) and the rank's device when started by ``accelerate launch`` (or torchrun):
    read from the launcher's RANK / WORLD_SIZE / LOCAL_RANK; None in a single process. Ranks share no
    state while they run (each writes its own file), so no process group is started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return (rank, world), (f"cuda:{local}" if torch.cuda.is_available() else "cpu")


POLL_SECONDS = 2.0  # how often a shard waiting for the others looks at their files


def await_shards(missing: Callable[[], int], what: str, shard: tuple[int, int], progress: bool) -> None:
    """Return once ``missing()`` (how many of ``what`` the other shards have still to write) is 0,
    looking every :data:`POLL_SECONDS`; a line says what is awaited. The files are the only
    rendezvous, so a stopped shard that is started again lets the others go on."""
    said = False
    while (count := missing()) > 0:
        if progress and not said:
            print(f"shard {shard[0]}/{shard[1]}: waiting for the other shards' {count} {what}")
            said = True
        time.sleep(POLL_SECONDS)


def wait_for_samples(folder: Path, ids: list[str], conditions: Sequence[str], modes: dict[str, int],
                     shard: tuple[int, int], progress: bool) -> EvalResult:
    """The samples of ``conditions`` for ``ids`` in ``folder`` (every shard's files), once all are
    there (:func:`await_shards`). For sharded runs: one process has what it asked for in
    :func:`evaluate`'s result, and a merging one needs every shard's."""
    wanted = {(problem, condition, mode, i) for problem in ids for condition in conditions
              for mode, n in modes.items() for i in range(n)}
    frame = pandas.DataFrame()

    def missing() -> int:
        nonlocal frame
        frame = load_samples(folder).frame
        return len(wanted - set(map(_key, frame.to_dict("records"))))

    await_shards(missing, f"samples in {folder}", shard, progress)
    return EvalResult(frame=frame.loc[[_key(row) in wanted for row in frame.to_dict("records")]].reset_index(drop=True))


def _flow_summary(stats: Any) -> dict[str, Any] | None:
    if stats is None:
        return None
    data = stats.to_dict()
    return {"scope": "the batch of this problem's samples",
            "oeb_rows": sum(d["rows"] for d in data["oeb"].values()),
            "oeb_changed": sum(d["changed"] for d in data["oeb"].values()),
            "smi_injections": sum(d["injections"] for d in data["smi"].values())}


def _key(row: dict) -> tuple:
    return row["problem"], row["condition"], row["mode"], row["sample"]


def evaluate(model: Model | ModelAdapter, problems: Sequence[Any], flow: StepFlow | None = None, *, out: str | Path,
             k: int = 4, greedy: bool = True, temperature: float = R1_SAMPLING["temperature"],
             top_p: float = R1_SAMPLING["top_p"], max_new_tokens: int = 256, seed: int = 0,
             shard: tuple[int, int] = (0, 1), progress: bool = True, overwrite: bool = False) -> EvalResult:
    """Answer ``problems`` (objects with ``id``, ``messages()`` and ``answer``) under each condition.

    Each row records the settings that produced it (model, sampling, StepFlow). A rerun into the same
    folder resumes, and refuses (:class:`SettingsMismatchError`, naming the setting) samples made with
    other settings (in any shard's file); ``overwrite=True`` discards the folder's samples first (a
    shard: its own file). Returns the samples this
    call asked for (its problems, conditions, modes and k) from every shard found in ``out``.
    """
    if whole_number(k, "k", minimum=0) == 0 and not flag(greedy, "greedy"):
        raise StepsalError(f"k must be >= 1 (or 0 with greedy=True); got k={k}, greedy={greedy}.")
    check_shard(shard)
    check_problems(problems)
    whole_number(seed, "seed", 0, MAX_SEED)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise StepsalError(f"out={str(out)!r} is a file; pass a folder for the samples.")
    folder.mkdir(parents=True, exist_ok=True)
    path = shard_file(folder, shard)
    with writer_lock(path, fix=BUSY_FIX):
        return _evaluate_locked(model, problems, flow, folder, path, k=k, greedy=greedy, temperature=temperature,
                                top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, shard=shard, progress=progress,
                                overwrite=overwrite)


BUSY_FIX = "write elsewhere (another --out), or split the problems between processes with --shard i/n"


def _evaluate_locked(model: Model | ModelAdapter, problems: Sequence[Any], flow: StepFlow | None, folder: Path,
                     path: Path, *, k: int, greedy: bool, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int, shard: tuple[int, int], progress: bool, overwrite: bool) -> EvalResult:
    """:func:`evaluate` while this process holds the lock on its shard file ``path``."""
    if overwrite:  # an unsharded run discards the folder's samples; a shard its own file
        for old in sorted(folder.glob("samples*.jsonl")) if shard[1] == 1 else []:
            if old != path:
                with writer_lock(old, fix=BUSY_FIX):  # not while a shard is still writing it
                    old.unlink()
        path.write_bytes(b"")
    set_aside_damaged_lines(path, SAMPLES)
    conditions = {"baseline": None} | ({"stepflow": flow} if flow is not None else {})
    settings = {condition: _settings(model, condition_flow, max_new_tokens, temperature, top_p, seed)
                for condition, condition_flow in conditions.items()}
    files = {file: read_samples(file) for file in sorted(folder.glob("samples*.jsonl"))}
    for file, rows in files.items():  # every shard's: load_samples merges them all
        _check_settings(rows, settings, file)
    done = {_key(row) for row in files.get(path, [])}
    adapter = adapter_for(model)
    tokenizer = adapter.tokenizer
    modes = ([("greedy", 1)] if greedy else []) + ([("sampled", k)] if k else [])
    mine = list(problems)[shard[0]::shard[1]]
    work = [(p, c, m, n) for p in mine for c in conditions for m, n in modes
            if any((p.id, c, m, i) not in done for i in range(n))]
    bar = tqdm(total=len(work), desc="evaluate", disable=not progress, unit="batch")
    answers = _engine_answers if adapter.decodes_itself else _loop_answers
    with path.open("a") as sink:
        for (problem, condition, mode, _n), answered in answers(adapter, work, conditions, seed, max_new_tokens,
                                                               temperature, top_p):
            bar.set_postfix_str(f"{problem.id} {condition} {mode}")
            bar.update()
            batch_seed = _batch_seed(seed, problem)
            flow_stats = _flow_summary(answered.stats)
            # where the prompt opened the thinking, an answer needs the summary marker in the text
            prompt = tokenizer.decode(answered.tokens[0][:answered.prompt_lengths[0]].tolist()) if tokenizer else ""
            opened = prompt_thinking_from(prompt, get_format("think")) < len(prompt)
            for i, (text, tokens, start) in enumerate(zip(answered.texts, answered.tokens, answered.prompt_lengths,
                                                          strict=True)):
                answer = extract_answer(text, thinking_open=opened)
                row = {"problem": problem.id, "condition": condition, "mode": mode, "sample": i,
                       "seed": batch_seed if mode == "sampled" else None, "gold": problem.answer,
                       "answer": answer, "correct": is_correct(answer, problem.answer),
                       "steps": getattr(problem, "n_steps", None), "new_tokens": len(tokens) - start,
                       "closed_think": "</think>" in text, "boxed": "\\boxed{" in text,
                       "text": text, "flow": flow_stats, "settings": settings[condition],
                       "stepsal_version": _version(),  # recorded, not compared: an upgrade may resume a run
                       "prompt_length": start, "tokens": tokens.tolist()}  # exact ids: traces without retokenising
                sink.write(json.dumps(row) + "\n")
            sink.flush()
    bar.close()
    frame = load_samples(folder).frame
    if frame.empty:  # a shard without problems, in a fresh folder
        return EvalResult(frame=frame)
    asked = frame["problem"].isin([p.id for p in problems]) & frame["condition"].isin(list(conditions)) & (
        ((frame["mode"] == "greedy") & greedy) | ((frame["mode"] == "sampled") & (frame["sample"] < k)))
    return EvalResult(frame=frame.loc[asked].reset_index(drop=True))


Work = tuple[Any, str, str, int]  # (problem, condition, mode, number of samples)
ENGINE_CHUNK = 64  # work items a serving engine gets at once: its batch, and what a kill can lose


@dataclass
class Answered:
    """One work item's samples: texts, full token sequences, prompt lengths, StepFlow statistics."""

    texts: list[str]
    tokens: list[torch.Tensor]
    prompt_lengths: list[int]
    stats: FlowStats | None


def _batch_seed(seed: int, problem: Any) -> int:
    return seed * 1_000_003 + _stable_hash(problem.id)  # the same for both conditions


def _loop_answers(adapter: ModelAdapter, work: list[Work], conditions: dict[str, StepFlow | None], seed: int,
                  max_new_tokens: int, temperature: float, top_p: float) -> Iterator[tuple[Work, Answered]]:
    """Each item through :func:`generate` (its samples as one batch, one seed)."""
    for item in work:
        problem, condition, mode, n = item
        result = generate(adapter, [problem.messages()] * n, conditions[condition], max_new_tokens=max_new_tokens,
                          do_sample=mode == "sampled", temperature=temperature, top_p=top_p,
                          seed=_batch_seed(seed, problem) if mode == "sampled" else None)
        yield item, Answered(result.texts, result.tokens, result.prompt_lengths, result.stats)


def _engine_answers(adapter: ModelAdapter, work: list[Work], conditions: dict[str, StepFlow | None], seed: int,
                    max_new_tokens: int, temperature: float, top_p: float) -> Iterator[tuple[Work, Answered]]:
    """Items in chunks of :data:`ENGINE_CHUNK`, each chunk one batch of a serving engine (every sample a
    request: sample i of an item seeded with the item's seed + i, the same in both conditions)."""
    fmt = get_format("think")
    for first in range(0, len(work), ENGINE_CHUNK):
        chunk = work[first:first + ENGINE_CHUNK]
        rows, flows, decodings = [], [], []
        for problem, condition, mode, n in chunk:
            prompt = encode_prompts(adapter.tokenizer, problem.messages())[0]
            sampled = mode == "sampled"
            for i in range(n):
                rows.append(prompt)
                flows.append(conditions[condition])
                decodings.append(Decoding(max_new_tokens, sampled, temperature, top_p,
                                          _batch_seed(seed, problem) + i if sampled else None, True))
        done = iter(adapter.generate_rows(rows, flows, fmt, decodings))
        for item in chunk:
            prompt = encode_prompts(adapter.tokenizer, item[0].messages())[0]
            mine = [next(done) for _ in range(item[3])]
            parts = [row.stats for row in mine if row.stats is not None]
            yield item, Answered([adapter.tokenizer.decode(row.new_tokens) for row in mine],
                                 [torch.tensor(prompt + row.new_tokens) for row in mine], [len(prompt)] * len(mine),
                                 FlowStats.total(parts) if parts else None)


def _settings(model: Model | ModelAdapter, flow: StepFlow | None, max_new_tokens: int, temperature: float, top_p: float,
              seed: int) -> dict[str, Any]:
    """What a sample of one condition depends on, as recorded in its row."""
    adapter = adapter_for(model)
    dtype = str(adapter.dtype).removeprefix("torch.")
    return {"model": adapter.label, "dtype": dtype, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "seed": seed, "stepflow": None if flow is None else flow.to_dict()}


GREEDY_IGNORES = ("temperature", "top_p", "seed")  # greedy samples do not depend on these


def _check_settings(rows: list[dict], settings: dict[str, dict[str, Any]], path: Path) -> None:
    """Refuse to resume from rows that other settings produced (rows of other conditions are kept)."""
    for row in rows:
        recorded, wanted = row.get("settings"), settings.get(row.get("condition", ""))
        if not isinstance(recorded, dict) or wanted is None:  # rows from before settings were kept; other conditions
            continue
        name = differing_setting(recorded, wanted, GREEDY_IGNORES if row.get("mode") == "greedy" else ())
        if name is None:
            continue
        raise SettingsMismatchError(
            f"{path} holds {row['condition']} samples made with {name}={recorded.get(name)!r}; this run asks for "
            f"{name}={wanted.get(name)!r}. Use another --out, or overwrite=True (stepsal eval --overwrite) to discard "
            "this folder's samples.")


def _version() -> str:
    try:
        return importlib.metadata.version("stepsal")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def _stable_hash(text: str) -> int:
    """A seed from a problem id that does not change between runs (Python's hash() does)."""
    return zlib.crc32(text.encode())


SAMPLES = RowKind(what="sample", keys=("problem", "condition", "mode", "sample"), writer="stepsal eval",
                  skip_hint="stepsal eval --merge --skip-bad-rows (load_samples(..., bad_rows='warn'))")


def read_samples(path: Path, bad_rows: BadRows = "warn") -> list[dict]:
    """The sample rows of one JSON-lines file (lines that are no sample row: :func:`rows.read_rows`)."""
    return read_rows(path, SAMPLES, bad_rows)


def load_samples(folder: str | Path, *, bad_rows: BadRows = "warn") -> EvalResult:
    """Every sample in a folder's ``samples*.jsonl`` files (all shards), one row per key. Lines that
    are no sample row: see :func:`read_samples`."""
    folder = Path(folder)
    files = sorted(folder.glob("samples*.jsonl"))
    if not files:
        raise ResultsNotFoundError(f"no samples*.jsonl in {folder}: run stepsal eval --out {folder} first.")
    if bad_rows not in ("warn", "raise"):
        raise OptionError(f"bad_rows must be 'warn' or 'raise'; got {bad_rows!r}.")
    rows = {}
    for file in files:
        for row in read_samples(file, bad_rows):
            rows[_key(row)] = row
    return EvalResult(frame=pandas.DataFrame(list(rows.values())))


def _majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer, answers compared as numbers where they parse; ties go to the first."""
    keyed = [(to_number(a) if a is not None and to_number(a) is not None else a) for a in answers]
    counts = Counter(k for k in keyed if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a, k in zip(answers, keyed, strict=True) if k is not None and counts[k] == best)


PER_PROBLEM_COLUMNS = ("condition", "mode", "problem", "steps", "n", "correct", "pass@1", "majority")
SUMMARY_COLUMNS = ("condition", "mode", "problems", "k", "pass@1", "pass@k", "majority", "closed_think", "boxed",
                   "new_tokens")


@dataclass
class EvalResult:
    """All samples (``frame``: one row per problem, condition, mode and sample) and their statistics."""

    frame: pandas.DataFrame

    def __repr__(self) -> str:
        frame = self.frame
        if frame.empty:
            return "EvalResult(no samples)"
        names = lambda column: "/".join(map(str, dict.fromkeys(frame[column])))  # noqa: E731
        return (f"EvalResult({len(frame)} samples: {frame['problem'].nunique()} problems, conditions "
                f"{names('condition')}, modes {names('mode')})")

    def _repr_html_(self) -> str:
        return frame_section(repr(self), self.summary(), fig=self.plot())

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per sample (problem, condition, mode, sample, answer, correct, text, tokens, ...): a
        copy of ``frame``; :meth:`summary` and :meth:`per_problem` aggregate it."""
        return self.frame.copy()

    def plot(self, **kwargs: Any) -> Figure:
        """pass@1, pass@k and majority-vote accuracy per condition and mode: the matplotlib Figure."""
        summary = self.summary()
        summary["label"] = summary["condition"].astype(str) + " / " + summary["mode"].astype(str)
        return plot_bars(summary, "label", ["pass@1", "pass@k", "majority"], title="accuracy", ylabel="share",
                         **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """The samples as JSON lines, one per sample (the format of :func:`evaluate`'s files; NaN as null)."""
        path = file_to_write(path)
        with path.open("w", encoding="utf-8") as sink:
            for row in self.frame.to_dict("records"):
                sink.write(json.dumps(plain(row), allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        """Samples saved by :meth:`save` (a JSON-lines file), or every ``samples*.jsonl`` of a folder
        (:func:`load_samples`)."""
        path = Path(path)
        if path.is_dir():
            return load_samples(path)
        if not path.is_file():
            raise ResultsNotFoundError(f"{path}: no such file or folder of samples.")
        return cls(frame=pandas.DataFrame(read_samples(path, "raise")))

    def per_problem(self) -> pandas.DataFrame:
        """Per (condition, mode, problem): samples, correct ones, pass@1, majority-vote correctness."""
        if self.frame.empty:
            return pandas.DataFrame(columns=list(PER_PROBLEM_COLUMNS))
        rows = []
        # pandas types a group's key as Hashable; grouping by a list of columns gives tuples
        for (condition, mode, problem), group in self.frame.groupby(  # pyright: ignore[reportGeneralTypeIssues]
                ["condition", "mode", "problem"], sort=False):
            n, c = len(group), int(group["correct"].sum())
            majority = _majority([a if isinstance(a, str) else None for a in group["answer"]])  # NaN: none
            rows.append({"condition": condition, "mode": mode, "problem": problem, "steps": group["steps"].tolist()[0],
                         "n": n, "correct": c, "pass@1": c / n,
                         "majority": is_correct(majority, group["gold"].tolist()[0])})
        return pandas.DataFrame(rows)

    def summary(self) -> pandas.DataFrame:
        """Per (condition, mode): problems, pass@1 (mean over samples), pass@k, majority vote, format rates."""
        per = self.per_problem()
        if per.empty:
            return pandas.DataFrame(columns=list(SUMMARY_COLUMNS))
        rows = []
        # a group's key: a tuple (pandas types it as Hashable)
        for (condition, mode), group in per.groupby(["condition", "mode"], sort=False):  # pyright: ignore[reportGeneralTypeIssues]
            k = int(group["n"].min())
            samples = self.frame[(self.frame.condition == condition) & (self.frame["mode"] == mode)]
            rows.append({"condition": condition, "mode": mode, "problems": len(group), "k": k,
                         "pass@1": group["pass@1"].mean(),
                         "pass@k": np.mean([pass_at_k(int(n), int(c), k)
                                            for n, c in zip(group.n, group.correct, strict=True)]),
                         "majority": group["majority"].mean(), "closed_think": samples["closed_think"].mean(),
                         "boxed": samples["boxed"].mean(), "new_tokens": samples["new_tokens"].mean()})
        return pandas.DataFrame(rows)

    def paired(self, mode: str = "sampled", n_boot: int = 10000, confidence: float = 0.95,
               seed: int = 0) -> dict[str, Any]:
        """StepFlow - baseline pass@1 per problem: mean, percentile bootstrap CI over problems, and a
        two-sided sign-flip permutation test of zero mean difference (exact up to 16 nonzero pairs)."""
        per = self.per_problem()
        if mode not in set(per["mode"]):
            raise OptionError(f"paired(mode={mode!r}): the samples have modes {sorted(set(per['mode']))}.")
        per = per[per["mode"] == mode]
        table = per.pivot(index="problem", columns="condition", values="pass@1")
        if not {"baseline", "stepflow"} <= set(table.columns):
            raise StepsalError(f"paired() needs both conditions in mode {mode!r}; found {sorted(table.columns)}.")
        table = table.dropna()
        diff = (table["stepflow"] - table["baseline"]).to_numpy()
        rng = np.random.default_rng(seed)
        ci = bootstrap_mean_interval(diff, rng, n_boot, confidence)  # before the p-value: it draws from rng too
        return {"mode": mode, "problems": len(diff), "baseline": float(table["baseline"].mean()),
                "stepflow": float(table["stepflow"].mean()), "difference": float(diff.mean()),
                "ci": ci, "confidence": confidence,
                "p_value": sign_flip_p_value(diff, rng), "problems_changed": int((diff != 0).sum())}


def sign_flip_p_value(diff: np.ndarray, rng: np.random.Generator, n_random: int = 100000) -> float:
    """Two-sided p-value of mean(diff) = 0 under random sign flips of each pair's difference."""
    nonzero = diff[diff != 0]
    if len(nonzero) == 0:
        return 1.0
    observed = abs(nonzero.sum())
    if len(nonzero) <= 16:
        signs = (((np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1) * 2 - 1)
    else:
        signs = rng.choice([-1, 1], size=(n_random, len(nonzero)))
    sums = np.abs((signs * nonzero).sum(1))
    return float(np.mean(sums >= observed - 1e-12))
