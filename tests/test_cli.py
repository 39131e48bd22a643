import json

import pytest
import torch
from tiny import THINK_TRACE

import stepsal
from stepsal import StepSaliency
from stepsal.cli import example_trace_text, main


def test_analyze_writes_a_report_that_matches_the_api(tmp_path, hf_models, tokenizer, capsys):
    folder = tmp_path / "tiny-model"
    hf_models["llama"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trace_file = tmp_path / "trace.txt"
    trace_file.write_text(THINK_TRACE)
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(folder), "--trace", str(trace_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-layer measures" in printed and "lock_in" in printed
    assert (out / "step_maps.png").stat().st_size > 10_000
    saved = StepSaliency.load(out / "saliency.safetensors")
    model = stepsal.load_model(str(folder))
    direct = stepsal.step_saliency(model, stepsal.Trace.from_text(THINK_TRACE, model))
    torch.testing.assert_close(saved.sums, direct.sums)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(direct.metrics().per_trace())


def test_analyze_needs_exactly_one_trace_source(tmp_path):
    with pytest.raises(SystemExit, match="either --example or --trace"):
        main(["analyze", "--out", str(tmp_path)])


def test_example_trace_is_shipped():
    text = example_trace_text()
    assert "<think>" in text and "</think>" in text and "<|im_start|>assistant" in text


@pytest.mark.slow
def test_demo_on_the_embedded_model(tmp_path, capsys):
    """`make demo`: SmolLM2-135M on the shipped example trace."""
    assert main(["analyze", "--example", "--out", str(tmp_path)]) == 0
    result = StepSaliency.load(tmp_path / "saliency.safetensors")
    assert result.sums.shape == (30, 10, 10) and torch.isfinite(result.sums).all()
    kinds = [s.kind for s in result.layout.steps]
    assert kinds == ["question"] + ["thinking"] * 7 + ["summary"] * 2
    assert "Step-Saliency (ag, target all)" in capsys.readouterr().out


def test_generate_command_with_stepflow(tmp_path, hf_models, tokenizer, capsys):
    folder = tmp_path / "tiny-model"
    hf_models["qwen2"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nFirst, we add them. Then"
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folder), "--prompt", prompt, "--stepflow", "--tau-max", "0.9",
                 "--oeb-layers", "0", "--smi-layers", "1", "--max-new-tokens", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "StepFlow(OEB layers [0]" in printed and "TransformerBridge" in printed and "OEB  layer" in printed
    record = json.loads((out / "generation.json").read_text())
    model = stepsal.load_model(str(folder), backend="bridge")
    expected = stepsal.generate(model, prompt, stepsal.StepFlow(oeb_layers=[0], smi_layers=[1], tau_max=0.9),
                                max_new_tokens=8)
    assert record["tokens"] == expected.tokens[0].tolist() and record["text"] == expected.text
    assert record["stats"]["oeb"]["0"]["changed"] == expected.stats.to_dict()["oeb"][0]["changed"] > 0


def test_generate_command_bad_layers(tmp_path):
    with pytest.raises(SystemExit, match="layers must look like"):
        main(["generate", "--prompt", "x", "--stepflow", "--oeb-layers", "a,b", "--out", str(tmp_path)])


def test_generate_command_flow_options_need_stepflow(tmp_path):
    with pytest.raises(SystemExit, match="need --stepflow"):
        main(["generate", "--prompt", "x", "--oeb-layers", "0,1", "--out", str(tmp_path)])
