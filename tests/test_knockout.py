"""Knockout = masking the knocked-out keys out of the softmax (checked on the pre-softmax scores)."""

import pytest
import torch
from conftest import ARCHS, BACKENDS
from tiny import THINK_TRACE

import stepsal
from stepsal import StepFlow, Trace, generate, knockout, step_saliency
from stepsal.errors import StepsalError
from stepsal.models import forward_kwargs


@pytest.fixture(scope="module")
def trace(tokenizer):
    return Trace.from_text(THINK_TRACE, tokenizer)


def masked_scores_logits(model, trace, query_mask, key_mask, layers):
    """The independent computation: -inf on the knocked-out (query, key) scores before the softmax."""
    cut = query_mask[:, None] & key_mask[None, :]

    def mask(scores, hook):
        return scores.masked_fill(cut[None, None], float("-inf"))

    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", mask) for layer in layers]
    with torch.no_grad():
        return model.run_with_hooks(trace.tokens[None], fwd_hooks=hooks, **forward_kwargs(model))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("queries, keys", [("summary", "thinking"), ("thinking", "question"), ([5], [1, 2])])
def test_knockout_equals_masking_the_softmax(tl_models, trace, arch, backend, queries, keys):
    model = tl_models[(arch, backend)]
    from stepsal.studies import group_mask

    with torch.no_grad():
        plain = model(trace.tokens[None], **forward_kwargs(model))
        with knockout(model, trace, queries, keys, layers=[1]):
            knocked = model(trace.tokens[None], **forward_kwargs(model))
    expected = masked_scores_logits(model, trace, group_mask(trace, queries), group_mask(trace, keys), [1])
    torch.testing.assert_close(knocked, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(knocked, plain)
    assert sum(len(h._forward_hooks) for h in model.hook_dict.values()) == 0  # removed on exit


def test_knockout_of_chosen_heads_only(tl_models, trace):
    model = tl_models[("llama", "bridge")]
    seen = {}
    with knockout(model, trace, "summary", "thinking", layers=[0], heads=[2]):
        model.run_with_hooks(trace.tokens[None], fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                             lambda x, hook: seen.setdefault("p", x.detach()))],
                             use_cache=False)
    pattern = seen["p"][0]
    summary = trace.layout.token_segment == stepsal.SUMMARY
    thinking = trace.layout.token_segment == stepsal.THINKING
    assert pattern[2][summary][:, thinking].abs().max() == 0                    # head 2: gone
    assert pattern[1][summary][:, thinking].sum() > 0                            # head 1: untouched
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))  # rows still sum to 1


def test_knockout_works_with_saliency_and_cached_generation(tl_models, trace):
    model = tl_models[("qwen2", "bridge")]
    plain = step_saliency(model, trace)
    with knockout(model, trace, "summary", "thinking"):
        knocked = step_saliency(model, trace)
    summary, thinking = trace.layout.steps_of(stepsal.SUMMARY), trace.layout.steps_of(stepsal.THINKING)
    assert knocked.sums[:, summary][:, :, thinking].abs().max() == 0 < plain.sums[:, summary][:, :, thinking].max()
    prompt = trace.tokens[:60]
    with knockout(model, trace, "thinking", "question"):
        runs = [generate(model, prompt, StepFlow(tau_max=0.9), max_new_tokens=6, use_cache=cached).tokens[0]
                for cached in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_bad_knockouts_are_refused(tl_models, trace):
    model = tl_models[("llama", "bridge")]
    with pytest.raises(StepsalError, match="would lose every key"), knockout(model, trace, "question", "question"):
        pass
    with pytest.raises(StepsalError, match="unknown group 'answer'"), knockout(model, trace, "answer", "question"):
        pass
    with pytest.raises(StepsalError, match="steps must be indices"), knockout(model, trace, [99], "question"):
        pass
    with (pytest.raises(StepsalError, match="a token mask must have shape"),
          knockout(model, trace, torch.ones(3, dtype=torch.bool), "question")):
        pass


def test_layer_sweep_of_a_knockout_matches_running_each_layer_by_hand(tl_models, trace, tokenizer):
    from contextlib import nullcontext

    from stepsal.studies.sweep import measure

    model = tl_models[("qwen2", "bridge")]
    other = Trace.from_text(THINK_TRACE.replace("Let me check the product again.", "I check the product twice."),
                            tokenizer)
    traces = [trace, other]
    sweep = stepsal.layer_sweep(model, traces, lambda layer, t: knockout(model, t, "summary", "thinking",
                                                                          layers=[layer]), progress=False)
    assert list(sweep.frame.columns) == ["layer", "trace", "before", "after", "delta"] and len(sweep.frame) == 4
    for row in sweep.frame.itertuples():
        t = traces[row.trace]
        with torch.no_grad():
            plain = model(t.tokens[None], use_cache=False)[0]
            with knockout(model, t, "summary", "thinking", layers=[row.layer]):
                knocked = model(t.tokens[None], use_cache=False)[0]
        assert row.before == pytest.approx(measure("summary_loss", plain, plain, t))
        assert row.after == pytest.approx(measure("summary_loss", knocked, plain, t))
    table = sweep.summary(n_boot=200)
    assert (table.ci_low <= table.mean_delta).all() and (table.mean_delta <= table.ci_high).all()
    fig = sweep.plot(n_boot=50)
    axes = fig.axes
    assert len(axes) == 1
    nothing = stepsal.layer_sweep(model, traces, lambda layer: nullcontext(), metric="summary_kl", progress=False)
    assert (nothing.frame.delta == 0).all() and (nothing.frame.after == 0).all()
    kl = stepsal.layer_sweep(model, traces, lambda layer, t: knockout(model, t, "summary", "thinking", layers=[layer]),
                             metric="summary_kl", progress=False)
    assert (kl.frame.after > 0).all()
