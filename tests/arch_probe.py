"""What stepsal does on one architecture and backend, checked against plain transformers.

``probe(arch, backend, tokenizer)`` returns one row of docs/models.md. Every "yes" in it has been
verified here (an AssertionError otherwise); anything stepsal cannot do must be a clear refusal
(``UnsupportedModelError``), whose short reason goes in the cell.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch
import torch.nn.functional as F
from archs import make_arch_model
from tiny import THINK_TRACE

import stepsal
from stepsal.errors import UnsupportedModelError
from stepsal.models import forward_kwargs

COLUMNS = ("load", "logits", "Step-Saliency", "StepFlow", "cached generation")
REL_TOL = 2e-4


def stack() -> str:
    from importlib.metadata import version

    return f"TL {version('transformer-lens')}"


def short_reason(error: Exception) -> str:
    """The cell text of a refusal: the first clause of the message, without numbers that drift."""
    message = str(error)
    if "does not support" in message:
        return "refused: no HookedTransformer adapter"
    if "logits differ" in message:
        return "refused: logits differ from transformers"
    if "cannot load" in message:
        kind = re.search(r"[(](\w+):", message)
        return f"refused: adapter fails ({kind.group(1) if kind else 'error'})"
    if "band (a quarter of the layers) has no layer" in message:
        return "refused: a default band has no softmax-attention layer"
    return "refused: " + message.split(":")[0][:60]


def hf_token_saliency(hf_model, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """|A * dL/dA| per layer [L, T, T] from transformers' eager attentions (retain_grad), mean over heads."""
    out = hf_model(tokens[None], output_attentions=True)
    attentions = dict(zip(_softmax_layers(hf_model.config), out.attentions, strict=False))
    for attention in attentions.values():
        attention.retain_grad()
    F.cross_entropy(out.logits[0, :-1], tokens[1:]).backward()
    result = torch.stack([(attentions[layer][0] * attentions[layer].grad[0]).abs().mean(0) for layer in layers])
    hf_model.zero_grad()
    return result.double()


def _softmax_layers(config) -> list[int]:
    """Layers whose attentions transformers returns (hybrid models return only the softmax ones)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [layer for layer, kind in enumerate(types) if kind != "linear_attention"]


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max()
    error = float((got.double() - expected.double()).abs().max() / scale)
    assert scale > 0 and error < REL_TOL, f"{what}: relative difference {error:.2e}"


def probe(arch: str, backend: str, tokenizer) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "-")
    hf = make_arch_model(arch, len(tokenizer))
    tokens = tokenizer(THINK_TRACE, return_tensors="pt").input_ids[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = stepsal.load_model(hf, tokenizer, backend=backend)
        except UnsupportedModelError as error:
            row["load"] = short_reason(error)
            return row
        row["load"] = "yes"
        with torch.no_grad():
            assert_close_relative(model(tokens[None], **forward_kwargs(model)), hf(tokens[None]).logits, "logits")
        row["logits"] = "yes"
        row["Step-Saliency"] = _saliency(model, hf, tokens, tokenizer)
        row["StepFlow"], row["cached generation"] = _stepflow(model, hf, tokens)
    return row


def _saliency(model, hf, tokens, tokenizer) -> str:
    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    layout = stepsal.StepLayout.from_token_step(torch.arange(len(trace)), trace.layout.token_segment.tolist())
    result = stepsal.step_saliency(model, dataclasses.replace(trace, layout=layout), norm="block")
    expected = hf_token_saliency(hf, tokens, result.layers)
    assert_close_relative(result.sums, expected, "token saliency")
    n_layers = model.cfg.n_layers
    return "yes" if result.layers == list(range(n_layers)) else f"layers {result.layers} (softmax attention)"


def _stepflow(model, hf, tokens) -> tuple[str, str]:
    flow = stepsal.StepFlow(tau_max=0.9, smi_window=4)  # random weights: a high target so OEB acts
    try:
        trace = stepsal.Trace.from_text(THINK_TRACE, model)
        with torch.no_grad():
            plain = model(tokens[None], **forward_kwargs(model))
            with flow.attached(model, trace) as run:
                steered = model(tokens[None], **forward_kwargs(model))
    except UnsupportedModelError as error:
        return short_reason(error), _cached_generation(model, hf, None)
    stats = run.stats.to_dict()
    changed = [layer for layer in stats["oeb"].values() if layer["changed"]]
    assert changed and all(layer["mass_after"] > layer["mass_before"] for layer in changed), stats["oeb"]
    assert all(layer["injections"] > 0 for layer in stats["smi"].values()), stats["smi"]
    assert not torch.allclose(plain, steered), "StepFlow did not change the logits"
    return _z_site(model, trace, tokens, plain), _cached_generation(model, hf, flow)


def _z_site(model, trace, tokens, plain) -> str:
    """SMI on hook_z (the reference's site) acts, or is refused up front."""
    flow = stepsal.StepFlow(oeb_layers=[], smi_window=4, smi_site="z")
    try:
        with torch.no_grad(), flow.attached(model, trace) as run:
            steered = model(tokens[None], **forward_kwargs(model))
    except UnsupportedModelError as error:
        assert "hook_z" in str(error), error
        return "yes on resid_post; smi_site='z' refused (hook_z does not split heads)"
    assert all(layer["injections"] > 0 for layer in run.stats.to_dict()["smi"].values())
    assert not torch.allclose(plain, steered), "SMI on hook_z did not change the logits"
    return "yes"


def _cached_generation(model, hf, flow) -> str:
    """Greedy generation equals transformers'; with StepFlow, cached equals uncached."""
    prompt = model.tokenizer("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<think>\nFirst",
                             return_tensors="pt").input_ids[0]
    plain = stepsal.generate(model, prompt, None, max_new_tokens=10, stop_at_eos=False).tokens[0]
    reference = prompt
    with torch.no_grad():  # the plainest greedy loop: no cache, no stopping rules
        for _ in range(10):
            reference = torch.cat([reference, hf(reference[None]).logits[0, -1].argmax()[None]])
    assert torch.equal(plain, reference), "generation differs from transformers' greedy generation"
    if flow is None:
        return "yes (without StepFlow)"
    runs = [stepsal.generate(model, prompt, flow, max_new_tokens=10, use_cache=cached, stop_at_eos=False).tokens[0]
            for cached in (True, False)]
    assert torch.equal(runs[0], runs[1]), "with StepFlow, cached and uncached generation differ"
    return "yes"
