import argparse
import json
import re

import pytest
import torch
from tiny import THINK_TRACE, save_folder

import stepsal
from stepsal import StepSaliency
from stepsal.cli import as_flags, example_trace_text, main


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
    report = (out / "report.html").read_text()
    assert report.count("var CircuitsVis=") == 1 and report.count('class="stepsal-widget"') == 3
    saved = StepSaliency.load(out / "saliency.safetensors")
    model = stepsal.load_model(str(folder))
    direct = stepsal.step_saliency(model, stepsal.Trace.from_text(THINK_TRACE, model))
    torch.testing.assert_close(saved.sums, direct.sums)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(direct.metrics().per_trace())


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, hf_models, tokenizer):
    return save_folder(tmp_path_factory.mktemp("models") / "tiny-llama", hf_models["llama"], tokenizer)


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(args, capsys, expected):
    code, out, err = run_cli(args, capsys)
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("stepsal ")]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith(f"stepsal {args[0]}: error: "), err
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in err
    return out


NO_MODEL = ["--model", "no-such-model"]  # the trace and --out checks must come first: no model is loaded


@pytest.mark.parametrize("case", ["no source", "missing file", "folder", "no marker", "too few steps",
                                  "unwritable out", "missing model"])
def test_analyze_errors_are_one_line_and_come_before_the_model(case, tmp_path, capsys):
    good = tmp_path / "trace.txt"
    good.write_text(THINK_TRACE)
    args = {
        "no source": (["--out", str(tmp_path / "o")], "pass either --example or --trace"),
        "missing file": (["--trace", str(tmp_path / "nope.txt")], "no such file"),
        "folder": (["--trace", str(tmp_path)], "is a folder"),
        "no marker": (["--trace", _write(tmp_path, "a.txt", "Just an answer. Nothing else here at all.")],
                      "thinking marker .* not found"),
        "too few steps": (["--trace", _write(tmp_path, "b.txt",
                                             THINK_TRACE.split("The sum of")[0] + "</think>\nFour.")],
                          "fewer than --min-steps 2"),
        "unwritable out": (["--trace", str(good), "--out", str(good / "sub")], "not a writable folder"),
        "missing model": (["--trace", str(good), "--out", str(tmp_path / "o")], "neither an embedded model"),
    }[case]
    one_line_error(["analyze", *NO_MODEL, *args[0]], capsys, args[1])


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


def test_a_too_long_trace_is_one_line_without_the_step_listing(tmp_path, tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "short-context"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = one_line_error(["analyze", "--model", str(folder), "--trace", _write(tmp_path, "t.txt", THINK_TRACE),
                          "--out", str(tmp_path / "o")], capsys, r"has \d+ tokens \(7 steps\) but .* context of 64")
    assert "tokens 0" not in out  # no step listing before the error


def test_generate_errors_are_one_line(tmp_path, capsys):
    one_line_error(["generate", *NO_MODEL, "--prompt", "x", "--max-new-tokens", "0", "--out", str(tmp_path)],
                   capsys, "--max-new-tokens must be at least 1")
    one_line_error(["generate", *NO_MODEL, "--out", str(tmp_path)], capsys, "either --prompt")
    one_line_error(["generate", "--prompt", "x", "--stepflow", "--oeb-layers", "a,b", "--out", str(tmp_path)],
                   capsys, "layers must look like")
    one_line_error(["generate", "--prompt", "x", "--oeb-layers", "0,1", "--out", str(tmp_path)], capsys,
                   "need --stepflow")


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, stepsal.cli; stepsal.cli.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_results_record_the_model_by_its_name(saved_llama, tmp_path, capsys):
    trace_file = tmp_path / "trace.txt"
    trace_file.write_text(THINK_TRACE)
    assert main(["analyze", "--model", str(saved_llama), "--trace", str(trace_file), "--out", str(tmp_path)]) == 0
    assert StepSaliency.load(tmp_path / "saliency.safetensors").model == "tiny-llama"


def test_report_command_builds_one_page_from_saved_results(saved_llama, tmp_path, capsys):
    trace_file = tmp_path / "trace.txt"
    trace_file.write_text(THINK_TRACE)
    for name in ("a", "b"):
        assert main(["analyze", "--model", str(saved_llama), "--trace", str(trace_file),
                     "--out", str(tmp_path / "study" / name)]) == 0
    code, out, err = run_cli(["report", str(tmp_path / "study"), "--out", str(tmp_path / "page")], capsys)
    assert code == 0 and "wrote" in out
    page = (tmp_path / "page" / "report.html").read_text()
    assert "a/saliency.safetensors" in page and "b/saliency.safetensors" in page
    one_line_error(["report", str(tmp_path / "nothing")], capsys, "is not a folder")


def test_example_trace_is_shipped():
    text = example_trace_text()
    assert "<think>" in text and "</think>" in text and "<|im_start|>assistant" in text


@pytest.mark.slow
def test_demo_on_the_embedded_model(tmp_path, capsys):
    """`make demo`: the small reasoner (the default model) on the shipped example trace."""
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


def test_generate_command_says_when_stepflow_never_acted(saved_llama, tmp_path, capsys):
    code, out, err = run_cli(["generate", "--model", str(saved_llama), "--prompt", "Question: what is 2+2?",
                              "--stepflow", "--marker-in-output", "--max-new-tokens", "4", "--out", str(tmp_path)],
                             capsys)
    assert code == 0
    assert "stepsal generate: warning: StepFlow never acted: no row reached the thinking segment" in err


def test_debug_is_accepted_after_the_command_and_answer_checks_come_first(tmp_path, capsys):
    good = tmp_path / "trace.txt"
    good.write_text(THINK_TRACE)
    one_line_error(["analyze", *NO_MODEL, "--trace", str(good), "--target", "answer", "--out", str(tmp_path)],
                   capsys, "--target answer needs --answer")
    one_line_error(["analyze", *NO_MODEL, "--trace", str(good), "--target", "answer", "--answer", "99",
                    "--out", str(tmp_path)], capsys, "does not occur in the trace's summary")
    with pytest.raises(Exception, match="is not a folder"):
        main(["report", str(tmp_path / "nothing"), "--debug"])


def test_a_warning_explains_a_failure_once(tmp_path, capsys):
    text = THINK_TRACE.replace("What is 2+2", "What do <think> tags do? And what is 2+2")
    trace = tmp_path / "t.txt"
    trace.write_text(text)
    code, out, err = run_cli(["analyze", *NO_MODEL, "--trace", str(trace), "--min-steps", "9",
                              "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    warnings_printed = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warnings_printed) == 1 and "2 thinking and 1 summary markers" in warnings_printed[0]


def test_sweep_command_writes_what_layer_sweep_computes(saved_llama, tmp_path, capsys):
    trace_file = tmp_path / "trace.txt"
    trace_file.write_text(THINK_TRACE)
    out = tmp_path / "o"
    code, printed, err = run_cli(["sweep", "--model", str(saved_llama), "--trace", str(trace_file), "--metric",
                                  "summary_kl", "--intervention", "knockout:summary:thinking", "--out", str(out)],
                                 capsys)
    assert code == 0 and "mean_delta" in printed
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    model = stepsal.load_model(str(saved_llama))
    trace = stepsal.Trace.from_text(THINK_TRACE, model)
    direct = stepsal.layer_sweep(model, [trace], lambda layer, t: stepsal.knockout(model, t, "summary", "thinking",
                                                                                   layers=[layer]),
                                 metric="summary_kl", progress=False)
    assert [row["after"] for row in rows] == pytest.approx(direct.frame.after.tolist())
    assert (out / "sweep.png").stat().st_size > 5000
    one_line_error(["sweep", "--trace", str(trace_file), "--intervention", "ablate", "--out", str(out)], capsys,
                   "--intervention must be")


def test_errors_name_flags_not_python_arguments(saved_llama, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--model", str(saved_llama), "--prompt", "Question: what is 2+2?",
                            "--stepflow", "--max-new-tokens", "4", "--out", str(tmp_path)], capsys)
    assert code == 1 and "--marker-in-output if the model writes the marker itself" in err
    assert "marker_in_output" not in err
    args = argparse.Namespace(command="eval", func=None, max_new_tokens=16, overwrite=False, k=4)
    assert as_flags("made with max_new_tokens=8; asks for k=4, not task=1", args) == (
        "made with --max-new-tokens 8; asks for --k 4, not task=1")
    written_for_the_cli = "k=4 and overwrite=True (stepsal eval --overwrite) discards"
    assert as_flags(written_for_the_cli, args) == written_for_the_cli  # it names a flag already


def test_a_warning_from_another_library_is_shown_once_and_the_command_returns(monkeypatch):
    """It used to be shown inside the recording context, recorded again while the list was read: an
    endless loop that filled memory (a vLLM engine's warnings found it)."""
    import warnings

    import stepsal.cli_studies

    def command(args):
        warnings.warn("a warning from another library", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(stepsal.cli_studies, "eval_command", command)
    with pytest.warns(UserWarning, match="another library") as shown:
        assert stepsal.cli.main(["eval", "--limit", "1"]) == 0
    assert len([w for w in shown if "another library" in str(w.message)]) == 1
