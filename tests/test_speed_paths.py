"""The two fast modes of issue 9, each against the path that defines it.

1. Step-Saliency's blockwise mode (the blockwise kernel (memory linear in T) equals the
   pattern-hook result, on every architecture family that loads.
2. StepFlow on a plain transformers model generates the hook path's tokens and statistics.
"""

import warnings

import pytest
import torch
from archs import make_arch_model
from conftest import BACKENDS
from tiny import THINK_TRACE
from torch.utils._python_dispatch import TorchDispatchMode

import stepsal
import stepsal.saliency
from stepsal import StepFlow, Trace, generate, step_saliency
from stepsal.blockwise import AttentionSpec, blockwise_attention, reference_attention
from stepsal.blockwise_layers import blockwise_problem

# ---------------------------------------------------------------- 1. the kernel and the blockwise mode

CHECK = " Let me check the product again."
LONG_TRACE = THINK_TRACE.replace(CHECK, CHECK * 12)


@pytest.mark.parametrize("variant",
                         [{}, {"softcap": 3.0}, {"window": 7}, {"sinks": True}, {"window": 5, "sinks": True}])
def test_blockwise_kernel_equals_full_attention_and_its_gradients(variant):
    torch.manual_seed(0)
    n_heads, n_kv, n_tokens = 6, 2, 45
    spec = AttentionSpec(scale=0.7, block=16, softcap=variant.get("softcap"), window=variant.get("window"),
                         sinks=torch.randn(n_heads) if variant.get("sinks") else None)
    q, k, v = (torch.randn(h, n_tokens, 8, requires_grad=True) for h in (n_heads, n_kv, n_kv))
    blocks = {}
    z = blockwise_attention(q, k, v, spec,  # the observer sees the kernel's buffers: it copies what it keeps
                            lambda start, key_start, a, g: blocks.update({start: (key_start, a.clone(), g.clone())}))
    grad_z = torch.randn_like(z)
    got = torch.autograd.grad(z, (q, k, v), grad_z)
    z_ref, pattern = reference_attention(q, k, v, spec)
    expected = torch.autograd.grad(z_ref, (q, k, v), grad_z, retain_graph=True)
    (grad_pattern,) = torch.autograd.grad(z_ref, pattern, grad_z)
    assert torch.allclose(z, z_ref, atol=1e-5)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert sorted(blocks) == [0, 16, 32]
    for start, (key_start, weights, grads) in blocks.items():
        rows, cols = slice(start, start + weights.shape[1]), slice(key_start, key_start + weights.shape[2])
        assert torch.allclose(weights, pattern[:, rows, cols], atol=1e-6)
        assert torch.allclose(grads, grad_pattern[:, rows, cols], atol=1e-5)  # dL/dA = dL/dz . v
        outside = torch.ones_like(pattern[:, rows], dtype=torch.bool)
        outside[:, :, cols] = False
        assert (pattern[:, rows][outside] == 0).all()  # keys a block leaves out have A = 0


# the families whose attention differs: grouped KV, sinks + sliding windows, softcapping, QK norms,
# multi-head latent attention, hybrid layers, GPT-2's absolute positions, partial rotary
FAMILIES = ["llama", "qwen2", "gpt_oss", "gemma2", "gemma3_text", "olmo2", "deepseek_v3", "bamba", "gpt2", "phi"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_long_trace_mode_equals_the_pattern_hooks(arch, backend, tokenizer, monkeypatch):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = stepsal.load_model(make_arch_model(arch, len(tokenizer)), tokenizer, backend=backend)
    except stepsal.UnsupportedModelError:
        pytest.skip(f"{arch} does not load on {backend} (docs/models.md)")
    assert blockwise_problem(model) is None
    monkeypatch.setattr(stepsal.saliency, "LOGIT_ROWS", 37)  # several chunks of logits
    trace = Trace.from_text(LONG_TRACE, model)  # longer than one block of queries
    for target in ("all", "summary", 5):
        pattern = step_saliency(model, trace, target=target, per_head=True, token_level=True, mode="patterns")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*blockwise kernel")  # no fallback
            linear = step_saliency(model, trace, target=target, per_head=True, token_level=True, mode="blockwise")
        assert linear.layers == pattern.layers
        for name in ("sums", "head_sums", "token_sums"):
            a, b = getattr(pattern, name), getattr(linear, name)
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (name, target)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_trace_mode_never_forms_an_attention_sized_tensor(tl_models, tokenizer, backend, monkeypatch):
    model = tl_models[("qwen2", backend)]
    trace = Trace.from_text(THINK_TRACE.replace(CHECK, CHECK * 22), tokenizer)  # T ~ 480
    n_tokens, n_heads = len(trace), model.cfg.n_heads
    with _LargestTensor() as watch:
        step_saliency(model, trace, mode="blockwise")
    assert n_tokens > 400
    assert watch.largest <= n_heads * 256 * n_tokens  # blocks of 256 queries x at most T keys
    with _LargestTensor() as watch:
        step_saliency(model, trace, mode="patterns")
    assert watch.largest >= n_heads * n_tokens * n_tokens  # the pattern path does form it
    for threshold, linear in ((n_tokens + 1, False), (n_tokens, True)):  # automatic: from BLOCKWISE_FROM tokens
        monkeypatch.setattr(stepsal.saliency, "BLOCKWISE_FROM", threshold)
        with _LargestTensor() as watch:
            step_saliency(model, trace)
        assert (watch.largest <= n_heads * 256 * n_tokens) == linear


def test_rule_g_falls_back_with_a_warning_and_the_same_result(tl_models, trace_for_g):
    model = tl_models[("llama", BACKENDS[0])]
    with pytest.warns(UserWarning, match="rule='g'"):
        long = step_saliency(model, trace_for_g, rule="g", mode="blockwise")
    normal = step_saliency(model, trace_for_g, rule="g", mode="patterns")
    assert torch.allclose(long.sums, normal.sums, rtol=1e-4, atol=1e-8)


@pytest.fixture(scope="module")
def trace_for_g(tokenizer):
    return Trace.from_text(THINK_TRACE, tokenizer)


# ---------------------------------------------------------------- 2. StepFlow on plain transformers

QUESTION = "<|im_start|>user\nWhat is 2+2 and then times 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
PROMPTS = [QUESTION + "First, we add the two numbers together. The sum of 2 and 2 is 4. Then",
           QUESTION + "We add.", QUESTION.replace("2+2", "12 + 30") + "First, the sum. Then we multiply"]


@pytest.mark.parametrize("site", ["resid_post", "z"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_generates_the_hook_paths_tokens_and_statistics(hf_models, tl_models, tokenizer, arch, site):
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=2.0, smi_site=site)
    injections = changed = 0
    for prompts in (PROMPTS[0], PROMPTS):  # one row, and a left-padded batch
        hooked = generate(tl_models[(arch, "bridge")], prompts, flow, max_new_tokens=16)
        fast = generate(hf_models[arch], prompts, flow, max_new_tokens=16, tokenizer=tokenizer)
        assert all(torch.equal(a, b) for a, b in zip(hooked.tokens, fast.tokens, strict=True))
        a, b = hooked.stats.to_dict(), fast.stats.to_dict()
        changed += a["oeb"][0]["changed"]
        injections += a["smi"][1]["injections"]
        for part, fields in (("oeb", ("rows", "changed", "mass_before", "mass_after")),
                             ("smi", ("injections", "mean_norm"))):
            for layer in a[part]:
                for field in fields:
                    expected = b[part][layer][field]  # None where nothing was changed
                    assert a[part][layer][field] == (
                        expected if expected is None else pytest.approx(expected, rel=1e-5))
    assert injections > 0 and changed > 0  # both parts acted


@pytest.mark.parametrize("arch", ["gpt_oss", "gemma2", "qwen3", "olmo3", "deepseek_v3"])
def test_fast_path_on_sinks_windows_softcapping_qk_norms_and_mla(arch, tokenizer):
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = stepsal.load_model(make_arch_model(arch, len(tokenizer)), tokenizer, backend="bridge")
    fast_model = make_arch_model(arch, len(tokenizer))  # the same weights, never wrapped by a bridge
    hooked = generate(bridge, PROMPTS, flow, max_new_tokens=12)
    fast = generate(fast_model, PROMPTS, flow, max_new_tokens=12, tokenizer=tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(hooked.tokens, fast.tokens, strict=True))
    assert hooked.stats.oeb_changed.tolist() == fast.stats.oeb_changed.tolist()
    assert hooked.stats.smi_count.tolist() == fast.stats.smi_count.tolist()
    assert torch.allclose(hooked.stats.oeb_after, fast.stats.oeb_after, rtol=1e-4)
    assert fast.stats.oeb_changed.sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_teacher_forced_logits_equal_the_hook_paths(hf_models, tl_models, tokenizer, arch):
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    flow = StepFlow(oeb_layers=[0, 1], smi_layers=[1], tau_max=0.9, alpha=2.0)
    with flow.attached(tl_models[(arch, "bridge")], trace) as hooked_run:
        expected = tl_models[(arch, "bridge")](trace.tokens[None], use_cache=False)
    with flow.attached(hf_models[arch], trace) as fast_run:
        got = hf_models[arch](trace.tokens[None]).logits
    plain = hf_models[arch](trace.tokens[None]).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (plain - expected).abs().max() > 1e-2  # StepFlow changed them
    assert fast_run.stats.oeb_changed.tolist() == hooked_run.stats.oeb_changed.tolist()
    assert fast_run.stats.smi_count.tolist() == hooked_run.stats.smi_count.tolist()
    assert torch.allclose(fast_run.stats.oeb_after, hooked_run.stats.oeb_after, rtol=1e-5)


def test_fast_path_leaves_the_model_as_it_was_also_after_an_exception(hf_models, tokenizer, monkeypatch):
    model = hf_models["qwen2"]
    before = model(torch.tensor([[5, 6, 7]])).logits
    module_hooks = lambda: [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks))  # noqa: E731
                     for name, m in model.named_modules()]
    hooks_before = module_hooks()  # a bridge over the same model (the session's fixtures) has its own
    flow = StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9, alpha=2.0)
    generate(model, PROMPTS[0], flow, max_new_tokens=4, tokenizer=tokenizer)
    import stepsal.stepflow.hooks as hooks

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks.FlowRun, "inject_momentum", broken)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, PROMPTS[0], flow, max_new_tokens=4, tokenizer=tokenizer)
    assert model.config._attn_implementation == "eager"
    assert module_hooks() == hooks_before
    assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, before)


def test_fast_path_needs_the_tokenizer(hf_models):
    with pytest.raises(stepsal.StepsalError, match="tokenizer"):
        generate(hf_models["llama"], PROMPTS[0], StepFlow(), max_new_tokens=2)


@pytest.mark.slow
def test_fast_path_on_the_reasoner_equals_the_bridge():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m-reasoner")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    bridge = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
    messages = [problem.messages() for problem in stepsal.load_problems(limit=3)]
    flow = StepFlow()
    hooked = generate(bridge, messages, flow, max_new_tokens=40)
    fast = generate(hf, messages, flow, max_new_tokens=40, tokenizer=tok)
    assert all(torch.equal(a, b) for a, b in zip(hooked.tokens, fast.tokens, strict=True))
    assert hooked.stats.oeb_changed.tolist() == fast.stats.oeb_changed.tolist()
    assert hooked.stats.smi_count.tolist() == fast.stats.smi_count.tolist()
    assert fast.stats.acted()


def test_nested_attaches_on_one_transformers_model_keep_the_outer_run(hf_models, tokenizer):
    """Attention routing is one registry with a stack per module: an inner attach that exits leaves
    the outer one acting (once, the inner exit removed the outer's entry), and the model is as it
    was after both."""
    model = hf_models["llama"]
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    plain = model(trace.tokens[None]).logits
    flow = StepFlow(oeb_layers=[0, 1], smi_layers=[], tau_max=0.9)
    with flow.attached(model, trace) as outer:
        once = model(trace.tokens[None]).logits
        with flow.attached(model, trace) as inner:
            model(trace.tokens[None])
        again = model(trace.tokens[None]).logits
    assert inner.stats.oeb_changed.sum() > 0
    assert outer.stats.oeb_changed.tolist() == [2 * n for n in inner.stats.oeb_changed.tolist()]
    torch.testing.assert_close(again, once)
    assert (once - plain).abs().max() > 1e-3
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(trace.tokens[None]).logits, plain)


def test_saliency_blockwise_mode_inside_a_stepflow_attach_routes_both(hf_models, tokenizer):
    """The blockwise kernel and the StepFlow fast path share the router: routing one model for one
    purpose leaves another model's routes alone."""
    from stepsal.backends.attention import _ROUTES

    flow = StepFlow(oeb_layers=[0], smi_layers=[], tau_max=0.9)
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    with flow.attached(hf_models["llama"], trace):
        with flow.attached(hf_models["qwen2"], trace):
            assert len(_ROUTES) == len(hf_models["llama"].model.layers) + len(hf_models["qwen2"].model.layers)
        hf_models["llama"](trace.tokens[None])
    assert not _ROUTES
