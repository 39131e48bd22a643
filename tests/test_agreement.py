"""Rank agreement of the three step importances: the statistics against scipy, the importances against
loops, and the table over traces against numpy."""

import json
import math
import random
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import BACKENDS
from tiny import THINK_TRACE

import stepsal
from stepsal.segments import THINKING
from stepsal.stats import kendall_tau_b, spearman
from stepsal.studies.agreement import saliency_importance


def same(got: float, expected: float) -> bool:
    return (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_rank_correlations_equal_scipy():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 14)
        spread = rng.choice([2, 4, 100])  # small spreads make ties in both rankings
        a = np.array([rng.randint(0, spread) for _ in range(n)], dtype=float)
        b = np.array([rng.randint(0, spread) for _ in range(n)], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on constant inputs (and returns NaN, as we do)
            rho, tau = scipy.stats.spearmanr(a, b).statistic, scipy.stats.kendalltau(a, b).statistic
        assert same(spearman(a, b), float(rho)), (a, b)
        assert same(kendall_tau_b(a, b), float(tau)), (a, b)


@pytest.fixture(scope="module")
def model(tl_models):
    return tl_models[("llama", BACKENDS[0])]


@pytest.fixture(scope="module")
def trace(tokenizer):
    return stepsal.Trace.from_text(THINK_TRACE, tokenizer)


@pytest.fixture(scope="module")
def three(model, trace):
    saliency = stepsal.step_saliency(model, trace)
    suppression = stepsal.suppression_matrix(model, trace)
    resampling = stepsal.resampling_importance(model, trace, "12", temperature=0, max_new_tokens=2, progress=False)
    return saliency, suppression, resampling


def test_saliency_importance_equals_a_loop(three):
    saliency = three[0]
    sums = saliency.sums.double().tolist()
    n_layers, n = len(sums), len(sums[0])
    for band, layers in (("all", range(n_layers)), ("shallow", range(1)), ("deep", range(n_layers))):  # 2 layers
        got = saliency_importance(saliency, band).tolist()
        for i in range(n):
            values = []
            for j in range(i + 1, n):
                values.append(sum(sums[layer][j][i] / sum(sums[layer][j]) for layer in layers) / len(layers))
            assert same(got[i], sum(values) / len(values) if values else math.nan)


def test_step_agreement_of_one_trace(three, trace):
    saliency, suppression, resampling = three
    agreement = stepsal.step_agreement(saliency, suppression, resampling)
    thinking = trace.layout.steps_of(THINKING)
    frame = agreement.importances
    assert frame["step"].tolist() == thinking
    assert frame["suppression"].tolist() == suppression.importance[thinking].tolist()
    assert frame["resampling"].tolist() == resampling.importance[1:].tolist()
    table = agreement.to_dataframe()
    assert len(table) == 3 * 2 + 1  # each band against both causal measures, and those two against each other
    for row in table.to_dict("records"):
        x, y = frame[row["a"]].to_numpy(), frame[row["b"]].to_numpy()
        keep = np.isfinite(x) & np.isfinite(y)
        assert row["steps"] == keep.sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert same(row["spearman"], float(scipy.stats.spearmanr(x[keep], y[keep]).statistic))
            assert same(row["kendall"], float(scipy.stats.kendalltau(x[keep], y[keep]).statistic))
    assert repr(agreement).startswith("StepAgreement(") and agreement.plot().axes


def test_agreement_over_traces_and_refusals(three, model, tokenizer):
    saliency, suppression, _ = three
    other_text = THINK_TRACE.replace("Let me check the product again.", "I check the product twice. It holds.")
    other = stepsal.Trace.from_text(other_text, tokenizer)
    agreements = [stepsal.step_agreement(saliency, suppression),
                  stepsal.step_agreement(stepsal.step_saliency(model, other), stepsal.suppression_matrix(model, other))]
    summary = stepsal.agreement_over(agreements, n_boot=200)
    frame = summary.to_dataframe()
    for row in frame.to_dict("records"):
        per_trace = [float(a.to_dataframe().set_index(["a", "b"]).loc[(row["a"], row["b"]), row["statistic"]])
                     for a in agreements]
        finite = [v for v in per_trace if not math.isnan(v)]
        assert row["traces"] == len(finite)
        if finite:
            assert row["mean"] == pytest.approx(np.mean(finite))
            assert row["ci_low"] <= row["mean"] + 1e-12 and row["mean"] <= row["ci_high"] + 1e-12
    assert summary.plot().axes and repr(summary).startswith("AgreementSummary(2 traces")
    with pytest.raises(stepsal.ModelMismatchError, match="of another trace"):
        stepsal.step_agreement(saliency, stepsal.suppression_matrix(model, other))
    with pytest.raises(stepsal.StepsalError, match="needs a suppression matrix or a resampling importance"):
        stepsal.step_agreement(saliency)
    with pytest.raises(stepsal.StepsalError, match="at least one StepAgreement"):
        stepsal.agreement_over([])
    assert torch.isnan(saliency_importance(saliency)[-1])


STUDIED = ("First, 6 and 7 make 13 when added together. Let me check the sum again to be sure. It is still 13 "
           "after all.\n</think>\nSo the answer is \\boxed{13}.")


def test_study_with_agreement_saves_reuses_and_reports(model, tokenizer, tmp_path):
    from unittest import mock

    from tiny import fake_generation

    import stepsal.studies.evaluate

    problem = stepsal.WordProblem("p1", "What is 6 plus 7?", 13)
    answer = lambda *args, **kwargs: fake_generation(tokenizer, [STUDIED])  # noqa: E731
    with mock.patch.object(stepsal.studies.evaluate, "generate", answer), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 2 traces a group: no comparison
        study = stepsal.run_study(model, [problem], out=tmp_path, progress=False, agreement=True)
        (saved,) = tmp_path.glob("*/p1.greedy.0.suppression.json")
        stamp = saved.stat().st_mtime_ns
        again = stepsal.run_study(model, [problem], out=tmp_path, progress=False, agreement=True)
    assert saved.stat().st_mtime_ns == stamp  # the saved suppression matrix was reused
    (result,) = study.groups["correct"]
    suppression = stepsal.SuppressionMatrix.load(saved)
    expected = stepsal.agreement_over([stepsal.step_agreement(result, suppression)])
    assert study.agreement.frame.equals(expected.frame) and again.agreement.frame.equals(expected.frame)
    assert json.loads((tmp_path / "study.json").read_text())["agreement"] == json.loads(
        expected.frame.to_json(orient="records"))
    assert "Does Step-Saliency point at what matters?" in (tmp_path / "report.html").read_text()
    kept = stepsal.StudyResult.load(study.save(tmp_path / "kept"))
    assert kept.agreement.frame.equals(study.agreement.frame)
