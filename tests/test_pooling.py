import pytest
import torch
from hypothesis import given, settings, strategies as st

from stepsal.pooling import causal_pair_counts, normalize, pool
from stepsal.traces import StepLayout


def naive_maps(scores: torch.Tensor, token_step: torch.Tensor, n_steps: int, norm: str) -> torch.Tensor:
    """The reference's double loop over step pairs, rescanning all tokens (float64)."""
    T = scores.shape[-1]
    out = torch.zeros(n_steps, n_steps, dtype=torch.float64)
    for i in range(n_steps):
        for j in range(n_steps):
            total, pairs, causal_pairs = 0.0, 0, 0
            for t in range(T):
                for k in range(T):
                    if token_step[t] == i and token_step[k] == j:
                        total += float(scores[t, k])
                        pairs += 1
                        causal_pairs += int(t >= k)
            if norm == "block":
                out[i, j] = total / pairs if pairs else 0.0
            elif norm == "causal":
                out[i, j] = total / causal_pairs if causal_pairs else 0.0
            else:
                out[i, j] = total
    if norm == "row":
        sums = out.sum(1, keepdim=True)
        out = torch.where(sums > 0, out / sums, torch.zeros_like(out))
    return out


@st.composite
def layouts(draw):
    sizes = draw(st.lists(st.integers(1, 5), min_size=2, max_size=6))
    padding = draw(st.integers(0, 3))  # trailing tokens outside every step (-1)
    token_step = [i for i, n in enumerate(sizes) for _ in range(n)] + [-1] * padding
    return token_step, len(sizes)


@settings(max_examples=40, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 1000), norm=st.sampled_from(["block", "causal", "row"]))
def test_pooled_maps_equal_the_naive_double_loop(layout, seed, norm):
    token_step, n_steps = layout
    T = len(token_step)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, T, generator=generator, dtype=torch.float64).tril()  # causal saliency
    layout = StepLayout.from_token_step(torch.tensor(token_step), [0] + [1] * (n_steps - 1))
    members = layout.membership(dtype=torch.float64)
    got = normalize(pool(scores, members), members, norm)
    torch.testing.assert_close(got, naive_maps(scores, torch.tensor(token_step), n_steps, norm))


def test_per_head_pooling_is_per_head():
    layout = StepLayout.from_token_step(torch.tensor([0, 0, 1, 1, 1, 2]), [0, 1, 2])
    members = layout.membership(dtype=torch.float64)
    scores = torch.rand(3, 6, 6, dtype=torch.float64).tril()
    heads = pool(scores, members)
    for h in range(3):
        torch.testing.assert_close(heads[h], pool(scores[h], members))


def test_causal_counts_count_valid_pairs():
    layout = StepLayout.from_token_step(torch.tensor([0, 0, 1, 1, 1]), [0, 1])
    counts = causal_pair_counts(layout.membership())
    # step 0 (2 tokens) with itself: 3 valid pairs; step 1 -> step 0: 3*2; step 0 -> step 1: none
    assert counts.tolist() == [[3.0, 0.0], [6.0, 6.0]]


def test_unknown_normalisation():
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(torch.ones(2, 2), torch.ones(2, 3), "softmax")
