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
