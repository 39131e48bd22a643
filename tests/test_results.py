"""One contract for every result stepsal returns: a one-line repr naming the class, HTML with a table,
``to_dataframe()`` holding the result's own numbers, ``plot()`` returning a matplotlib Figure, and a
save / load round trip for the results worth keeping."""

import ast
import dataclasses
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas
import pytest
import torch
from matplotlib.figure import Figure
from tiny import THINK_TRACE, TextProblem

import stepsal
from stepsal.metrics import Comparison, GroupComparison
from stepsal.stepflow import FlowStats
from stepsal.storage import read_json
from stepsal.studies.evaluate import EvalResult
from stepsal.studies.study import StudyResult
from stepsal.studies.sweep import SweepResult
from stepsal.vis.report import ResultView

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tl_models):
    return tl_models[("llama", "bridge")]


@pytest.fixture(scope="module")
def traces(tokenizer):
    other = THINK_TRACE.replace("Let me check the product again.", "I check the product twice.")
    return [stepsal.Trace.from_text(text, tokenizer) for text in (THINK_TRACE, other)]


@pytest.fixture(scope="module")
def saliencies(model, traces):
    return [stepsal.step_saliency(model, trace, per_head=True, token_level=True) for trace in traces]


@pytest.fixture(scope="module")
def comparison(saliencies):
    one, two = saliencies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 10 traces a group: descriptive only
        return stepsal.compare_groups([one, two, one], [two, one], n_boot=50)


@pytest.fixture(scope="module")
def effect(model, traces):
    return stepsal.saliency_change(model, traces[0], stepsal.StepFlow(tau_max=0.9))


@pytest.fixture(scope="module")
def generation(model, traces):
    """A continuation from inside the thinking (with StepFlow): the row has a trace."""
    return stepsal.generate(model, traces[0].tokens[:60], stepsal.StepFlow(tau_max=0.9), max_new_tokens=3,
                            stop_at_eos=False)


@pytest.fixture(scope="module")
def sweep(model, traces):
    return stepsal.layer_sweep(model, traces, lambda layer, t: stepsal.knockout(model, t, "summary", "thinking",
                                                                                  layers=[layer]), progress=False)


@pytest.fixture(scope="module")
def evaluation(model, tmp_path_factory):
    noop = stepsal.StepFlow(oeb_layers=[], smi_layers=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stepsal.evaluate(model, [TextProblem(f"q{i}", i) for i in range(2)], noop,
                                out=tmp_path_factory.mktemp("eval"), k=2, max_new_tokens=4, progress=False)


@pytest.fixture(scope="module")
def study(evaluation, saliencies, comparison, tmp_path_factory):
    one, two = saliencies
    return StudyResult(samples=evaluation, groups={"correct": [one, two, one], "wrong": [two, one]},
                       skipped={"thinking never closed": 2}, comparison=comparison,
                       folder=tmp_path_factory.mktemp("study"))


def check_contract(result, name):
    """repr, HTML, frame and figure of any result; returns its frame."""
    text = repr(result)
    assert text.startswith(f"{name}(") and "\n" not in text and len(text) < 200 and "tensor(" not in text, text
    html = result._repr_html_()
    assert "<table" in html and "</table>" in html
    frame = result.to_dataframe()
    assert isinstance(frame, pandas.DataFrame) and len(frame) > 0
    fig = result.plot()
    assert isinstance(fig, Figure) and fig.axes
    return frame


def assert_same_saliency(a, b):
    torch.testing.assert_close(a.sums, b.sums, rtol=0, atol=0)
    for name in ("head_sums", "token_sums"):
        assert (getattr(a, name) is None) == (getattr(b, name) is None)
        if getattr(a, name) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert a.layout.to_dict() == b.layout.to_dict()
    assert (a.layers, a.norm, a.rule, a.target, a.model, a.token_texts) == \
        (b.layers, b.norm, b.rule, b.target, b.model, b.token_texts)


def assert_same_comparison(a, b):
    pandas.testing.assert_frame_equal(a.to_dataframe(), b.to_dataframe())
    assert (a.label_a, a.label_b, a.confidence, a.n_boot, a.layers) == (b.label_a, b.label_b, b.confidence, b.n_boot,
                                                                        b.layers)
    for field in ("layer_diff", "layer_diff_ci"):
        assert getattr(a, field).keys() == getattr(b, field).keys()
        for measure, values in getattr(a, field).items():
            np.testing.assert_array_equal(values, getattr(b, field)[measure])  # NaN equals NaN here
    for field in ("layer_mean", "layer_mean_ci"):
        for group, by_measure in getattr(a, field).items():
            for measure, values in by_measure.items():
                np.testing.assert_array_equal(values, getattr(b, field)[group][measure])


# ---------------------------------------------------------------- each result


def test_step_saliency(saliencies, tmp_path):
    result = saliencies[0]
    frame = check_contract(result, "StepSaliency")
    cell = frame[(frame.layer == 1) & (frame.step_q == 5) & (frame.step_k == 2)].value.iloc[0]
    assert cell == pytest.approx(float(result.maps[1, 5, 2]))
    assert len(result.plot().axes) >= len(result.layers)  # a panel (and a colour bar) per layer
    loaded = stepsal.StepSaliency.load(result.save(tmp_path / "r.safetensors"))
    assert_same_saliency(loaded, result)


def test_layer_metrics(saliencies):
    metrics = saliencies[0].metrics()
    frame = check_contract(metrics, "LayerMetrics")
    value = frame[(frame.layer == 1) & (frame.measure == "local_share")].value.iloc[0]
    assert value == pytest.approx(float(metrics.local_share[1]))
    assert "sum->thk" in metrics.table()
    lines = metrics.plot().axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), metrics.local_share.numpy(), equal_nan=True)


def test_group_comparison(comparison, saliencies):
    frame = check_contract(comparison, "GroupComparison")
    row = frame[frame.measure == "lock_in"].iloc[0]
    one, two = (s.metrics().per_trace()["lock_in"] for s in saliencies)
    assert row["mean_correct"] == pytest.approx((2 * one + two) / 3)
    assert row["mean_wrong"] == pytest.approx((one + two) / 2)
    assert row["n_correct"] == 3 and row["n_wrong"] == 2
    assert len(comparison.plot(measures=["local_share", "recency"]).axes) == 2
    assert_same_comparison(GroupComparison.from_dict(comparison.to_dict()), comparison)


def test_flow_stats_and_flow_effect(effect):
    stats = effect.stats
    frame = check_contract(stats, "FlowStats")
    oeb = frame[frame.part == "OEB"]
    assert oeb.layer.tolist() == stats.oeb_layers
    assert oeb.changed.tolist() == [int(v) for v in stats.oeb_changed]
    assert frame[frame.part == "SMI"].injections.tolist() == [int(v) for v in stats.smi_count]

    frame = check_contract(effect, "FlowEffect")
    value = frame[(frame.layer == 0) & (frame.measure == "question_share")].value.iloc[0]
    assert value == pytest.approx(float(effect.delta["question_share"][0]), nan_ok=True)
    assert len(effect.plot(layers=[0, 1]).axes) == 2 * 3 * 2  # rows = layers, 3 maps each, with colour bars


def test_generation(generation):
    frame = check_contract(generation, "Generation")
    row = frame.iloc[0]
    assert row.new_tokens == len(generation.tokens[0]) - generation.prompt_lengths[0] == 3
    assert row.prompt_tokens == generation.prompt_lengths[0] and row.text == generation.texts[0]
    segments = generation.trace.layout.token_segment
    assert row.thinking_tokens == int((segments == stepsal.THINKING).sum()) > 0
    assert row.summary_tokens == int((segments == stepsal.SUMMARY).sum())
    assert row.thinking_steps == len(generation.trace.layout.steps_of(stepsal.THINKING))
    assert "OEB" in generation._repr_html_()  # the StepFlow statistics' table too


def test_sweep_result(sweep, tmp_path):
    frame = check_contract(sweep, "SweepResult")
    pandas.testing.assert_frame_equal(frame, sweep.frame)
    assert frame is not sweep.frame
    np.testing.assert_allclose(frame.delta, frame.after - frame.before)
    loaded = SweepResult.load(sweep.save(tmp_path / "sweep.json"))
    pandas.testing.assert_frame_equal(loaded.frame, sweep.frame, check_exact=True)
    assert loaded.metric == sweep.metric
    # non-finite numbers survive the strict JSON
    odd = SweepResult(frame=sweep.frame.assign(after=[math.nan, math.inf, -math.inf, 1.5]), metric="custom")
    again = SweepResult.load(odd.save(tmp_path / "odd.json"))
    pandas.testing.assert_frame_equal(again.frame, odd.frame, check_exact=True)
    with pytest.raises(stepsal.StepsalError, match="holds a 'SweepResult', not a saved EvalResult"):
        read_json(tmp_path / "sweep.json", "EvalResult")


def test_suppression_matrix(model, traces, tmp_path):
    result = stepsal.suppression_matrix(model, traces[0])
    frame = check_contract(result, "SuppressionMatrix")
    n = traces[0].layout.n_steps
    assert len(frame) == n * (n - 1) // 2  # one row per (later step, hidden step)
    pairs = zip(frame.step_q, frame.step_k, strict=True)
    assert frame["value"].tolist() == [float(result.maps[q, k]) for q, k in pairs]
    loaded = stepsal.SuppressionMatrix.load(result.save(tmp_path / "s.json"))
    pandas.testing.assert_frame_equal(loaded.to_dataframe(), frame)


def test_receiver_heads(saliencies):
    frame = check_contract(saliencies[0].receiver_heads(proximity=1), "ReceiverHeads")
    assert {"layer", "head", "kurtosis", "top_step"} <= set(frame.columns)


def test_resampling_importance(model, traces, tmp_path):
    result = stepsal.resampling_importance(model, traces[0], "12", temperature=0, max_new_tokens=3, progress=False)
    frame = check_contract(result, "ResamplingImportance")
    assert len(frame) == result.n_prefixes == len(result.rollouts)
    loaded = stepsal.ResamplingImportance.load(result.save(tmp_path / "r.json"))
    pandas.testing.assert_frame_equal(loaded.to_dataframe(), frame)


def test_step_agreement_and_summary(model, traces, saliencies):
    agreements = [stepsal.step_agreement(result, stepsal.suppression_matrix(model, trace))
                  for result, trace in zip(saliencies, traces, strict=True)]
    frame = check_contract(agreements[0], "StepAgreement")
    assert {"a", "b", "spearman", "kendall"} <= set(frame.columns)
    summary = check_contract(stepsal.agreement_over(agreements, n_boot=50), "AgreementSummary")
    assert set(summary["statistic"]) == {"spearman", "kendall"}


def test_eval_result(evaluation, tmp_path):
    frame = check_contract(evaluation, "EvalResult")
    pandas.testing.assert_frame_equal(frame, evaluation.frame)
    assert len(frame) == 2 * 2 * (1 + 2)
    first = frame.to_dict("records")[0]
    assert first["new_tokens"] == len(first["tokens"]) - first["prompt_length"]
    answer = first["answer"] if isinstance(first["answer"], str) else None
    assert first["correct"] == stepsal.is_correct(answer, first["gold"])
    assert evaluation.summary()["pass@1"].tolist() == pytest.approx(
        frame.groupby(["condition", "mode"], sort=False)["correct"].mean().tolist())
    loaded = EvalResult.load(evaluation.save(tmp_path / "samples.jsonl"))
    pandas.testing.assert_frame_equal(loaded.frame, evaluation.frame, check_exact=True)
    # a frame built in memory (NaN among the answers) comes back the same too
    small = EvalResult(frame=evaluation.frame.head(4).assign(answer=["3", None, "7", None]))
    pandas.testing.assert_frame_equal(EvalResult.load(small.save(tmp_path / "small.jsonl")).frame, small.frame)


def test_study_result(study, tmp_path):
    frame = check_contract(study, "StudyResult")
    assert frame.group.tolist() == ["correct"] * 3 + ["wrong"] * 2
    row = frame[(frame.group == "wrong") & (frame["index"] == 0)].iloc[0]
    expected = study.groups["wrong"][0].metrics().per_trace()
    assert row.lock_in == pytest.approx(expected["lock_in"]) and row.steps == study.groups["wrong"][0].layout.n_steps
    assert "descriptive only" in repr(study) and "2 samples not studied" in repr(study)

    loaded = StudyResult.load(study.save(tmp_path / "kept"))
    pandas.testing.assert_frame_equal(loaded.samples.frame, study.samples.frame, check_exact=True)
    assert loaded.skipped == study.skipped and loaded.folder == study.folder
    assert {g: len(r) for g, r in loaded.groups.items()} == {g: len(r) for g, r in study.groups.items()}
    for group, results in study.groups.items():
        for a, b in zip(results, loaded.groups[group], strict=True):
            assert_same_saliency(b, a)
    assert_same_comparison(loaded.comparison, study.comparison)

    empty = StudyResult(samples=study.samples, groups={"correct": [], "wrong": []}, skipped={}, comparison=None)
    assert repr(empty) == "StudyResult(correct 0, wrong 0 traces; no comparison)"
    back = StudyResult.load(empty.save(tmp_path / "empty"))
    assert back.groups == {"correct": [], "wrong": []} and back.comparison is None and back.folder is None
    assert isinstance(empty.plot(), Figure) and empty.to_dataframe().empty


# ---------------------------------------------------------------- construction and exports


@pytest.mark.parametrize("cls", [Comparison, GroupComparison, FlowStats, stepsal.FlowEffect, stepsal.Generation,
                                 SweepResult, StudyResult, ResultView, stepsal.SuppressionMatrix,
                                 stepsal.ReceiverHeads, stepsal.ResamplingImportance, stepsal.StepAgreement,
                                 stepsal.AgreementSummary])
def test_wide_results_are_built_by_keyword(cls):
    assert all(field.kw_only for field in dataclasses.fields(cls))


def test_the_type_checking_imports_match_the_lazy_table():
    tree = ast.parse((ROOT / "stepsal" / "__init__.py").read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    imported = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names if alias.asname == alias.name}  # `X as X`: an explicit re-export
    table = dict(stepsal._PUBLIC)
    assert imported == table
    for name in ("GroupComparison", "FlowStats", "SweepResult", "EvalResult", "StudyResult", "Generation",
                 "FlowEffect", "LayerMetrics", "StepSaliency", "SuppressionMatrix", "ReceiverHeads",
                 "ResamplingImportance", "StepAgreement", "AgreementSummary"):
        assert name in stepsal.__all__ and getattr(stepsal, name).__name__ == name


def test_import_stays_lazy_and_the_package_is_typed():
    out = subprocess.run([sys.executable, "-c", "import sys, stepsal; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert (ROOT / "stepsal" / "py.typed").exists()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()
