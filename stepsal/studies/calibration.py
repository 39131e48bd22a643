"""StepFlow calibrated per model: choose its settings on a development split, then test them once.

The problems are split (by a seeded hash of their ids, so the split does not depend on their order)
into a *development* and a *test* split. On the development split a successive-halving search
compares StepFlow candidates (layer bands of the Odds-Equal Bridge and of Step Momentum Injection,
``tau_max``, ``alpha``, the SMI window), each paired with the baseline on the same problems and seeds
(:func:`stepsal.evaluate`): every round evaluates the remaining candidates on more development problems
and keeps the best third by paired accuracy gain. The chosen candidate is then evaluated **once** on
the test split, which nothing before the choice reads. Everything is resumable under ``out``:
``baseline/`` (the development baseline, computed once and shared), ``candidates/<id>/``, ``test/``,
``calibration.json``.

``shard=(i, n)`` (or ``accelerate launch`` through ``stepsal calibrate``) splits every evaluation's
problems between n processes that share ``out``: each writes its own sample files and waits, after each
round, until every shard's samples of that round are in (the files are the only rendezvous, so a
stopped shard that is started again lets the others go on); all of them then rank alike.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas

from ..backends import adapter_for
from ..errors import StepsalError
from ..model_types import Model
from ..options import real_number, whole_number
from ..stepflow.config import StepFlow
from ..storage import frame_from_json, frame_to_json, read_json, reading, write_json
from ..vis.figures import plot_bars
from ..vis.html import frames_html
from .evaluate import R1_SAMPLING, check_problems, check_shard, evaluate, shard_file, wait_for_samples

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PAPER = {"oeb": "quarter", "tau_max": 0.15, "smi": "quarter", "alpha": 0.06, "smi_window": "step"}
DEFAULT_GRID: dict[str, list[Any]] = {"oeb": ["quarter", "eighth", "off"], "tau_max": [0.15, 0.1, 0.25],
                                      "smi": ["quarter", "eighth", "off"], "alpha": [0.06, 0.03, 0.12],
                                      "smi_window": ["step"]}
BANDS = ("quarter", "eighth", "off")
CONDITIONS = ("baseline", "stepflow")  # what every evaluation here answers


def split_problems(problems: Sequence[Any], test_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(development, test): the problems whose seeded hash of the id falls in the lowest
    ``test_fraction`` form the test split (at least one problem in each); each keeps the given order."""
    if not 0 < real_number(test_fraction, "test_fraction") < 1:
        raise StepsalError(f"test_fraction must lie in (0, 1); got {test_fraction}.")
    if len(problems) < 2:
        raise StepsalError(f"calibration needs at least 2 problems (a development and a test split); got "
                           f"{len(problems)}.")
    ranked = sorted(problems, key=lambda p: zlib.crc32(f"{seed}:{p.id}".encode()))
    n_test = min(len(problems) - 1, max(1, round(len(problems) * test_fraction)))
    test_ids = {p.id for p in ranked[:n_test]}
    return [p for p in problems if p.id not in test_ids], [p for p in problems if p.id in test_ids]


def band_layers(band: str, n_layers: int, top: bool) -> list[int]:
    """The bottom (or top) quarter or eighth of ``n_layers`` (at least one layer), or [] for "off"."""
    if band not in BANDS:
        raise StepsalError(f"unknown band {band!r}: use one of {BANDS}.")
    if band == "off":
        return []
    size = max(1, n_layers // (4 if band == "quarter" else 8))
    return list(range(n_layers - size, n_layers)) if top else list(range(size))


def candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's distinct StepFlow candidates, the paper's settings first: a band that is off makes
    its strength irrelevant (one candidate, not one per value), and both off is the baseline (left out)."""
    unknown = sorted(set(grid) - set(DEFAULT_GRID))
    if unknown or not grid:
        raise StepsalError(f"unknown grid keys {unknown}: the grid maps some of {sorted(DEFAULT_GRID)} to lists.")
    full = {key: list(grid.get(key, [PAPER[key]])) for key in DEFAULT_GRID}
    seen, found = set(), []
    for values in itertools.product(*full.values()):
        candidate = dict(zip(full, values, strict=True))
        if candidate["oeb"] == "off":
            candidate["tau_max"] = PAPER["tau_max"]
        if candidate["smi"] == "off":
            candidate["alpha"], candidate["smi_window"] = PAPER["alpha"], PAPER["smi_window"]
        key = json.dumps(candidate, sort_keys=True)
        if (candidate["oeb"], candidate["smi"]) != ("off", "off") and key not in seen:
            seen.add(key)
            found.append(candidate)
    paper = [c for c in found if c == PAPER]
    return paper + [c for c in found if c != PAPER]


def candidate_flow(candidate: dict[str, Any], n_layers: int) -> StepFlow:
    return StepFlow(oeb_layers=band_layers(candidate["oeb"], n_layers, top=False),
                    smi_layers=band_layers(candidate["smi"], n_layers, top=True), tau_max=candidate["tau_max"],
                    alpha=candidate["alpha"], smi_window=candidate["smi_window"])


def candidate_id(candidate: dict[str, Any]) -> str:
    """A short, stable folder name: oeb-quarter_tau-0.15_smi-eighth_alpha-0.06_window-step."""
    return (f"oeb-{candidate['oeb']}_tau-{candidate['tau_max']}_smi-{candidate['smi']}_alpha-{candidate['alpha']}"
            f"_window-{candidate['smi_window']}")


@dataclass(kw_only=True)
class CalibrationResult:
    """The search (one row per candidate and round), the chosen StepFlow and its one test evaluation."""

    search: pandas.DataFrame
    chosen: dict[str, Any]  # StepFlow.to_dict() of the chosen candidate
    test: dict[str, Any]  # EvalResult.paired() on the test split
    split: dict[str, list[str]]  # problem ids of the development and test splits

    @property
    def flow(self) -> StepFlow:
        return StepFlow.from_dict(self.chosen)

    def to_dataframe(self) -> pandas.DataFrame:
        return self.search.copy()

    def __repr__(self) -> str:
        low, high = self.test["ci"]
        return (f"CalibrationResult({self.search['candidate'].nunique()} candidates on {len(self.split['dev'])} "
                f"development problems; chosen {self.search.iloc[0]['candidate']}; test over "
                f"{self.test['problems']} problems: {self.test['difference']:+.3f} [{low:+.3f}, {high:+.3f}], "
                f"p = {self.test['p_value']:.3f})")

    def _repr_html_(self) -> str:
        test = pandas.DataFrame([{key: value for key, value in self.test.items() if key != "ci"}
                                 | {"ci_low": self.test["ci"][0], "ci_high": self.test["ci"][1]}])
        return frames_html(repr(self), [("test split (once, after the choice)", test), ("search", self.search)],
                           fig=self.plot())

    def plot(self, path: str | os.PathLike | None = None) -> Figure:
        """The paired gain of each candidate in its last round (development split)."""
        last = self.search.sort_values("round").groupby("candidate", sort=False).tail(1)
        return plot_bars(last.sort_values("gain", ascending=False), "candidate", ["gain"],
                         title="StepFlow - baseline pass@1 on the development split (last round of each candidate)",
                         ylabel="paired gain", path=path)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, "CalibrationResult", {"search": frame_to_json(self.search), "chosen": self.chosen,
                                                      "test": self.test, "split": self.split})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationResult:
        with reading(path, "CalibrationResult"):
            data = read_json(path, "CalibrationResult")
            return cls(search=frame_from_json(data["search"]), chosen=dict(data["chosen"]), test=dict(data["test"]),
                       split={key: list(value) for key, value in data["split"].items()})


def calibrate(model: Model, problems: Sequence[Any], *, out: str | os.PathLike,
              grid: dict[str, list[Any]] | None = None, test_fraction: float = 0.5, split_seed: int = 0,
              eta: int = 3, k: int = 4, greedy: bool = False, temperature: float = R1_SAMPLING["temperature"],
              top_p: float = R1_SAMPLING["top_p"], max_new_tokens: int = 256, seed: int = 0,
              max_candidates: int | None = None, shard: tuple[int, int] = (0, 1),
              progress: bool = True) -> CalibrationResult:
    """Choose StepFlow's settings for ``model`` on a development split and test them once (module docstring).

    Args:
        grid: candidate values per setting (default :data:`DEFAULT_GRID`: bands "quarter" / "eighth" /
            "off" for ``oeb`` and ``smi``, ``tau_max``, ``alpha``, ``smi_window``); keys left out keep
            the paper's value.
        test_fraction, split_seed: the share of problems held out for the test, and the split's seed.
        eta: successive halving keeps the best 1/eta of the candidates per round.
        max_candidates: the budget: search only the first N candidates of the grid (the paper's first,
            then a seeded shuffle of the rest).
        k, greedy, temperature, top_p, max_new_tokens, seed: sampling, as in :func:`stepsal.evaluate`;
            candidates are ranked by the paired gain in sampled pass@1 (greedy when ``k=0``).
        shard: (i, n): this process evaluates every n-th problem from the i-th of each step and waits
            for the other shards' samples (module docstring); shard 0 writes ``calibration.json``.
    """
    check_problems(problems)
    shard = check_shard(shard)
    whole_number(eta, "eta", minimum=2)
    dev, test = split_problems(problems, test_fraction, split_seed)
    pool = candidates(grid or DEFAULT_GRID)
    if max_candidates is not None:
        rest = pool[1:]
        random.Random(split_seed).shuffle(rest)
        pool = [pool[0], *rest][:whole_number(max_candidates, "max_candidates", minimum=1)]
    n_layers = adapter_for(model).n_layers
    mode = "sampled" if k > 0 else "greedy"
    folder = Path(out)
    settings = {"k": k, "greedy": greedy or k == 0, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "progress": progress, "shard": shard}
    modes = {"greedy": 1} if k == 0 or greedy else {}
    modes |= {"sampled": k} if k > 0 else {}
    evaluate(model, dev, None, out=folder / "baseline", **settings)  # shared by every candidate
    rounds = 1
    while eta**rounds < len(pool):  # enough rounds to narrow the pool down to one
        rounds += 1
    rows: list[dict[str, Any]] = []
    alive = list(range(len(pool)))
    for round_index in range(rounds):
        share = eta ** (rounds - 1 - round_index)  # the last round: every development problem
        subset = dev[:min(len(dev), max(2, math.ceil(len(dev) / share)))]
        ids = [p.id for p in subset]
        evaluated = {}
        for index in alive:
            target = folder / "candidates" / candidate_id(pool[index])
            _seed_baseline(folder / "baseline", target, shard)
            evaluated[index] = evaluate(model, subset, candidate_flow(pool[index], n_layers), out=target, **settings)
        for index in alive:  # sharded: every shard's samples, once all are in
            name = candidate_id(pool[index])
            paired = (evaluated[index] if shard[1] == 1 else wait_for_samples(
                folder / "candidates" / name, ids, CONDITIONS, modes, shard, progress)).paired(mode)
            rows.append({"round": round_index, "candidate": name, "problems": len(ids), **pool[index],
                         "baseline": paired["baseline"], "stepflow": paired["stepflow"], "gain": paired["difference"],
                         "p_value": paired["p_value"], "order": index})
        ranked = sorted(alive, key=lambda i: (-_gain(rows, round_index, i), i))  # ties: the earlier (paper first)
        alive = ranked[:max(1, math.ceil(len(alive) / eta))] if round_index < rounds - 1 else ranked[:1]
    chosen = pool[alive[0]]
    flow = candidate_flow(chosen, n_layers)
    # the test split, read for the first time, once the choice is made
    test_result = evaluate(model, test, flow, out=folder / "test", **settings)
    if shard[1] > 1:
        test_result = wait_for_samples(folder / "test", [p.id for p in test], CONDITIONS, modes, shard, progress)
    search = pandas.DataFrame(rows).sort_values(["round", "gain", "order"], ascending=[False, False, True])
    result = CalibrationResult(search=search.drop(columns="order").reset_index(drop=True), chosen=flow.to_dict(),
                               test=test_result.paired(mode), split={"dev": [p.id for p in dev],
                                                                     "test": [p.id for p in test]})
    if shard[0] == 0:  # every shard holds the same result; one writes it
        result.save(folder / "calibration.json")
    return result


def _gain(rows: list[dict[str, Any]], round_index: int, index: int) -> float:
    gain = next(row["gain"] for row in rows if row["round"] == round_index and row["order"] == index)
    return gain if math.isfinite(gain) else -math.inf


def _seed_baseline(baseline: Path, target: Path, shard: tuple[int, int]) -> None:
    """Copy this shard's development baseline samples into a candidate's folder (once): evaluate then
    only generates the StepFlow condition there, with the same seeds."""
    source = shard_file(baseline, shard)
    destination = shard_file(target, shard)
    if destination.exists() or not source.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)

