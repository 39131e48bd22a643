"""Regression tests for what real reasoning models hit (issue: real models at the paper's scale):
placement and dtype, vocabularies larger than the tokenizer, declared contexts, adapters whose
logits drift, multi-head latent attention, hybrid linear attention, multi-device plumbing."""

import warnings

import pytest
import torch
from archs import make_arch_model
from conftest import BACKENDS, needs_hooked
from test_stepflow import capture
from tiny import THINK_TRACE, make_hf_model, make_opt_bridge, save_folder

import stepsal
from stepsal import StepFlow, Trace, generate, step_saliency
from stepsal.errors import UnsupportedModelError
from stepsal.models import _check_against_transformers, _check_placement, _Placement, _resolve_source
from stepsal.sites import attention_sites, probe_logits
from stepsal.stepflow.hooks import output_weights
from stepsal.traces import THINKING


@pytest.fixture(scope="module")
def saved_qwen2(tmp_path_factory, hf_models, tokenizer):
    return save_folder(tmp_path_factory.mktemp("saved") / "model", hf_models["qwen2"], tokenizer)


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stepsal.load_model(*args, **kwargs)


# ---------------------------------------------------------------- 1. device and dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["memory", "folder"])
def test_dtype_is_honoured_for_every_source(hf_models, tokenizer, saved_qwen2, backend, source):
    given = (hf_models["qwen2"], tokenizer) if source == "memory" else (str(saved_qwen2),)
    model = quiet_load(*given, backend=backend, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    tokens = tokenizer(THINK_TRACE, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf_models["qwen2"].double()(tokens).logits
        hf_models["qwen2"].float()
        got = model(tokens, **({"use_cache": False} if backend == "bridge" else {}))
    # HookedTransformer builds its rotary tables in float32: float64 agrees to ~1e-7, not 1e-15
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("source", ["memory", "folder"])
def test_the_bridge_source_is_moved_to_the_asked_device(hf_models, tokenizer, saved_qwen2, source):
    """The bug: an in-memory model stayed on the CPU when device='cuda' was asked. 'meta' stands
    in for a GPU here: the transformers model must arrive there before the bridge wraps it."""
    given = hf_models["qwen2"] if source == "memory" else str(saved_qwen2)
    hf_model, _ = _resolve_source(given, tokenizer, torch.float32, False, _Placement(torch.device("meta"), 1, None))
    assert {p.device.type for p in hf_model.parameters()} == {"meta"}
    assert next(hf_models["qwen2"].parameters()).device.type == "cpu"  # the caller's model stays put


def test_weights_left_on_another_device_are_refused(tl_models):
    model = tl_models[("llama", "bridge")]
    with pytest.raises(UnsupportedModelError, match=r"asked for device cuda:0 but the weights are on \['cpu'\]"):
        _check_placement(model, _Placement(torch.device("cuda", 0), 1, None), torch.float32)
    with pytest.raises(UnsupportedModelError, match="asked for torch.bfloat16"):
        _check_placement(model, _Placement(None, 1, None), torch.bfloat16)


def test_multi_device_plumbing(hf_models, tokenizer, saved_qwen2, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UnsupportedModelError, match=r"n_devices=2 needs 2 GPUs; this machine has 1"):
        stepsal.load_model(str(saved_qwen2), n_devices=2, backend="bridge")
    with pytest.raises(ValueError, match="pass the model's folder"):
        stepsal.load_model(hf_models["qwen2"], tokenizer, backend="bridge", device_map="auto")
    if "hooked" in BACKENDS:
        with pytest.raises(ValueError, match="n_devices=N"):
            stepsal.load_model(str(saved_qwen2), backend="hooked", device_map="auto")
    # an accelerate device map goes to from_pretrained, and the bridge keeps the placement
    from transformers import AutoModelForCausalLM

    asked = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: asked.append(kw.get("device_map")) or original(*a, **kw))
    model = quiet_load(str(saved_qwen2), backend="bridge", device_map={"": "cpu"})
    assert asked == [{"": "cpu"}]
    tokens = tokenizer(THINK_TRACE, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, use_cache=False), hf_models["qwen2"](tokens).logits,
                                   atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- 2. vocabulary beyond the tokenizer


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_with_ids_the_tokenizer_lacks(tokenizer, backend):
    """Qwen2.5 / R1-Distill-Qwen: 151936 embedding rows for 151665 tokens. Here 4x the tokenizer,
    sampled hot, so most picks have no text."""
    model = quiet_load(make_hf_model("qwen2", 4 * len(tokenizer)), tokenizer, backend=backend)
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<think>\nFirst, we add."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate(model, prompt, StepFlow(tau_max=0.9), max_new_tokens=24, do_sample=True, temperature=3.0,
                       seed=0, stop_at_eos=False)
    new = out.tokens[0][out.prompt_lengths[0]:]
    assert len(new) == 24 and (new >= len(tokenizer)).any(), "the case was not exercised"
    assert out.stats.to_dict()["oeb"][0]["rows"] > 0


# ---------------------------------------------------------------- 3. declared context


@needs_hooked
def test_hooked_transformer_uses_the_declared_context(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=40960)
    hf = Qwen3ForCausalLM(config).eval()
    model = quiet_load(hf, tokenizer, backend="hooked")
    assert model.cfg.n_ctx == 40960  # TransformerLens caps Qwen3 at 2048
    sentence = "Then we multiply the sum by 3 to get 12. "
    text = THINK_TRACE.replace("Let me check the product again.", sentence * 160)
    trace = Trace.from_text(text, model)
    assert len(trace) > 2048
    result = step_saliency(model, trace, layers=[0])
    assert torch.isfinite(result.sums).all() and result.sums.sum() > 0
    with torch.no_grad():  # rotary tables grew past 2048 exactly as transformers computes them
        torch.testing.assert_close(model(trace.tokens[None]), hf(trace.tokens[None]).logits, atol=5e-5, rtol=1e-4)


# ---------------------------------------------------------------- 4. logits checked at load


def test_logits_that_differ_from_transformers_are_refused(tl_models):
    model = tl_models[("llama", BACKENDS[0])]
    expected = probe_logits(model).clone()
    _check_against_transformers(model, expected, torch.float32)  # equal: accepted
    expected[0, 3, 7] += 2e-4 * expected.abs().max()
    with pytest.raises(UnsupportedModelError, match="logits differ from the transformers model's by .* Try the other"):
        _check_against_transformers(model, expected, torch.float32)


# ---------------------------------------------------------------- 5. multi-head latent attention


@pytest.fixture(scope="module")
def deepseek(tokenizer):
    return quiet_load(make_arch_model("deepseek_v3", len(tokenizer)), tokenizer, backend="bridge")


def test_mla_values_are_read_head_first_and_smi_adds_exactly_their_mean(deepseek, tokenizer):
    model, layer, alpha = deepseek, 1, 0.5
    assert attention_sites(model).value_layout[layer] == "head_pos"
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    name = f"blocks.{layer}.hook_resid_post"
    v_name = f"blocks.{layer}.attn.hook_v"
    plain = capture(model, [name, v_name], trace.tokens[None])
    with StepFlow(oeb_layers=[], smi_layers=[layer], alpha=alpha).attached(model, trace) as run:
        steered = capture(model, [name], trace.tokens[None])
    values = plain[v_name][0].transpose(0, 1)  # [pos, head, d_value]
    thinking = [s for s in trace.layout.steps if s.segment == THINKING]
    expected = torch.zeros_like(plain[name][0])
    for previous, step in zip(thinking, thinking[1:], strict=False):
        mean = values[list(range(*previous.token_span))].mean(0)
        expected[step.token_span[0]] = alpha * torch.einsum("hd,hdm->m", mean, output_weights(model, layer))
    torch.testing.assert_close(steered[name][0] - plain[name][0], expected, atol=1e-5, rtol=1e-4)
    assert run.stats.to_dict()["smi"][layer]["injections"] == len(thinking) - 1


def test_mla_hook_z_site_is_refused_up_front(deepseek, tokenizer):
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    with (pytest.raises(UnsupportedModelError, match="hook_z does not split heads.*smi_site='resid_post'"),
          StepFlow(smi_site="z").attached(deepseek, trace)):
        pass


# ---------------------------------------------------------------- 6. hybrid linear attention


@pytest.fixture(scope="module")
def qwen3_next(tokenizer):
    try:
        return quiet_load(make_arch_model("qwen3_next", len(tokenizer)), tokenizer, backend="bridge")
    except UnsupportedModelError as error:
        assert "cannot load Qwen3NextForCausalLM" in str(error)  # TL 3.9's adapter: a clear refusal
        pytest.skip("this TransformerLens cannot load Qwen3-Next (docs/models.md)")


def test_hybrid_models_use_their_softmax_layers_and_refuse_the_others(qwen3_next, tokenizer):
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    assert attention_sites(qwen3_next).attention_layers == [0, 3]
    assert step_saliency(qwen3_next, trace).layers == [0, 3]
    with pytest.raises(UnsupportedModelError, match=r"layers \[1\] never fire hook_pattern.*Layers with a usable "
                                                    r"pattern: \[0, 3\]"):
        step_saliency(qwen3_next, trace, layers=[1, 3])
    with (pytest.raises(UnsupportedModelError, match=r"Odds-Equal Bridge.*layers \[2\] never fire"),
          StepFlow(oeb_layers=[2]).attached(qwen3_next, trace)):
        pass
    assert StepFlow().layers_for(qwen3_next) == ([0], [3])


# ---------------------------------------------------------------- 7. clear refusals at load


@needs_hooked
def test_hooked_transformer_refusals_name_the_other_backend(tokenizer):
    for arch in ("phi", "gemma2"):  # phi-2 used to raise a raw AttributeError
        with pytest.raises(UnsupportedModelError, match="HookedTransformer does not support .*backend='bridge'"):
            quiet_load(make_arch_model(arch, len(tokenizer)), tokenizer, backend="hooked")


def test_hybrid_bands_keep_their_attention_layers_and_alpha_zero_turns_smi_off(tokenizer):
    """Bamba-like: attention at layers 3 and 7 of 8 (the rest Mamba-2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("bamba", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                  attn_layer_indices=[3, 7], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
                                  mamba_d_state=8, mamba_chunk_size=16)
    torch.manual_seed(0)
    model = quiet_load(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), tokenizer,
                       backend="bridge")
    assert StepFlow(oeb_layers=[3]).layers_for(model) == ([3], [7])
    assert StepFlow(oeb_layers=[3], alpha=0.0).layers_for(model) == ([3], [])
    assert "OEB layers [3]" in StepFlow(oeb_layers=[3]).describe(model)
    with pytest.raises(UnsupportedModelError,
                       match=r"default OEB band .* Choose oeb_layers / smi_layers among \[3, 7\]"):
        StepFlow().layers_for(model)  # bottom quarter = layers 0-1: Mamba only
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    out = generate(model, trace.tokens[:60], StepFlow(oeb_layers=[3], tau_max=0.9), max_new_tokens=6,
                   stop_at_eos=False)  # cached generation keeps the Mamba state
    assert len(out.tokens[0]) == 66


def test_modules_kept_in_float32_are_accepted(tokenizer, tmp_path):
    """GPT-OSS keeps its router in float32 under float16 (transformers' _keep_in_fp32_modules)."""
    hf = make_arch_model("gpt_oss", len(tokenizer))
    hf.save_pretrained(tmp_path / "oss")
    tokenizer.save_pretrained(tmp_path / "oss")
    model = quiet_load(str(tmp_path / "oss"), backend="bridge", dtype=torch.float16)
    dtypes = {p.dtype for p in model.parameters()}
    assert torch.float16 in dtypes


def test_models_with_no_usable_attention_are_refused_clearly(tokenizer):
    bridge = make_opt_bridge(tokenizer)
    bridge.requires_grad_(False)  # frozen: the probe's logits hold no graph
    trace = Trace.from_text(THINK_TRACE, tokenizer)
    with pytest.raises(UnsupportedModelError, match="Step-Saliency on .*hook_pattern"):
        step_saliency(bridge, trace)
