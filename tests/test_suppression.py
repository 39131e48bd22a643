"""Attention suppression (stepsal.suppression_matrix) against an independent computation: the plain
transformers model with the hidden (query, key) entries masked in a 4D attention mask."""

import math

import pytest
import torch
from conftest import BACKENDS
from tiny import THINK_TRACE

import stepsal


def masked_logprobs(hf_model, ids: torch.Tensor, hidden: list[tuple[int, int, int]]) -> list[float]:
    """log p(token t | before t) for t = 1..T-1 with the key range [k0, k1) hidden from queries >= q0,
    for each (q0, k0, k1) in ``hidden``; everything else causal."""
    n = ids.shape[1]
    lowest = torch.finfo(torch.float32).min
    mask = torch.full((1, 1, n, n), lowest).triu(1)
    for q0, k0, k1 in hidden:
        mask[0, 0, q0:, k0:k1] = lowest
    with torch.no_grad():
        logits = hf_model(ids, attention_mask=mask).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[t - 1, ids[0, t]]) for t in range(1, n)]


def naive_matrix(hf_model, trace: stepsal.Trace) -> list[list[float]]:
    """maps[j][i] by loops: for each step i one masked forward; the mean over step j's tokens (the
    first token of the trace has no log-probability) of the change from the plain forward."""
    ids = trace.tokens[None]
    plain = masked_logprobs(hf_model, ids, [])
    steps = trace.layout.steps
    maps = [[math.nan] * len(steps) for _ in steps]
    for i, step in enumerate(steps):
        start, end = step.token_span
        if end >= len(trace):
            continue
        hidden = masked_logprobs(hf_model, ids, [(end, start, end)])
        for j in range(i + 1, len(steps)):
            positions = [t for t in range(*steps[j].token_span) if t >= 1]
            maps[j][i] = sum(hidden[t - 1] - plain[t - 1] for t in positions) / len(positions)
    return maps


@pytest.fixture(scope="module")
def trace(tokenizer):
    return stepsal.Trace.from_text(THINK_TRACE, tokenizer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matrix_equals_masked_transformers_model(arch, backend, tl_models, hf_models, trace):
    result = stepsal.suppression_matrix(tl_models[(arch, backend)], trace)
    expected = torch.tensor(naive_matrix(hf_models[arch], trace), dtype=torch.float64)
    assert result.maps.shape == (trace.layout.n_steps,) * 2
    assert torch.equal(torch.isnan(result.maps), torch.isnan(expected))
    later = ~torch.isnan(expected)
    assert later.sum() == trace.layout.n_steps * (trace.layout.n_steps - 1) // 2  # every later step, no more
    scale = expected[later].abs().max()
    assert scale > 1e-3  # hiding a step changes something: the comparison is not of zeros
    assert (result.maps[later] - expected[later]).abs().max() <= 1e-4 * scale
    assert result.layers == list(range(tl_models[(arch, backend)].cfg.n_layers))


def test_importance_views_and_save(tl_models, trace, tmp_path):
    result = stepsal.suppression_matrix(tl_models[("llama", BACKENDS[0])], trace)
    maps = result.maps.tolist()
    n = len(maps)
    for i in range(n):  # the mean drop over later steps, by a loop
        later = [-maps[j][i] for j in range(i + 1, n)]
        expected = sum(later) / len(later) if later else math.nan
        got = float(result.importance[i])
        assert (math.isnan(got) and math.isnan(expected)) or abs(got - expected) < 1e-12
    frame = result.to_dataframe()
    assert len(frame) == n * (n - 1) // 2 and (frame["step_q"] > frame["step_k"]).all()
    row = frame.iloc[0]
    assert row["value"] == pytest.approx(maps[int(row["step_q"])][int(row["step_k"])])
    assert repr(result).startswith("SuppressionMatrix(") and "\n" not in repr(result)
    fig = result.plot()
    assert len(fig.axes) == 2 and fig.axes[0].images[0].get_array().shape == (n, n)  # the map and its colour bar
    assert "<img" in result._repr_html_()
    widget = result.show()
    assert widget.props["attention"].shape == (1, n, n) and float(widget.props["attention"].max()) == 1.0
    loaded = stepsal.SuppressionMatrix.load(result.save(tmp_path / "s.json"))
    assert torch.equal(torch.isnan(loaded.maps), torch.isnan(result.maps))
    assert torch.allclose(torch.nan_to_num(loaded.maps), torch.nan_to_num(result.maps))
    assert loaded.layers == result.layers and loaded.layout.n_steps == n


def test_chosen_layers_only(tl_models, trace):
    model = tl_models[("llama", BACKENDS[0])]
    first = stepsal.suppression_matrix(model, trace, layers=[0])
    both = stepsal.suppression_matrix(model, trace)
    assert first.layers == [0]
    later = ~torch.isnan(both.maps)
    assert not torch.allclose(first.maps[later], both.maps[later])
    with pytest.raises(stepsal.OptionError, match=r"layers \[7\] out of range"):
        stepsal.suppression_matrix(model, trace, layers=[7])
