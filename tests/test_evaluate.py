"""Evaluation: pass@1 / pass@k / majority from samples, paired statistics, resumable JSONL runs."""

import itertools
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas
import pytest
from tiny import TextProblem

import stepsal
from stepsal.studies.evaluate import EvalResult, _majority, evaluate, load_samples, parse_shard, sign_flip_p_value
from stepsal.tasks.problems import SHIPPED, load_problems


def _frame(correct_by_problem: dict[str, list[bool]], condition="baseline", mode="sampled", answers=None):
    rows = []
    for problem, flags in correct_by_problem.items():
        for i, flag in enumerate(flags):
            answer = answers[problem][i] if answers else ("7" if flag else "3")
            rows.append({"problem": problem, "condition": condition, "mode": mode, "sample": i, "gold": "7",
                         "answer": answer, "correct": flag, "steps": 1, "new_tokens": 10,
                         "closed_think": True, "boxed": True})
    return pandas.DataFrame(rows)


def test_summary_pass_at_k_equals_enumerating_subsets():
    rng = np.random.default_rng(0)
    flags = {f"p{i}": list(rng.random(5) < rng.random()) for i in range(12)}
    summary = EvalResult(_frame(flags)).summary().iloc[0]
    enumerated = np.mean([np.mean([any(subset) for subset in itertools.combinations(f, 5)]) for f in flags.values()])
    assert summary["pass@k"] == pytest.approx(enumerated) and summary["k"] == 5
    assert summary["pass@1"] == pytest.approx(np.mean([np.mean(f) for f in flags.values()]))


def test_majority_vote_compares_numbers_and_breaks_ties_by_first_answer():
    assert _majority(["1,000", "12", "1000.0", "12"]) == "1,000"  # tie 2-2: the first answer's group
    assert _majority([None, "5", "\\frac{10}{2}", "4"]) == "5"
    assert _majority([None, None]) is None
    frame = _frame({"p": [False, False, True]}, answers={"p": ["3", "3", "7"]})
    assert not EvalResult(frame).per_problem()["majority"].iloc[0]


def test_sign_flip_test_is_exact_and_matches_the_binomial_sign_test():
    rng = np.random.default_rng(0)
    diff = np.array([1, 1, 1, -1, 1, 1, 0, 0, 1, 1.0])  # 7 up, 1 down: two-sided binomial sign test
    n, up = 8, 7
    binomial = min(1.0, 2 * sum(math.comb(n, i) for i in range(up, n + 1)) / 2 ** n)
    assert sign_flip_p_value(diff, rng) == pytest.approx(binomial)
    many = np.array([1.0] * 14 + [-1.0] * 6)  # 20 nonzero: Monte Carlo, close to the exact value
    exact = 2 * sum(math.comb(20, i) for i in range(14, 21)) / 2 ** 20
    assert sign_flip_p_value(many, rng) == pytest.approx(exact, abs=0.01)
    assert sign_flip_p_value(np.zeros(5), rng) == 1.0


def test_paired_difference_and_bootstrap_interval():
    base = {f"p{i}": [i % 2 == 0, False] for i in range(20)}
    flow = {f"p{i}": [True, i % 3 == 0] for i in range(20)}
    result = EvalResult(pandas.concat([_frame(base), _frame(flow, condition="stepflow")]))
    paired = result.paired()
    per_problem = [np.mean(flow[p]) - np.mean(base[p]) for p in base]
    assert paired["difference"] == pytest.approx(np.mean(per_problem))
    assert paired["ci"][0] < paired["difference"] < paired["ci"][1] and paired["ci"][0] > 0
    assert paired["p_value"] < 0.01
    with pytest.raises(ValueError, match="both conditions"):
        EvalResult(_frame(base)).paired()


def test_shard_parsing_and_the_shipped_problems():
    assert parse_shard("1/4") == (1, 4)
    for bad in ["4/4", "a/b", "1"]:
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    problems = load_problems()
    assert len(problems) == 200 and len({p.id for p in problems}) == 200
    assert {p.n_steps for p in problems} == {1, 2, 3, 4, 5}
    assert all(isinstance(p.answer, int) and p.answer > 0 for p in problems)
    assert SHIPPED.stat().st_size < 100_000


def test_problem_files_with_bad_lines_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "question": "q?", "answer": 3}\n{"id": "a", "question": "r?", "answer": 4}\n')
    with pytest.raises(ValueError, match="appears twice"):
        load_problems(path)
    path.write_text('{"id": "a", "question": "q?"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*'answer'"):
        load_problems(path)


def test_evaluate_is_paired_resumable_and_sharded(tl_models, tmp_path):
    model = tl_models[("llama", "bridge")]
    problems = [TextProblem(f"q{i}", i) for i in range(3)]
    noop = stepsal.StepFlow(oeb_layers=[], smi_layers=[])  # changes nothing: samples must match baseline's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = evaluate(model, problems, noop, out=tmp_path / "a", k=3, max_new_tokens=6, progress=False)
    frame = full.frame
    assert len(frame) == 3 * 2 * (1 + 3)
    sampled = frame[frame["mode"] == "sampled"].pivot(index=["problem", "sample"], columns="condition", values="text")
    assert (sampled["baseline"] == sampled["stepflow"]).all()  # the same seeds for both conditions
    assert sampled["baseline"].nunique() > 1  # and the samples differ from one another

    # resumable: a run stopped mid-write redoes only what is missing, with the same results
    path = tmp_path / "a" / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:9]) + "\n" + lines[9][:20])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = evaluate(model, problems, noop, out=tmp_path / "a", k=3, max_new_tokens=6, progress=False)
    key = ["problem", "condition", "mode", "sample"]
    pandas.testing.assert_frame_equal(resumed.frame.sort_values(key).reset_index(drop=True)[frame.columns],
                                      frame.sort_values(key).reset_index(drop=True))

    # two shards into one folder merge into the same samples
    for shard in [(0, 2), (1, 2)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate(model, problems, noop, out=tmp_path / "b", k=3, max_new_tokens=6, shard=shard, progress=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["samples.0-of-2.jsonl", "samples.1-of-2.jsonl"]
    merged = load_samples(tmp_path / "b").frame
    pandas.testing.assert_frame_equal(merged.sort_values(key).reset_index(drop=True)[frame.columns],
                                      frame.sort_values(key).reset_index(drop=True))
    row = json.loads(path.read_text().splitlines()[0])
    assert {"problem", "condition", "seed", "text", "answer", "correct", "new_tokens", "flow"} <= set(row)


def test_a_rerun_with_other_settings_is_refused_and_reports_only_what_it_asked_for(tl_models, tmp_path):
    """Rows record their settings: resuming with another model, sampling or StepFlow is refused with the
    setting named (overwrite=True starts again); a rerun without StepFlow reports the baseline only."""
    from stepsal.errors import SettingsMismatchError

    model = tl_models[("llama", "bridge")]
    problems = [TextProblem(f"q{i}", i) for i in range(2)]
    flow = stepsal.StepFlow(oeb_layers=[0], smi_layers=[], tau_max=0.9)
    run = {"k": 1, "max_new_tokens": 4, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = evaluate(model, problems, flow, out=tmp_path, **run)
        assert set(first.frame["condition"]) == {"baseline", "stepflow"}
        lines = (tmp_path / "samples.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["settings"]["max_new_tokens"] == 4
        for changed, message in [({"max_new_tokens": 5}, "max_new_tokens=4; this run asks for max_new_tokens=5"),
                                 ({"seed": 1}, "seed=0; this run asks for seed=1"),
                                 ({"temperature": 0.9}, "temperature=0.6; this run asks for temperature=0.9")]:
            with pytest.raises(SettingsMismatchError, match=message):
                evaluate(model, problems, flow, out=tmp_path, **{**run, **changed})
        with pytest.raises(SettingsMismatchError, match="stepflow samples made with stepflow="):
            evaluate(model, problems, stepsal.StepFlow(oeb_layers=[1], smi_layers=[]), out=tmp_path, **run)
        with pytest.raises(SettingsMismatchError, match="made with model="):
            evaluate(tl_models[("qwen2", "bridge")], problems, flow, out=tmp_path, **run)
        baseline = evaluate(model, problems, None, out=tmp_path, **run)  # --no-stepflow: the baseline only
        assert set(baseline.frame["condition"]) == {"baseline"} and len(baseline.frame) == 2 * (1 + 1)
        assert (tmp_path / "samples.jsonl").read_text().splitlines() == lines  # nothing regenerated
        fresh = evaluate(model, problems, None, out=tmp_path, overwrite=True, **{**run, "max_new_tokens": 5})
    assert set(fresh.frame["condition"]) == {"baseline"}
    assert {row["settings"]["max_new_tokens"] for row in fresh.frame.to_dict("records")} == {5}


@dataclass(frozen=True)
class PlainProblem(TextProblem):
    """A prompt that does not open the thinking: a plain answer counts."""

    def messages(self):
        return f"Question: what is {self.answer}? Answer:"


def test_reruns_check_every_shard_and_greedy_rows_ignore_sampling_settings(tl_models, tmp_path, monkeypatch):
    """A stale file of another shard layout with other settings is refused too (load_samples merges
    them all); greedy rows do not depend on temperature, top_p or seed; a shard without problems in a
    fresh folder returns no rows; an answer counts without a summary where the prompt opened no thinking."""
    import stepsal.studies.evaluate as evaluate_module
    from stepsal.errors import SettingsMismatchError

    model = tl_models[("llama", "bridge")]
    problems = [TextProblem(f"q{i}", i) for i in range(2)]
    flow = stepsal.StepFlow(oeb_layers=[0], smi_layers=[], tau_max=0.9)
    run = {"k": 0, "max_new_tokens": 3, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(model, problems, flow, out=tmp_path / "a", **run)
        with pytest.raises(SettingsMismatchError, match=r"samples\.jsonl holds stepflow samples"):
            evaluate(model, problems, stepsal.StepFlow(oeb_layers=[1], smi_layers=[]), out=tmp_path / "a",
                     shard=(0, 2), **run)
        greedy = evaluate(model, problems, flow, out=tmp_path / "a", temperature=0.9, top_p=0.5, seed=3, **run)
        assert len(greedy.frame) == 2 * 2  # reused: greedy answers do not depend on sampling settings
        empty = evaluate(model, problems[:1], None, out=tmp_path / "b", shard=(1, 2), **run)
        assert empty.frame.empty

        def plain_answer(model, prompts, flow, **kwargs):  # a model that answers without thinking
            result = original(model, prompts, flow, **kwargs)
            result.texts = [" 7" for _ in result.texts]
            return result

        original = evaluate_module.generate
        monkeypatch.setattr(evaluate_module, "generate", plain_answer)
        plain = evaluate(model, [PlainProblem("p7", 7)], None, out=tmp_path / "c", **run)
        opened = evaluate(model, [TextProblem("t7", 7)], None, out=tmp_path / "d", **run)
    assert plain.frame["correct"].tolist() == [True]  # the prompt opened no thinking: " 7" is the answer
    assert opened.frame["correct"].tolist() == [False]  # the prompt opened <think>: " 7" is unfinished thinking
