import numpy as np
import pytest
import torch

import stepsal
from stepsal import LayerMetrics, StepLayout, StepSaliency, compare_groups
from stepsal.metrics import hedges_g

# Q, T1..T5, S1, S2 with 2 tokens each
SEGMENTS = [0, 1, 1, 1, 1, 1, 2, 2]
THINKING, SUMMARY = [1, 2, 3, 4, 5], [6, 7]


def random_result(seed: int, n_layers: int = 8) -> StepSaliency:
    generator = torch.Generator().manual_seed(seed)
    n = len(SEGMENTS)
    sums = torch.rand(n_layers, n, n, generator=generator).tril()
    layout = StepLayout.from_token_step(torch.arange(2 * n) // 2, SEGMENTS)
    return StepSaliency(sums, layout, list(range(n_layers)))


def test_layer_measures_against_a_naive_loop():
    result = random_result(0)
    metrics = result.metrics()
    for layer in range(8):
        rows = result.sums[layer].double()
        rows = rows / rows.sum(1, keepdim=True)
        local = np.mean([rows[i, i] + rows[i, i - 1] for i in THINKING])
        question = np.mean([rows[i, 0] for i in THINKING])
        to_thinking = [sum(rows[i, j] for j in THINKING) for i in SUMMARY]
        to_summary = [sum(rows[i, j] for j in SUMMARY) for i in SUMMARY]
        recency = [sum(rows[i, j] for j in THINKING[-3:]) / to_thinking[k] for k, i in enumerate(SUMMARY)]
        expected = [local, question, np.mean(to_thinking), np.mean(to_summary), np.mean(recency)]
        got = [metrics.local_share[layer], metrics.question_share[layer], metrics.summary_thinking_share[layer],
               metrics.summary_self_share[layer], metrics.recency[layer]]
        np.testing.assert_allclose([float(g) for g in got], [float(e) for e in expected], rtol=1e-5)


def test_per_trace_bands_and_decay_slope():
    metrics = random_result(1).metrics()
    summary = metrics.per_trace()
    assert summary["lock_in"] == pytest.approx(float(metrics.local_share[:2].mean()))  # bottom quarter of 8
    deep = np.arange(4, 8)  # top half
    slope = np.polyfit(deep, metrics.summary_thinking_share[4:].numpy().astype(float), 1)[0]
    assert summary["decay"] == pytest.approx(slope, rel=1e-5)
    assert summary["summary_thinking"] == pytest.approx(float(metrics.summary_thinking_share[4:].mean()))


def synthetic(local: float, rng: np.random.Generator, n_layers: int = 8) -> LayerMetrics:
    noise = lambda: torch.tensor(rng.normal(0, 0.05, n_layers), dtype=torch.float32)  # noqa: E731
    return LayerMetrics(list(range(n_layers)), local + noise(), 0.3 + noise(), 0.4 + noise(), 0.3 + noise(),
                        0.5 + noise())


def test_group_comparison_finds_a_real_difference_and_no_false_one():
    rng = np.random.default_rng(0)
    correct = [synthetic(0.5, rng) for _ in range(20)]
    wrong = [synthetic(0.7, rng) for _ in range(20)]
    comparison = compare_groups(correct, wrong, n_boot=1000)
    lock_in = next(r for r in comparison.rows if r.measure == "lock_in")
    assert lock_in.diff == pytest.approx(0.2, abs=0.05)
    assert 0 < lock_in.diff_ci[0] < lock_in.diff < lock_in.diff_ci[1]
    assert lock_in.hedges_g > 2 and lock_in.g_ci[0] > 0
    question = next(r for r in comparison.rows if r.measure == "question_share")
    assert question.diff_ci[0] < 0 < question.diff_ci[1]
    lows, highs = comparison.layer_diff_ci["local_share"]
    assert (lows > 0).all() and comparison.layer_diff["local_share"].shape == (8,)
    assert "lock_in" in comparison.table()


def test_hedges_g_formula():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 4.0, 5.0, 7.0])
    pooled = np.sqrt((3 * a.var(ddof=1) + 3 * b.var(ddof=1)) / 6)
    assert hedges_g(a, b) == pytest.approx((1 - 3 / (4 * 8 - 9)) * (b.mean() - a.mean()) / pooled)


def test_traces_without_summary_are_counted_not_silently_lost():
    rng = np.random.default_rng(1)
    correct = [synthetic(0.5, rng) for _ in range(5)]
    wrong = [synthetic(0.5, rng) for _ in range(5)]
    wrong[0].summary_thinking_share[:] = float("nan")
    comparison = compare_groups(correct, wrong, n_boot=200)
    row = next(r for r in comparison.rows if r.measure == "summary_thinking")
    assert (row.n_a, row.n_b, row.dropped) == (5, 4, 1)
    assert "(1 without)" in comparison.table()


def test_groups_need_two_traces_each():
    with pytest.raises(ValueError, match="at least 2 traces"):
        compare_groups([random_result(0)], [random_result(1), random_result(2)])


def test_trace_without_question_tokens():
    """A trace that starts with the thinking marker has no question step: no double counting, NaN share."""
    layout = StepLayout.from_token_step(torch.arange(8) // 2, [1, 1, 2, 2])
    sums = torch.rand(2, 4, 4).tril() + 0.1 * torch.eye(4)
    metrics = StepSaliency(sums, layout, [0, 1]).metrics()
    assert (metrics.local_share <= 1 + 1e-6).all()
    assert torch.isnan(metrics.question_share).all()


def test_reference_measures_equal_a_loop_over_block_normalised_entries(tl_models, tokenizer):
    """final_block_intensity / analysis_block_intensity / final_heat_anomaly as the paper's code
    defines them, written out as loops over step pairs and tokens."""
    from tiny import THINK_TRACE

    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    result = stepsal.step_saliency(tl_models[("qwen2", "bridge")], trace)
    got = result.reference_measures()
    token_step = trace.layout.token_step.tolist()
    sizes = [token_step.count(s) for s in range(trace.layout.n_steps)]
    kinds = [s.kind for s in trace.layout.steps]
    for i in range(len(result.layers)):
        def block_mean(kind, i=i):
            steps = [s for s, k in enumerate(kinds) if k == kind]
            values = [float(result.sums[i, a, b]) / (sizes[a] * sizes[b]) for a in steps for b in steps]
            return sum(values) / len(values)

        final, analysis = block_mean("summary"), block_mean("thinking")
        assert float(got["final_block_intensity"][i]) == pytest.approx(final, rel=1e-5)
        assert float(got["analysis_block_intensity"][i]) == pytest.approx(analysis, rel=1e-5)
        assert float(got["final_heat_anomaly"][i]) == pytest.approx(final / analysis, rel=1e-5)


def test_small_groups_warn_and_make_no_claims():
    """Under 10 traces a group, the comparison says it is descriptive only (2 traces once printed a CI)."""
    import warnings

    from stepsal.errors import StepsalWarning

    rng = np.random.default_rng(2)
    with pytest.warns(StepsalWarning, match="fewer than 10 traces"):
        small = compare_groups([synthetic(0.5, rng) for _ in range(9)], [synthetic(0.7, rng) for _ in range(12)],
                               n_boot=100)
    assert small.descriptive_only
    assert "no significance claims" in small.table() and "no significance claims" in repr(small)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepsalWarning)
        enough = compare_groups([synthetic(0.5, rng) for _ in range(10)], [synthetic(0.7, rng) for _ in range(10)],
                                n_boot=100)
    assert not enough.descriptive_only and "claims" not in enough.table()
