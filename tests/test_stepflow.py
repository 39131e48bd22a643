import math
import re

import pytest
import torch
from conftest import ARCHS, BACKENDS, needs_hooked
from tiny import THINK_TRACE

import stepsal
from stepsal import StepFlow, Trace, generate
from stepsal.errors import StepsalError, TraceFormatError, UnsupportedModelError
from stepsal.stepflow.hooks import FlowRun, output_weights
from stepsal.stepflow.oeb import odds_equal_bridge
from stepsal.stepflow.tracker import WINDOW_CHARS, PhaseTracker
from stepsal.traces import QUESTION, SUMMARY, THINKING

PROMPT = ("<|im_start|>user\nWhat is 2+2 and then times 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
          "First, we add the two numbers together. The sum of 2 and 2 is 4. Then")


def naive_bridge(pattern, query_segment, key_segment, query_position, tau_max):
    """docs/paper.md section 6 written out row by row in float64: the probability-space projection."""
    out = pattern.clone().double()
    batch, heads, n_query, n_key = pattern.shape
    changed = torch.zeros(batch, heads, n_query, dtype=torch.bool)
    targets = torch.zeros(batch, heads, n_query, dtype=torch.float64)
    for b in range(batch):
        for i in range(n_query):
            t, segment = int(query_position[i]), int(query_segment[b, i])
            if segment not in (THINKING, SUMMARY):
                continue
            own, bridge = (THINKING, QUESTION) if segment == THINKING else (SUMMARY, THINKING)
            S = [k for k in range(n_key) if k <= t and key_segment[b, k] == own]
            B = [k for k in range(n_key) if k <= t and key_segment[b, k] == bridge]
            if not S or not B:
                continue
            for h in range(heads):
                row = pattern[b, h, i].double()
                p_s, p_b = row[S].sum(), row[B].sum()
                p_o = row.sum() - p_s - p_b
                tau_b = min(math.sqrt(len(B) / (len(B) + len(S))), tau_max, 1 - p_o)
                smallest = torch.finfo(torch.float32).tiny
                if not (smallest < p_b < tau_b) or p_s <= smallest:
                    continue
                new = row.clone()
                new[B] *= tau_b / p_b
                new[S] *= (1 - p_o - tau_b) / p_s
                out[b, h, i] = new
                changed[b, h, i] = True
                targets[b, h, i] = tau_b
    return out, changed, targets


def random_case(seed, batch=2, heads=3, n_key=12, n_query=12):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n_query, n_key, generator=generator) * 2
    positions = torch.arange(n_key - n_query, n_key)
    causal = torch.arange(n_key)[None, :] <= positions[:, None]
    pattern = torch.softmax(scores.masked_fill(~causal, -torch.inf), -1)
    segments = []
    for _ in range(batch):  # Q -> T -> S with random boundaries, some rows without a summary
        a = int(torch.randint(1, n_key // 2, (1,), generator=generator))
        c = int(torch.randint(a + 1, n_key + 1, (1,), generator=generator))
        segments.append([QUESTION] * a + [THINKING] * (c - a) + [SUMMARY] * (n_key - c))
    key_segment = torch.tensor(segments)
    return pattern, key_segment[:, n_key - n_query:], key_segment, positions


@pytest.mark.parametrize("tau_max", [0.15, 0.6, 0.95])
@pytest.mark.parametrize("n_query", [12, 1, 5])  # prefill, one decode step, a chunk
def test_oeb_equals_the_probability_space_projection(tau_max, n_query):
    for seed in range(8):
        pattern, query_segment, key_segment, positions = random_case(seed, n_query=n_query)
        edit = odds_equal_bridge(pattern, query_segment, key_segment, positions, tau_max)
        expected, changed, targets = naive_bridge(pattern, query_segment, key_segment, positions, tau_max)
        torch.testing.assert_close(edit.pattern.double(), expected, atol=1e-6, rtol=1e-5)
        # unchanged rows are bit-identical; rows still sum to 1; masked keys stay 0
        assert torch.equal(edit.pattern[~changed], pattern[~changed])
        torch.testing.assert_close(edit.pattern.sum(-1), pattern.sum(-1), atol=1e-5, rtol=0)
        assert (edit.pattern[..., positions[:, None] < torch.arange(pattern.shape[-1])] == 0).all()
        assert torch.isfinite(edit.pattern).all()
        # after the edit the bridge mass equals tau_B in every changed row (measured on the new pattern)
        assert torch.equal(edit.changed, changed)
        torch.testing.assert_close(edit.mass_after[changed].double(), targets[changed], atol=1e-5, rtol=0)


def test_oeb_leaves_question_rows_and_empty_groups_alone():
    pattern = torch.softmax(torch.randn(1, 2, 4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), -torch.inf), -1)
    question_only = torch.tensor([[QUESTION] * 4])
    edit = odds_equal_bridge(pattern, question_only, question_only, torch.arange(4), 0.9)
    assert not edit.changed.any() and torch.equal(edit.pattern, pattern)
    thinking_only = torch.tensor([[THINKING] * 4])  # bridge (question) empty: nothing to do, no NaN
    edit = odds_equal_bridge(pattern, thinking_only, thinking_only, torch.arange(4), 0.9)
    assert not edit.changed.any() and torch.equal(edit.pattern, pattern)


# ---------------------------------------------------------------- hooks in real models


@pytest.fixture(scope="module")
def trace(tokenizer):
    return Trace.from_text(THINK_TRACE, tokenizer)


def capture(model, names, tokens):
    """Activations by the names asked for (the bridge reports canonical names inside hooks)."""
    seen = {}

    def keeper(name):
        def keep(x, hook):
            seen[name] = x.detach().clone()
        return keep

    model.run_with_hooks(tokens, fwd_hooks=[(n, keeper(n)) for n in names])
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_oeb_hook_edits_every_query_row_exactly(tl_models, trace, backend):
    model = tl_models[("llama", backend)]
    flow = StepFlow(oeb_layers=[1], smi_layers=[], tau_max=0.9)
    name = "blocks.1.attn.hook_pattern"
    before = capture(model, [name], trace.tokens[None])[name]
    with flow.attached(model, trace) as run:
        after = capture(model, [name], trace.tokens[None])[name]
    segments = trace.layout.token_segment[None]
    expected, changed, _ = naive_bridge(before, segments, segments, torch.arange(len(trace)), 0.9)
    assert changed.sum() > 10
    torch.testing.assert_close(after.double(), expected, atol=1e-6, rtol=1e-5)
    stats = run.stats.to_dict()["oeb"][1]
    assert stats["changed"] == int(changed.sum())
    assert stats["rows"] == int(((segments == THINKING) | (segments == SUMMARY)).sum()) * model.cfg.n_heads
    assert stats["mass_after"] > stats["mass_before"]


def expected_momentum(model, trace, layer, window="step"):
    """alpha-free injected vectors at each step start, from a plain run's values (independent of FlowRun)."""
    values = capture(model, [f"blocks.{layer}.attn.hook_v"], trace.tokens[None])[f"blocks.{layer}.attn.hook_v"][0]
    thinking = [s for s in trace.layout.steps if s.segment == THINKING]
    vectors = {}
    for previous, step in zip(thinking, thinking[1:], strict=False):
        span = list(range(*previous.token_span))
        span = span if window == "step" else span[-window:]
        mean = values[span].mean(0)  # [kv_head, d_head]
        mean = mean.repeat_interleave(model.cfg.n_heads // mean.shape[0], dim=0)
        vectors[step.token_span[0]] = mean
    return vectors


@pytest.mark.parametrize("window", ["step", 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_smi_residual_diff_is_exactly_the_injected_vector(tl_models, trace, arch, backend, window):
    model = tl_models[(arch, backend)]
    alpha = 0.5
    flow = StepFlow(oeb_layers=[], smi_layers=[1], alpha=alpha, smi_window=window)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    plain = capture(model, names, trace.tokens[None])
    with flow.attached(model, trace) as run:
        steered = capture(model, names, trace.tokens[None])
    assert torch.equal(plain[names[0]], steered[names[0]]), "nothing changes before the SMI layer"
    diff = (steered[names[1]] - plain[names[1]])[0]
    vectors = expected_momentum(model, trace, 1, window)
    w_o = output_weights(model, 1)
    expected = torch.zeros_like(diff)
    for position, mean in vectors.items():
        expected[position] = alpha * torch.einsum("hd,hdm->m", mean, w_o)
    assert len(vectors) == 3
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-4)
    assert (diff[[p for p in range(len(trace)) if p not in vectors]] == 0).all(), "only step starts change"
    assert run.stats.to_dict()["smi"][1]["injections"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_smi_on_hook_z_adds_the_mean_value_per_head(tl_models, trace, backend):
    model = tl_models[("qwen2", backend)]
    flow = StepFlow(oeb_layers=[], smi_layers=[1], alpha=0.3, smi_site="z")
    name = "blocks.1.attn.hook_z"
    plain = capture(model, [name], trace.tokens[None])[name][0]
    with flow.attached(model, trace):
        steered = capture(model, [name], trace.tokens[None])[name][0]
    expected = torch.zeros_like(plain)
    for position, mean in expected_momentum(model, trace, 1).items():
        expected[position] = 0.3 * mean
    torch.testing.assert_close(steered - plain, expected, atol=1e-5, rtol=1e-4)


def test_smi_acts_in_every_layer_of_the_band_and_at_the_summary(tl_models, trace):
    model = tl_models[("llama", BACKENDS[0])]
    flow = StepFlow(oeb_layers=[], smi_layers=[0, 1], alpha=0.2, smi_at_summary=True)
    with flow.attached(model, trace) as run:
        model(trace.tokens[None])
    smi = run.stats.to_dict()["smi"]
    assert smi[0]["injections"] == smi[1]["injections"] == 4  # 3 step starts + the summary start
    summary_start = int((trace.layout.token_segment == SUMMARY).nonzero()[0])
    assert bool(run.inject[0, summary_start]) and int(run.source[0, summary_start]) == 3  # the last thinking step


@pytest.mark.parametrize("backend", BACKENDS)
def test_oeb_and_smi_give_the_same_result_in_either_registration_order(tl_models, trace, backend):
    model = tl_models[("qwen2", backend)]
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=0.5)
    results = []
    for order in (1, -1):
        run = FlowRun.for_trace(flow, model, trace)
        with model.hooks(fwd_hooks=run.hooks()[::order]):
            results.append(model(trace.tokens[None]))
        assert run.stats.to_dict()["oeb"][0]["changed"] > 0 and run.stats.to_dict()["smi"][1]["injections"] == 3
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], model(trace.tokens[None])), "StepFlow changed the logits"


def test_mechanistic_check_in_one_call(tl_models, trace):
    model = tl_models[("llama", BACKENDS[0])]
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=0.5)
    effect = stepsal.saliency_change(model, trace, flow)
    plain = stepsal.step_saliency(model, trace)
    torch.testing.assert_close(effect.without.sums, plain.sums)
    with flow.attached(model, trace):
        steered = stepsal.step_saliency(model, trace)
    torch.testing.assert_close(effect.with_flow.sums, steered.sums)
    expected = steered.metrics().question_share - plain.metrics().question_share
    torch.testing.assert_close(effect.delta["question_share"], expected)
    assert effect.delta["question_share"][0] > 0, "the bridge raises the question's share in the OEB layer"
    assert "d question_share" in effect.table()


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_stepflow_generation_is_the_same_with_and_without_kv_cache(tl_models, arch, backend):
    model = tl_models[(arch, backend)]
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=2.0)
    cached = generate(model, PROMPT, flow, max_new_tokens=16)
    uncached = generate(model, PROMPT, flow, max_new_tokens=16, use_cache=False)
    assert torch.equal(cached.tokens[0], uncached.tokens[0])
    assert cached.stats.to_dict()["oeb"][0]["changed"] > 0
    plain = generate(model, PROMPT, None, max_new_tokens=16)
    assert cached.stats.to_dict()["oeb"][0]["rows"] > 0 and plain.stats is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_equals_single_runs(tl_models, backend):
    model = tl_models[("qwen2", backend)]
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=2.0)
    prompts = [PROMPT, "<think>Short one. But we add the sums of it all now. Yes", PROMPT + " we multiply"]
    batch = generate(model, prompts, flow, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        single = generate(model, prompt, flow, max_new_tokens=10)
        assert torch.equal(batch.tokens[row], single.tokens[0])
        assert batch.texts[row] == single.text


def test_generation_returns_a_trace_ready_for_saliency(tl_models):
    model = tl_models[("llama", BACKENDS[0])]
    out = generate(model, PROMPT, StepFlow(tau_max=0.9), max_new_tokens=12)
    prompt_ids = torch.tensor(model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert torch.equal(out.tokens[0][:out.prompt_lengths[0]], prompt_ids)
    assert out.trace.text == model.tokenizer.decode(out.tokens[0])
    result = stepsal.step_saliency(model, out.trace)
    assert result.maps.shape[0] == model.cfg.n_layers


def all_hooks(model):
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_removed_after_an_exception_mid_generation(tl_models, backend, monkeypatch):
    model = tl_models[("llama", backend)]
    import stepsal.stepflow.hooks as hooks_module

    calls = {"n": 0}
    original = hooks_module.odds_equal_bridge

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # the prefill, two decode steps, then fail on the third
            raise RuntimeError("boom in the middle")
        return original(*args)

    monkeypatch.setattr(hooks_module, "odds_equal_bridge", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, PROMPT, StepFlow(oeb_layers=[0], smi_layers=[1]), max_new_tokens=30)
    assert calls["n"] == 4 and all_hooks(model) == 0


# ---------------------------------------------------------------- tracker


def test_tracker_agrees_with_trace_segmentation(tokenizer, trace):
    tracker = PhaseTracker(tokenizer, stepsal.FORMATS["think"], 1)
    segments, steps, injects = {}, {}, []
    for token in trace.tokens.tolist():
        for label in tracker.push([token])[0]:
            segments[label.position], steps[label.position] = label.segment, label.step
            if label.inject:
                injects.append(label.position)
    assert [segments[p] for p in range(len(trace))] == trace.layout.token_segment.tolist()
    thinking = [s for s in trace.layout.steps if s.segment == THINKING]
    for index, step in enumerate(thinking):
        assert all(steps[p] == index for p in range(*step.token_span))
    summary_start = int((trace.layout.token_segment == SUMMARY).nonzero()[0])
    assert injects == [s.token_span[0] for s in thinking[1:]] + [summary_start]
    assert len(tracker.rows[0].window) <= WINDOW_CHARS


def test_tracker_relabels_markers_split_across_tokens(tokenizer):
    fmt = stepsal.custom_format("[[BEGIN]]", "[[END]]")
    text = "Q: why? [[BEGIN]] First long reasoning sentence. Second long reasoning sentence. [[END]] Final answer."
    trace = Trace.from_text(text, tokenizer, fmt=fmt)
    tracker = PhaseTracker(tokenizer, fmt, 1)
    segments = {}
    for token in trace.tokens.tolist():
        for label in tracker.push([token])[0]:
            segments[label.position] = label.segment
    assert len(tokenizer("[[END]]", add_special_tokens=False)["input_ids"]) > 1
    assert [segments[p] for p in range(len(trace))] == trace.layout.token_segment.tolist()


# ---------------------------------------------------------------- bad input


def test_bad_configuration_is_refused(tl_models):
    model = tl_models[("llama", BACKENDS[0])]
    with pytest.raises(StepsalError, match=r"tau_max must lie in \(0, 1\)"):
        StepFlow(tau_max=1.0)
    with pytest.raises(StepsalError, match="alpha must be >= 0"):
        StepFlow(alpha=-0.1)
    with pytest.raises(StepsalError, match="smi_window"):
        StepFlow(smi_window=0)
    with pytest.raises(StepsalError, match="smi_site"):
        StepFlow(smi_site="mlp")
    with pytest.raises(StepsalError, match=r"oeb_layers \[7\] out of range.*0\.\.1"):
        generate(model, PROMPT, StepFlow(oeb_layers=[7]), max_new_tokens=2)
    with pytest.raises(StepsalError, match="smi_layers"):
        StepFlow(smi_layers=[-1]).layers(2)


def test_prompt_without_thinking_marker_is_refused(tl_models):
    model = tl_models[("llama", BACKENDS[0])]
    with pytest.raises(TraceFormatError, match="no thinking marker"):
        generate(model, "Question: what is 2+2?", StepFlow(), max_new_tokens=2)
    out = generate(model, "Question: what is 2+2?", StepFlow(), max_new_tokens=2, marker_in_output=True)
    assert out.stats.to_dict()["oeb"][0]["rows"] == 0  # reported, not hidden: it had nothing to act on


def test_model_that_ignores_pattern_edits_is_refused(tokenizer):
    from tiny import make_opt_bridge

    bridge = make_opt_bridge(tokenizer)
    with pytest.raises(UnsupportedModelError, match="StepFlow.*(never fire|discard edits to) hook_pattern"):
        generate(bridge, PROMPT, StepFlow(), max_new_tokens=2)


@needs_hooked
def test_generate_prefers_the_bridge(tl_models, hf_models, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="backend='bridge'"):
        generate(tl_models[("llama", "hooked")], PROMPT, None, max_new_tokens=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        generate(tl_models[("llama", "bridge")], PROMPT, None, max_new_tokens=2)
    folder = tmp_path / "saved"
    hf_models["llama"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from_name = generate(str(folder), PROMPT, StepFlow(tau_max=0.9), max_new_tokens=6)
    loaded = generate(tl_models[("llama", "bridge")], PROMPT, StepFlow(tau_max=0.9), max_new_tokens=6)
    assert torch.equal(from_name.tokens[0], loaded.tokens[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_oeb_during_cached_generation_on_prefill_and_decode_rows(tl_models, backend):
    """The prompt already holds the thinking marker (prefill q > 1), then single-token decode steps:
    the attention output equals the naively bridged pattern times the values, for every query row."""
    model = tl_models[("qwen2", backend)]
    calls = []

    def keep(kind):
        def hook(x, hook):
            calls.append((kind, x.detach().clone()))
        return hook

    names = {"pattern": "blocks.0.attn.hook_pattern", "v": "blocks.0.attn.hook_v", "z": "blocks.0.attn.hook_z"}
    with model.hooks(fwd_hooks=[(name, keep(kind)) for kind, name in names.items()]):  # registered first: sees A
        out = generate(model, PROMPT, StepFlow(oeb_layers=[0], smi_layers=[], tau_max=0.9), max_new_tokens=6)
    segments = out.trace.layout.token_segment[None]
    patterns = [x for kind, x in calls if kind == "pattern"]
    values = [x for kind, x in calls if kind == "v"]
    outputs = [x for kind, x in calls if kind == "z"]
    assert [p.shape[2] for p in patterns] == [out.prompt_lengths[0]] + [1] * 5
    cache = torch.cat(values, dim=1)  # every position's values, in order
    n_changed = 0
    for pattern, z in zip(patterns, outputs, strict=True):
        q, k = pattern.shape[2], pattern.shape[3]
        bridged, changed, _ = naive_bridge(pattern, segments[:, k - q:k], segments[:, :k], torch.arange(k - q, k), 0.9)
        v = cache[:, :k].repeat_interleave(model.cfg.n_heads // cache.shape[2], dim=2).double()
        expected = torch.einsum("bhqk,bkhd->bqhd", bridged, v)
        torch.testing.assert_close(z.double(), expected, atol=1e-5, rtol=1e-4)
        n_changed += int(changed.sum())
    assert n_changed > 20


def forced_decode_logits(model, flow, fmt, ids, prompt_length, use_cache):
    """generate()'s loop with the continuation forced: last-position logits at every step."""
    from stepsal.backends import adapter_for
    from stepsal.models import hooks_attached

    run, tracker = FlowRun(flow, model, 1, len(ids)), PhaseTracker(model.tokenizer, fmt, 1)
    for token in ids[:prompt_length]:
        run.label(tracker.push([token]))
    decoder, steps, n_new = adapter_for(model).decode_step(1, use_cache), [], prompt_length
    with torch.no_grad(), hooks_attached(model, run.hooks()):
        for length in range(prompt_length, len(ids) + 1):
            tokens = torch.tensor([ids[:length]])
            q = n_new if use_cache else length
            run.begin_forward(length - q, q)
            steps.append(decoder(tokens, torch.ones_like(tokens), q)[0, -1])
            if length < len(ids):
                run.label(tracker.push([ids[length]]))
            n_new = 1
    return torch.stack(steps), run


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_and_uncached_decoding_agree_across_a_split_marker(tl_models, tokenizer, backend):
    """A summary marker spelled over several tokens is relabelled when it completes; queries keep the
    labels they were processed with, so recomputing everything without a cache gives the same logits."""
    model = tl_models[("qwen2", backend)]
    fmt = stepsal.custom_format("[[BEGIN]]", "[[END]]")
    text = ("Q: why is that so? [[BEGIN]] First long reasoning sentence here. Second long reasoning "
            "sentence here. Third one. [[END]] The final answer is here.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokenizer("[[END]]", add_special_tokens=False)["input_ids"]) > 1
    prompt_length = len(tokenizer("Q: why is that so? [[BEGIN]] First", add_special_tokens=False)["input_ids"])
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=1.0, smi_at_summary=True)
    cached, run = forced_decode_logits(model, flow, fmt, ids, prompt_length, True)
    uncached, _ = forced_decode_logits(model, flow, fmt, ids, prompt_length, False)
    assert run.any_relabel and run.stats.to_dict()["smi"][1]["injections"] == 3  # 2 step starts + summary
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


def track(tokenizer, fmt, ids, read_prompt=False):
    """Tracker labels per position after the whole sequence (relabels applied); with
    ``read_prompt`` the ids are a prompt the tracker reads first, as generate() does."""
    tracker = PhaseTracker(tokenizer, fmt, 1)
    if read_prompt:
        tracker.read_prompts([ids])
    segments, steps, injects = {}, {}, []
    for token in ids:
        for label in tracker.push([token])[0]:
            segments[label.position], steps[label.position] = label.segment, label.step
            if label.inject:
                injects.append(label.position)
    return [segments[p] for p in range(len(ids))], [steps[p] for p in range(len(ids))], injects


def char_level_ids(tokenizer, text):
    """One id per byte (special tokens kept whole): splits '.' from ' The' and the like."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    ids = []
    for piece in re.split(r"(<think>|</think>)", text):
        if piece in ("<think>", "</think>"):
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids.extend(tokenizer.convert_tokens_to_ids(byte_chars[b]) for b in piece.encode())
    return ids


from hypothesis import (  # noqa: E402
    HealthCheck,
    given,
    settings,
    strategies as st,
)

WORDS = st.sampled_from(["add", "the", "sum", "of", "two", "numbers", "then", "check", "it", "again", "The",
                         "carefully", "12", "4.5", "x=3", "(a+b)", "so", "we", "get", "So", "Ok"])
SENTENCE = st.lists(WORDS, min_size=1, max_size=8).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sentences=st.lists(SENTENCE, min_size=1, max_size=8), separator=st.sampled_from([". ", ".\n", ".  \n"]),
       char_level=st.booleans())
def test_tracker_places_the_same_step_boundaries_as_traces(tokenizer, sentences, separator, char_level):
    text = "Question: why?\n<think>\n" + separator.join(sentences) + ".\n</think>\nThe answer is here."
    ids = char_level_ids(tokenizer, text) if char_level else tokenizer(text, add_special_tokens=False)["input_ids"]
    trace = Trace.from_tokens(ids, tokenizer, min_thinking_steps=1)
    segments, steps, injects = track(tokenizer, stepsal.FORMATS["think"], ids)
    assert segments == trace.layout.token_segment.tolist()
    thinking = [s for s in trace.layout.steps if s.segment == THINKING]
    expected_steps = [-1] * len(ids)
    for index, step in enumerate(thinking):
        expected_steps[step.token_span[0]:step.token_span[1]] = [index] * step.n_tokens
    assert steps == expected_steps
    summary_start = trace.marker_end_token(SUMMARY)
    assert injects == [s.token_span[0] for s in thinking[1:]] + [summary_start]


def test_token_texts_keep_sentencepiece_leading_spaces(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from stepsal.stepflow.tracker import token_texts

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(["The sum is four. The product is twelve."] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
    sentencepiece_like = AutoTokenizer.from_pretrained(tmp_path)
    texts = token_texts(sentencepiece_like)
    the = sentencepiece_like.convert_tokens_to_ids("\u2581The")
    assert sentencepiece_like.decode([the]) == "The"  # the decoder strips a first token's space...
    assert texts[the] == " The"  # ...which the tracker needs to see a sentence end before it


def test_layers_accept_numpy_integers_and_refuse_other_types():
    import numpy as np

    assert StepFlow(oeb_layers=np.arange(2), smi_layers=[np.int64(3)]).layers(4) == ([0, 1], [3])
    with pytest.raises(StepsalError, match="whole layer numbers"):
        StepFlow(oeb_layers=[0.5])


CJK_WORDS = st.sampled_from(["我们", "先", "把", "两个", "数", "相加", "然后", "乘以", "三", "检查", "结果", "再",
                             "12", "所以"])
CJK_SENTENCE = st.lists(CJK_WORDS, min_size=1, max_size=8).map("".join)


@settings(max_examples=80, deadline=None)
@given(sentences=st.lists(CJK_SENTENCE, min_size=1, max_size=8),
       stops=st.lists(st.sampled_from(["。", "！", "？", "。\n", ". ", "। ", "。。", "？！", "！ "]),
                      min_size=8, max_size=8),
       cuts=st.lists(st.integers(1, 4), min_size=200, max_size=200))
def test_tracker_and_traces_agree_on_the_sentence_ends_of_other_scripts(sentences, stops, cuts):
    """CJK stops need no space; other scripts' stops do. Token boundaries fall anywhere (chunks of
    1-4 characters), so a stop may share its token with the next sentence's first characters."""
    from stepsal.stepflow.tracker import RowTracker
    from stepsal.traces import align_tokens, segment_text

    body = "".join(sentence + stop for sentence, stop in zip(sentences, stops, strict=False))
    text = "问题：多少？\n<think>\n" + body + "\n</think>\n答案是十二。"
    tokens, position = [], 0
    for cut in cuts:
        if position >= len(text):
            break
        tokens.append(text[position:position + cut])
        position += cut
    offsets = [(sum(map(len, tokens[:i])), sum(map(len, tokens[:i + 1]))) for i in range(len(tokens))]
    token_step, steps = align_tokens(text, offsets, segment_text(text, "think"))
    expected = [-1] * len(tokens)
    thinking = [s for s in steps if s.segment == THINKING]
    for index, step in enumerate(thinking):
        expected[step.token_span[0]:step.token_span[1]] = [index] * step.n_tokens
    row, got = RowTracker(stepsal.FORMATS["think"]), {}
    for token in tokens:
        for label in row.push(token):
            got[label.position] = label.step if label.segment == THINKING else -1
    assert [got[p] for p in range(len(tokens))] == expected


def test_cjk_reasoning_is_split_into_steps(tokenizer):
    from stepsal.traces import segment_text

    text = ("<|im_start|>user\n2加2再乘以3是多少？<|im_end|>\n<think>\n首先我们把两个数相加得到四。"
            "然后我们把和乘以三得到十二。最后再检查一遍结果。\n</think>\n答案是十二。")
    segmentation = segment_text(text, "think")
    assert segmentation.step_segments.count(THINKING) == 3


HISTORY = ("<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n<think>\nEasy one here, we add one "
           "and one.\n</think>\nTwo.<|im_end|>\n<|im_start|>user\nAnd 2+2 then times 3?<|im_end|>\n"
           "<|im_start|>assistant\n")


@pytest.mark.parametrize("opened", [True, False])
def test_chat_history_markers_are_not_the_models(tl_models, tokenizer, opened):
    """A closed <think>...</think> earlier in the chat is history: the model's thinking is the new
    turn's, in the tracker (StepFlow acts there) and in the returned trace, also when cut off."""
    model = tl_models[("llama", "bridge")]
    prompt = HISTORY + ("<think>\nFirst, we add the two numbers together. The sum is 4. Then" if opened else "")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    labels, _, _ = track(tokenizer, stepsal.FORMATS["think"], ids, read_prompt=True)
    history_end = len(tokenizer(HISTORY, add_special_tokens=False)["input_ids"])
    assert all(labels[p] == QUESTION for p in range(history_end))
    if not opened:
        with pytest.raises(TraceFormatError, match="leaves no thinking marker"):
            generate(model, prompt, StepFlow(tau_max=0.9), max_new_tokens=2)
        return
    assert labels[len(ids) - 1] == THINKING
    out = generate(model, prompt, StepFlow(tau_max=0.9), max_new_tokens=4)  # cut off: no summary
    trace = out.trace
    assert trace.markers[0][0] == trace.text.index("<think>\nFirst")
    assert "Easy one here" in trace.layout.steps[0].text  # history is question


def test_stepflow_settings_round_trip_as_data():
    import json

    flow = StepFlow(oeb_layers=[2, 0], smi_layers=[5], tau_max=0.2, alpha=0.1, smi_window=4, smi_site="z",
                    smi_at_summary=True)
    data = json.loads(json.dumps(flow.to_dict()))
    assert data["oeb_layers"] == [0, 2] and data["smi_window"] == 4
    assert StepFlow.from_dict(data) == flow
    assert StepFlow.from_dict(StepFlow().to_dict()) == StepFlow()  # default bands stay default (None)
    with pytest.raises(StepsalError, match="unknown StepFlow settings"):
        StepFlow.from_dict({**data, "tau": 0.3})
    with pytest.raises(StepsalError, match="tau_max"):
        StepFlow.from_dict({**data, "tau_max": 2.0})  # validated as when built directly
