"""StepFlow calibration: the split, the candidates, a search that finds the candidate that helps on the
development split, and a test split that nothing reads before the choice (poisoned, it changes nothing)."""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import BACKENDS

import stepsal
import stepsal.studies.evaluate
from stepsal.studies.calibration import DEFAULT_GRID, PAPER, candidate_id, candidates, split_problems
from stepsal.tasks.problems import WordProblem

PROBLEMS = [WordProblem(f"p{i}", f"What is {i} plus 2?", i + 2) for i in range(12)]
GRID = {"oeb": ["quarter", "off"], "smi": ["quarter", "off"], "alpha": [0.06, 0.12]}  # 5 candidates


def test_split_is_by_id_seeded_and_disjoint():
    dev, test = split_problems(PROBLEMS, 0.25, seed=0)
    assert len(test) == 3 and len(dev) == 9 and not {p.id for p in dev} & {p.id for p in test}
    shuffled = list(reversed(PROBLEMS))
    assert {p.id for p in split_problems(shuffled, 0.25, seed=0)[1]} == {p.id for p in test}  # order-free
    assert {p.id for p in split_problems(PROBLEMS, 0.25, seed=1)[1]} != {p.id for p in test}
    with pytest.raises(stepsal.StepsalError, match="test_fraction must lie in"):
        split_problems(PROBLEMS, 1.0, seed=0)


def test_candidates_are_distinct_and_start_with_the_paper():
    pool = candidates(DEFAULT_GRID)
    assert pool[0] == PAPER
    # OEB: 2 bands x 3 tau_max + off; SMI: 2 bands x 3 alphas + off; both off is the baseline
    assert len({candidate_id(c) for c in pool}) == len(pool) == 7 * 7 - 1
    assert all((c["oeb"], c["smi"]) != ("off", "off") for c in pool)
    small = candidates(GRID)
    assert len(small) == 2 * 3 - 1  # OEB quarter/off x SMI quarter (two alphas)/off, minus both off


def fake_generate(tokenizer, calls: list, good: str, poisoned: set[str] = frozenset()):
    """generate() that answers right where StepFlow's alpha is 0.12 with OEB off (``good``), wrong
    elsewhere; on ``poisoned`` questions it flips: there the paper's settings would look best."""
    prompt = tokenizer("<|im_start|>assistant\n<think>\n")["input_ids"]

    def fake(model, messages, flow=None, **kwargs):
        question = messages[0][0]["content"].split("\n")[0]
        gold = int(question.split()[2]) + 2
        name = None if flow is None else (flow.oeb_layers, flow.smi_layers, flow.alpha)
        calls.append((question, name))
        right = name == good
        if question in poisoned:
            right = name is not None and flow.alpha == 0.06 and bool(flow.oeb_layers)
        text = f"ok.\n</think>\n\\boxed{{{gold if right else gold + 1}}}"
        tokens = torch.tensor(prompt + tokenizer(text)["input_ids"])
        return SimpleNamespace(texts=[text] * len(messages), tokens=[tokens] * len(messages),
                               prompt_lengths=[len(prompt)] * len(messages), stats=None)
    return fake


def test_search_finds_the_helpful_candidate_and_tests_once(tl_models, tokenizer, tmp_path):
    model = tl_models[("llama", BACKENDS[0])]
    good = ((), (1,), 0.12)  # OEB off, SMI on the top quarter of 2 layers, alpha 0.12
    dev, test = split_problems(PROBLEMS, 0.25, seed=0)
    results = []
    for name, poisoned in (("clean", set()), ("poisoned", {p.question for p in test})):
        calls: list = []
        with mock.patch.object(stepsal.studies.evaluate, "generate", fake_generate(tokenizer, calls, good, poisoned)):
            result = stepsal.calibrate(model, PROBLEMS, out=tmp_path / name, grid=GRID, test_fraction=0.25, k=0,
                                       max_new_tokens=4, progress=False)
        test_questions = {p.question for p in test}
        first_test = next(i for i, (question, _) in enumerate(calls) if question in test_questions)
        assert all(question in test_questions for question, _ in calls[first_test:])  # the test split comes last
        assert {name for question, name in calls[first_test:]} == {None, good}  # once: the baseline and the choice
        results.append(result)
    clean, poisoned_result = results
    assert clean.chosen == poisoned_result.chosen  # the test split did not steer the choice
    flow = clean.flow
    assert (flow.oeb_layers, flow.smi_layers, flow.alpha) == good
    assert clean.test["difference"] == 1.0
    assert poisoned_result.test["difference"] == 0.0  # poisoned: as wrong as the baseline
    assert set(clean.split["test"]) == {p.id for p in test}
    best = clean.search.iloc[0]
    assert best["gain"] == 1.0 and best["problems"] == len(dev)
    loaded = stepsal.CalibrationResult.load(tmp_path / "clean" / "calibration.json")
    assert loaded.chosen == clean.chosen and stepsal.StepFlow.from_dict(loaded.chosen) == flow
    assert repr(clean).startswith("CalibrationResult(") and "\n" not in repr(clean) and clean.plot().axes
    assert "<table" in clean._repr_html_() and len(clean.to_dataframe()) == len(clean.search)
    calls: list = []
    with mock.patch.object(stepsal.studies.evaluate, "generate", fake_generate(tokenizer, calls, good)):
        again = stepsal.calibrate(model, PROBLEMS, out=tmp_path / "clean", grid=GRID, test_fraction=0.25, k=0,
                                  max_new_tokens=4, progress=False)
    assert calls == [] and again.chosen == clean.chosen  # resumed: nothing generated again


def test_shards_split_the_work_and_agree_with_one_process(tl_models, tokenizer, tmp_path, monkeypatch):
    """Two shards (threads sharing ``out``, as two processes would) generate each sample once between
    them, wait for each other after every round, and reach the one-process result."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(stepsal.studies.evaluate, "POLL_SECONDS", 0.01)
    model = tl_models[("llama", BACKENDS[0])]
    good = ((), (1,), 0.12)
    options = {"grid": GRID, "test_fraction": 0.25, "k": 0, "max_new_tokens": 4, "progress": False}
    calls: list = []
    with mock.patch.object(stepsal.studies.evaluate, "generate", fake_generate(tokenizer, calls, good)):
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(stepsal.calibrate, model, PROBLEMS, out=tmp_path / "sharded", shard=(i, 2),
                                   **options) for i in range(2)]
            results = [future.result(timeout=120) for future in futures]  # re-raises a shard's error
        single_calls: list = []
        with mock.patch.object(stepsal.studies.evaluate, "generate", fake_generate(tokenizer, single_calls, good)):
            single = stepsal.calibrate(model, PROBLEMS, out=tmp_path / "single", **options)
    assert len(calls) == len(set(calls)) == len(single_calls)  # the same work, none of it twice
    for result in results:
        assert result.chosen == single.chosen and result.test == single.test
        assert result.search.equals(single.search)
    assert (tmp_path / "sharded" / "calibration.json").exists()
    files = sorted(path.name for path in (tmp_path / "sharded" / "test").glob("samples*.jsonl"))
    assert files == ["samples.0-of-2.jsonl", "samples.1-of-2.jsonl"]
    with pytest.raises(stepsal.StepsalError, match="shard must be"):
        stepsal.calibrate(model, PROBLEMS, out=tmp_path / "bad", shard=(2, 2), **options)
