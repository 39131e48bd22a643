"""Receiver heads (Thought Anchors' kurtosis of vertical scores) against plain loops, and on a
constructed head that points every later step at one step."""

import math
import random

import pytest
import torch
from conftest import BACKENDS
from tiny import THINK_TRACE

import stepsal
from stepsal.pooling import vertical_scores
from stepsal.receivers import excess_kurtosis
from stepsal.traces import StepLayout


def loop_kurtosis(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    if len(kept) < 4:
        return math.nan
    mean = sum(kept) / len(kept)
    m2 = sum((v - mean) ** 2 for v in kept) / len(kept)
    m4 = sum((v - mean) ** 4 for v in kept) / len(kept)
    return math.nan if m2 == 0 else m4 / m2**2 - 3


def loop_vertical(matrix: list[list[float]], proximity: int) -> list[float]:
    n = len(matrix)
    scores = []
    for i in range(n):
        later = [matrix[j][i] for j in range(i + proximity, n)]
        scores.append(sum(later) / len(later) if later else math.nan)
    return scores


def test_kurtosis_and_vertical_scores_equal_loops():
    rng = random.Random(0)
    for _ in range(20):
        values = [rng.expovariate(1.0) if rng.random() > 0.2 else math.nan for _ in range(rng.randint(2, 12))]
        got, expected = float(excess_kurtosis(torch.tensor(values, dtype=torch.float64))), loop_kurtosis(values)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-9, abs=1e-12)
        n, proximity = rng.randint(1, 9), rng.randint(1, 4)
        matrix = [[rng.random() for _ in range(n)] for _ in range(n)]
        got_scores = vertical_scores(torch.tensor(matrix, dtype=torch.float64), proximity).tolist()
        for g, e in zip(got_scores, loop_vertical(matrix, proximity), strict=True):
            assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, rel=1e-12)


def constructed(n_steps: int = 10) -> stepsal.StepSaliency:
    """Two heads of one layer: head 0 sends every later step's saliency to step 1, head 1 spreads it
    evenly over the earlier steps."""
    layout = StepLayout.from_token_step(list(range(n_steps)), [0] + [1] * (n_steps - 2) + [2])
    spread = torch.tril(torch.ones(n_steps, n_steps))
    anchor = torch.eye(n_steps)
    anchor[2:, 1] = 1.0
    anchor[2:, 2:] = torch.eye(n_steps - 2) * 0.01
    heads = torch.stack([anchor, spread])[None]  # [layer, head, q, k]
    return stepsal.StepSaliency(sums=heads.sum(1), layout=layout, layers=[3], head_sums=heads)


def test_a_broadcasting_step_makes_a_receiver_head():
    receivers = stepsal.receiver_heads(constructed(), proximity=2)
    assert receivers.top(2)[0] == (3, 0)
    assert float(receivers.kurtosis[0, 0]) > 3 > float(receivers.kurtosis[0, 1])
    frame = receivers.to_dataframe()
    assert frame.iloc[0][["layer", "head", "top_step", "top_label"]].tolist() == [3, 0, 1, "T1"]


def test_on_a_model_result_views_and_refusals(tl_models, tokenizer):
    model = tl_models[("llama", BACKENDS[0])]
    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    result = stepsal.step_saliency(model, trace, per_head=True)
    receivers = result.receiver_heads(proximity=1)
    n_layers, n_heads, n_steps = len(result.layers), model.cfg.n_heads, trace.layout.n_steps
    assert receivers.kurtosis.shape == (n_layers, n_heads) and receivers.vertical.shape == (n_layers, n_heads, n_steps)
    sums = result.head_sums.double()
    for layer in range(n_layers):
        for head in range(n_heads):
            rows = [[v / sum(row) if sum(row) > 0 else 0.0 for v in row] for row in sums[layer, head].tolist()]
            scores = loop_vertical(rows, 1)
            assert receivers.vertical[layer, head].tolist() == pytest.approx(scores, rel=1e-9, nan_ok=True)
            expected = loop_kurtosis(scores)
            got = float(receivers.kurtosis[layer, head])
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-9)
    text = repr(receivers)
    assert text.startswith("ReceiverHeads(") and "\n" not in text
    frame = receivers.to_dataframe()
    assert len(frame) == n_layers * n_heads and frame["kurtosis"].dropna().is_monotonic_decreasing
    fig = receivers.plot()
    assert len(fig.axes) >= 2
    assert "<table" in receivers._repr_html_()
    widget = receivers.show(n=3)
    assert widget.props["attention"].shape[0] == min(3, len(receivers.top(3)))
    with pytest.raises(stepsal.StepsalError, match=r"need per-head maps: compute step_saliency\(\.\.\., per_head"):
        stepsal.step_saliency(model, trace).receiver_heads()
    with pytest.raises(stepsal.OptionError, match="proximity must be a whole number >= 1"):
        result.receiver_heads(proximity=0)


def test_the_report_lists_and_shows_receiver_heads(tmp_path):
    page = stepsal.write_report(tmp_path, [constructed()], ["constructed"]).read_text()
    section = page[page.index("Receiver heads (kurtosis"):]
    assert section.index("L3H0") < section.index("L3H1")  # the broadcasting head first
    assert "Receiver heads: their row-normalised step maps" in section
