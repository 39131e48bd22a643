import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, BACKENDS, needs_hooked
from test_pooling import naive_maps
from tiny import THINK_TRACE, make_hf_model

import stepsal
from stepsal import StepLayout, StepSaliency, Trace, step_saliency
from stepsal.errors import ModelMismatchError, NonFiniteGradientError


def hf_token_saliency(hf_model, tokens, target_fn, rule="ag"):
    """Token-level saliency [L, T, T] from plain transformers: eager attention, retain_grad()."""
    hf_model.zero_grad()
    out = hf_model(tokens[None], output_attentions=True)
    for attention in out.attentions:
        attention.retain_grad()
    target_fn(out.logits[0]).backward()
    layers = []
    for attention in out.attentions:
        a, g = attention[0].detach(), attention.grad[0]
        scores = {"ag": (a * g).abs(), "ag_signed": a * g, "g": g.abs()}[rule]
        layers.append(scores.mean(0))
    hf_model.zero_grad()
    return torch.stack(layers).double()


def mean_next_token_loss(logits, tokens):
    return F.cross_entropy(logits[:-1], tokens[1:])


def assert_close_relative(got, expected, tol=2e-4):
    scale = expected.abs().max()
    assert scale > 0
    assert (got.double() - expected).abs().max() / scale < tol


@pytest.fixture(scope="module")
def trace(tokenizer):
    return Trace.from_text(THINK_TRACE, tokenizer)


def token_level(trace):
    """The same trace with every token its own step: block sums are then token-level saliency."""
    layout = StepLayout.from_token_step(torch.arange(len(trace)), trace.layout.token_segment.tolist())
    return dataclasses.replace(trace, layout=layout)


@pytest.mark.parametrize("rule", ["ag", "ag_signed", "g"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_token_saliency_equals_transformers_eager(tl_models, hf_models, trace, arch, backend, rule):
    expected = hf_token_saliency(hf_models[arch], trace.tokens, lambda lg: mean_next_token_loss(lg, trace.tokens), rule)
    result = step_saliency(tl_models[(arch, backend)], token_level(trace), rule=rule, norm="block")
    assert result.sums.shape == expected.shape
    assert_close_relative(result.sums, expected)


@pytest.mark.parametrize("norm", ["block", "causal", "row"])
def test_step_maps_equal_naive_pooling_of_transformers_saliency(tl_models, hf_models, trace, norm):
    token = hf_token_saliency(hf_models["qwen2"], trace.tokens, lambda lg: mean_next_token_loss(lg, trace.tokens))
    result = step_saliency(tl_models[("qwen2", BACKENDS[0])], trace, norm=norm)
    n_steps = trace.layout.n_steps
    expected = torch.stack([naive_maps(layer, trace.layout.token_step, n_steps, norm) for layer in token])
    assert result.maps.shape == (2, n_steps, n_steps)
    assert_close_relative(result.maps, expected)


def test_targets_match_transformers(tl_models, hf_models, trace):
    hf, model, tokens = hf_models["llama"], tl_models[("llama", BACKENDS[0])], trace.tokens
    summary = (trace.layout.token_segment == stepsal.SUMMARY).nonzero().flatten()
    answer_start = trace.text.rindex("12")
    answer = [t for t, (s, e) in enumerate(trace.offsets) if s < answer_start + 2 and e > answer_start]
    cases = {
        "summary": (dict(target="summary"), lambda lg: F.cross_entropy(lg[summary - 1], tokens[summary])),
        "answer": (dict(target="answer", answer="12"),
                   lambda lg: F.cross_entropy(lg[torch.tensor(answer) - 1], tokens[answer])),
        "logit": (dict(target=7), lambda lg: lg[-1, 7]),
        "callable": (dict(target=lambda lg: lg[-3:].logsumexp(-1).sum()), lambda lg: lg[-3:].logsumexp(-1).sum()),
    }
    for name, (kwargs, reference) in cases.items():
        expected = hf_token_saliency(hf, tokens, reference)
        got = step_saliency(model, token_level(trace), norm="block", **kwargs)
        assert_close_relative(got.sums, expected), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_mode_equals_patterns_mode(tl_models, trace, arch, backend):
    model = tl_models[(arch, backend)]
    normal = step_saliency(model, trace, per_head=True, mode="patterns")
    long = step_saliency(model, trace, per_head=True, mode="blockwise")
    assert_close_relative(long.sums, normal.sums.double(), tol=1e-5)
    assert_close_relative(long.head_sums, normal.head_sums.double(), tol=1e-5)


@needs_hooked
@pytest.mark.parametrize("arch", ARCHS)
def test_backends_agree(tl_models, trace, arch):
    hooked = step_saliency(tl_models[(arch, "hooked")], trace)
    bridge = step_saliency(tl_models[(arch, "bridge")], trace)
    assert_close_relative(bridge.maps, hooked.maps.double(), tol=1e-4)


def test_head_maps_average_to_layer_maps_and_layers_subset(tl_models, trace):
    model = tl_models[("qwen2", BACKENDS[0])]
    full = step_saliency(model, trace, per_head=True)
    assert full.head_maps.shape == (2, 4, trace.layout.n_steps, trace.layout.n_steps)
    torch.testing.assert_close(full.head_maps.mean(1), full.maps, rtol=1e-5, atol=1e-12)
    for mode in ("patterns", "blockwise"):  # the backward pass stops at the lowest requested layer
        second = step_saliency(model, trace, layers=[1], mode=mode)
        assert second.layers == [1]
        torch.testing.assert_close(second.sums[0], full.sums[1])


def test_save_and_load_round_trip(tl_models, trace, tmp_path):
    result = step_saliency(tl_models[("gpt2", BACKENDS[0])], trace, per_head=True, norm="row")
    path = result.save(tmp_path / "result.safetensors")
    again = StepSaliency.load(path)
    assert torch.equal(again.sums, result.sums) and torch.equal(again.head_sums, result.head_sums)
    assert (again.norm, again.rule, again.target, again.layers) == ("row", "ag", "all", [0, 1])
    assert again.layout.steps == result.layout.steps
    torch.testing.assert_close(again.maps, result.maps)


# ---------------------------------------------------------------- bad input


def test_trace_longer_than_context(tokenizer, trace):
    small = make_hf_model("llama", len(tokenizer))
    small.config.max_position_embeddings = 32
    model = stepsal.load_model(small, tokenizer)
    with pytest.raises(ModelMismatchError, match="context of 32"):
        step_saliency(model, trace)


def test_tokenizer_does_not_match_model(tl_models, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["a completely different corpus of words"] * 5,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=raw)
    foreign = Trace.from_text(THINK_TRACE, other)
    with pytest.raises(ModelMismatchError, match="different tokenizer"):
        step_saliency(tl_models[("llama", BACKENDS[0])], foreign)


def test_token_ids_outside_the_vocabulary(tl_models, trace):
    bad = dataclasses.replace(trace, tokens=trace.tokens.clone(), tokenizer_fingerprint="")
    bad.tokens[3] = 10_000
    with pytest.raises(ModelMismatchError, match="vocabulary"):
        step_saliency(tl_models[("llama", BACKENDS[0])], bad)


@pytest.mark.parametrize("mode", ["patterns", "blockwise"])
def test_nan_gradients_are_reported(tl_models, trace, mode):
    def nan_gradient(logits):  # value 0, gradient inf * 0 = NaN
        return torch.sqrt(logits[-1, 0] - logits[-1, 0])

    with pytest.raises(NonFiniteGradientError, match="NaN/inf saliency"):
        step_saliency(tl_models[("llama", "bridge")], trace, target=nan_gradient, mode=mode)
    with pytest.raises(NonFiniteGradientError, match="target value is nan"):
        step_saliency(tl_models[("llama", BACKENDS[0])], trace, target=lambda lg: lg.sum() * float("nan"))


def test_bad_arguments(tl_models, trace):
    model = tl_models[("llama", BACKENDS[0])]
    with pytest.raises(ValueError, match="unknown rule"):
        step_saliency(model, trace, rule="ig")
    with pytest.raises(ValueError, match="unknown normalisation"):
        step_saliency(model, trace, norm="softmax")
    with pytest.raises(ValueError, match="layers must be"):
        step_saliency(model, trace, layers=[5])
    with pytest.raises(ValueError, match="scalar"):
        step_saliency(model, trace, target=lambda lg: lg[-1])
    with pytest.raises(ValueError, match="needs answer="):
        step_saliency(model, trace, target="answer")
    with pytest.raises(ValueError, match="does not occur"):
        step_saliency(model, trace, target="answer", answer="forty-two")


def all_hooks(model):
    hook_points = [len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values()]
    block_pre_hooks = [len(b._forward_pre_hooks) for b in model.blocks]
    return sum(hook_points) + sum(block_pre_hooks)


@pytest.mark.parametrize("mode", ["patterns", "blockwise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_removed_and_parameters_restored_when_an_exception_escapes(tl_models, trace, backend, mode):
    model = tl_models[("llama", backend)]
    flags = [p.requires_grad for p in model.parameters()]
    before = all_hooks(model)

    def failing(logits):
        raise KeyError("boom inside the target")

    with pytest.raises(KeyError, match="boom"):
        step_saliency(model, trace, target=failing, mode=mode)
    assert all_hooks(model) == before == 0
    assert [p.requires_grad for p in model.parameters()] == flags
    step_saliency(model, trace, mode=mode)  # and it still works afterwards


def test_runtime_shape_checking_is_active():
    """The suite runs under jaxtyping's import hook: wrong shapes fail loudly."""
    from stepsal.pooling import pool

    with pytest.raises(Exception, match="(?i)type-check|shape|dimension"):
        pool(torch.ones(4, 5), torch.ones(2, 4))


def test_result_metrics_and_figure(tl_models, trace, tmp_path):
    from stepsal.vis.figures import plot_step_maps, step_labels

    result = step_saliency(tl_models[("llama", BACKENDS[0])], trace)
    assert step_labels(trace.layout) == ["Q", "T1", "T2", "T3", "T4", "S1", "S2"]
    figure = plot_step_maps(result.maps, result.layers, result.layout, path=tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 10_000 and len(figure.axes) >= 2
    with pytest.raises(ValueError, match="were not computed"):
        plot_step_maps(result.maps, result.layers, result.layout, panels=[7])


@pytest.mark.parametrize("mode", ["patterns", "blockwise"])
def test_no_attention_sized_tensor_outlives_the_call(tl_models, trace, mode):
    """A gradient hook that closes over its own tensor leaks it through a C++ reference cycle."""
    import gc

    model = tl_models[("qwen2", BACKENDS[0])]
    T = len(trace)

    def live_patterns():
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[-2:] == (T, T)]

    before = len(live_patterns())
    step_saliency(model, trace, mode=mode)
    step_saliency(model, trace, mode=mode, target=lambda lg: lg[-1, 3])
    assert len(live_patterns()) == before


def test_saliency_options_as_one_object(tl_models, trace):
    """SaliencyOptions carries every setting: the same result as the keywords, and not both at once."""
    from stepsal.options import SaliencyOptions

    model = tl_models[("llama", "bridge")]
    options = SaliencyOptions(target="summary", rule="ag_signed", norm="row", per_head=True, layers=[1, 0])
    via_options = step_saliency(model, trace, options=options)
    via_keywords = step_saliency(model, trace, target="summary", rule="ag_signed", norm="row", per_head=True,
                                 layers=[0, 1])
    torch.testing.assert_close(via_options.sums, via_keywords.sums)
    torch.testing.assert_close(via_options.head_sums, via_keywords.head_sums)
    assert (via_options.rule, via_options.norm, via_options.layers) == ("ag_signed", "row", [0, 1])
    with pytest.raises(stepsal.StepsalError, match=r"options= and the settings \['rule'\]"):
        step_saliency(model, trace, rule="g", options=options)
    with pytest.raises(stepsal.StepsalError, match="unknown normalisation"):
        SaliencyOptions.from_dict({"norm": "softmax"})
    assert SaliencyOptions.from_dict(options.to_dict()) == options


def test_results_keep_their_options_through_save_and_load(tl_models, trace, tmp_path):
    from stepsal.options import SaliencyOptions

    model = tl_models[("llama", "bridge")]
    result = step_saliency(model, trace, target="summary", norm="row", layers=[1])
    assert result.options == SaliencyOptions(target="summary", norm="row", layers=(1,))
    assert StepSaliency.load(result.save(tmp_path / "r.safetensors")).options == result.options
    custom = step_saliency(model, trace, target=lambda logits: logits[-1, 3], layers=[1])
    assert custom.options is not None and callable(custom.options.target)
    assert StepSaliency.load(custom.save(tmp_path / "c.safetensors")).options is None  # a callable is not saved



def test_checkpoint_is_the_deprecated_name_of_mode(tl_models, trace):
    """checkpoint=True/False still works (blockwise/patterns) with a DeprecationWarning, and not beside mode=."""
    model = tl_models[("llama", "bridge")]
    with pytest.warns(DeprecationWarning, match="mode='blockwise'"):
        old = step_saliency(model, trace, checkpoint=True)
    assert old.options.mode == "blockwise"
    torch.testing.assert_close(old.sums, step_saliency(model, trace, mode="blockwise").sums)
    with pytest.warns(DeprecationWarning):
        assert step_saliency(model, trace, checkpoint=False).options.mode == "patterns"
    with pytest.raises(stepsal.StepsalError, match="not checkpoint= as well"):
        step_saliency(model, trace, checkpoint=True, mode="blockwise")
