"""`stepsal eval` and `stepsal study` from the command line."""

import json

import pytest
from conftest import pinned_stack_only
from tiny import save_folder

from stepsal.cli import main
from stepsal.reasoner import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, hf_models, tokenizer):
    """The tiny llama with the reasoner's chat template (its prompts open the thinking)."""
    import copy

    chat = copy.copy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return save_folder(tmp_path_factory.mktemp("models") / "chat-llama", hf_models["llama"], chat)


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} plus 2?", "answer": i + 2}) + "\n"
                            for i in range(3)))
    return path


def test_eval_command_is_paired_resumable_and_merges_shards(chat_llama, problems, tmp_path, capsys):
    common = ["eval", "--model", str(chat_llama), "--problems", str(problems), "--k", "2", "--max-new-tokens", "4"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "stepflow" in out and "StepFlow - baseline pass@1" in out
    report = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(report["paired"]) == {"greedy", "sampled"} and report["paired"]["sampled"]["problems"] == 3
    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * (1 + 2)
    assert main([*common, "--out", str(tmp_path / "a")]) == 0  # everything is there: nothing regenerated
    assert (tmp_path / "a" / "samples.jsonl").read_text().splitlines() == lines

    for shard in ("0/2", "1/2"):
        assert main([*common, "--shard", shard, "--out", str(tmp_path / "b")]) == 0
    assert "stepsal eval --merge" in capsys.readouterr().out
    assert main(["eval", "--merge", "--out", str(tmp_path / "b")]) == 0
    merged = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert merged["summary"] == report["summary"]  # the same seeds per problem, whichever shard ran it


@pytest.mark.parametrize("args, expected", [
    (["--shard", "2/2"], "0 <= i < n"),
    (["--k", "0", "--no-greedy"], "nothing to generate"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--problems", "missing.jsonl"], "no such file"),
])
def test_eval_errors_are_one_line(args, expected, problems, tmp_path, capsys):
    args = [a if a != "missing.jsonl" else str(tmp_path / a) for a in args]
    code = main(["eval", "--model", "no-such-model", "--problems", str(problems), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and expected in err and len(err.strip().splitlines()) == 1


def test_merge_without_samples_says_what_to_run(tmp_path, capsys):
    assert main(["eval", "--merge", "--out", str(tmp_path / "empty")]) == 1
    assert "run stepsal eval --out" in capsys.readouterr().err


@pinned_stack_only
@pytest.mark.slow
def test_study_command_on_the_small_reasoner(tmp_path, capsys):
    """Traces labelled by their answers, saved per group; the saved saliency equals a fresh computation."""
    import stepsal
    from stepsal.saliency import StepSaliency

    out = tmp_path / "study"
    assert main(["study", "--limit", "4", "--k", "1", "--max-new-tokens", "140", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    study = json.loads((out / "study.json").read_text())
    rows = [json.loads(line) for line in (out / "samples" / "samples.jsonl").read_text().splitlines()]
    closed = [r for r in rows if r["closed_think"]]
    assert study["samples"] == len(rows) == 4 * 2
    for group, flag in (("correct", True), ("wrong", False)):
        files = sorted((out / group).glob("*.safetensors")) if (out / group).exists() else []
        assert len(files) == study["traces"][group] == sum(r["correct"] == flag for r in closed)
    assert "warning" in printed.err  # under 10 traces a group: descriptive only, said once
    row = closed[0]
    model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
    fresh = stepsal.step_saliency(model, stepsal.Trace.from_tokens(row["tokens"], model,
                                                                   prompt_length=row["prompt_length"]))
    group = "correct" if row["correct"] else "wrong"
    saved = StepSaliency.load(out / group / f"{row['problem']}.{row['mode']}.{row['sample']}.safetensors")
    assert saved.maps.shape == fresh.maps.shape
    assert (saved.maps - fresh.maps).abs().max() <= 1e-5 * fresh.maps.abs().max()
    assert (out / "report.html").exists()


def test_eval_under_accelerate_launch_splits_problems_across_ranks(chat_llama, problems, tmp_path):
    """`accelerate launch` with two CPU processes: each rank answers its share into its own file, and
    the merged samples equal a single-process run's."""
    import os
    import socket
    import subprocess
    import sys

    from stepsal.studies.evaluate import load_samples

    common = ["eval", "--model", str(chat_llama), "--problems", str(problems), "--k", "2", "--max-new-tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for rank 0's store (the default 29500 may be taken)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --multi_gpu: accelerate's torchrun launcher (its --cpu mode needs MPI); without GPUs each rank uses the CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "stepsal.cli"]
    done = subprocess.run([*launch, *common, "--out", str(tmp_path / "ranks")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
    assert sorted(p.name for p in (tmp_path / "ranks").glob("samples*")) == ["samples.0-of-2.jsonl",
                                                                          "samples.1-of-2.jsonl"]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    key = ["problem", "condition", "mode", "sample"]
    ranks = load_samples(tmp_path / "ranks").frame.sort_values(key).reset_index(drop=True)
    single = load_samples(tmp_path / "single").frame.sort_values(key).reset_index(drop=True)
    assert ranks[key + ["text", "tokens"]].equals(single[key + ["text", "tokens"]])


def test_study_takes_only_the_samples_asked_for(chat_llama, problems, tmp_path, capsys):
    """A study folder seeded with an evaluation's samples (StepFlow, k=2) studies the baseline greedy
    answers when asked for k=0, and counts what it could not study instead of dropping it."""
    out = tmp_path / "study"
    assert main(["eval", "--model", str(chat_llama), "--problems", str(problems), "--k", "2", "--max-new-tokens", "4",
                 "--out", str(out / "samples")]) == 0
    assert main(["study", "--model", str(chat_llama), "--problems", str(problems), "--k", "0",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["samples"] == 3 and study["skipped"] == {"thinking never closed": 3}
    assert "no comparison" in capsys.readouterr().err


def test_resample_command_writes_resumable_rollouts(chat_llama, tmp_path, capsys):
    """`stepsal resample`: one greedy rollout per prefix into rollouts.jsonl, the saved result equal to
    the library's, and a rerun that generates nothing."""
    from tiny import THINK_TRACE

    import stepsal

    trace_file = tmp_path / "trace.txt"
    trace_file.write_text(THINK_TRACE)
    command = ["resample", "--model", str(chat_llama), "--trace", str(trace_file), "--answer", "12",
               "--temperature", "0", "--max-new-tokens", "3", "--out", str(tmp_path / "r")]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "before thinking" in printed and "wrote" in printed
    saved = stepsal.ResamplingImportance.load(tmp_path / "r" / "resampling.json")
    lines = (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == saved.n_prefixes == len(saved.rollouts) and (tmp_path / "r" / "resampling.png").exists()
    model = stepsal.load_model(str(chat_llama))
    fresh = stepsal.resampling_importance(model, stepsal.Trace.from_text(THINK_TRACE, model), "12", temperature=0,
                                          max_new_tokens=3, progress=False)
    assert saved.rollouts["tokens"].tolist() == fresh.rollouts["tokens"].tolist()
    assert main(command) == 0
    assert (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines() == lines  # nothing redone
    assert main([*command[:-2], "--max-new-tokens", "4", "--out", str(tmp_path / "r")]) == 1
    assert "rollouts made with --max-new-tokens 3" in capsys.readouterr().err


def test_calibrate_command_writes_a_stepflow_that_from_dict_reads(chat_llama, problems, tmp_path, capsys):
    import stepsal

    out = tmp_path / "cal"
    grid = '{"oeb": ["quarter"], "smi": ["off"], "tau_max": [0.15, 0.25]}'
    assert main(["calibrate", "--model", str(chat_llama), "--problems", str(problems), "--k", "0", "--max-new-tokens",
                 "2", "--grid", grid, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test split" in printed and "chosen:" in printed
    flow = stepsal.StepFlow.from_dict(json.loads((out / "stepflow.json").read_text()))
    saved = stepsal.CalibrationResult.load(out / "calibration.json")
    assert flow == saved.flow and flow.smi_layers == () and flow.tau_max in (0.15, 0.25)
    assert sorted(saved.split["dev"] + saved.split["test"]) == ["p0", "p1", "p2"]
    assert main(["calibrate", "--problems", str(problems), "--grid", "{alpha: 1}", "--out", str(tmp_path / "x")]) == 1
    assert "--grid is no JSON" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_study_command_splits_the_traces_between_shards(chat_llama, tokenizer, tmp_path, capsys):
    """`stepsal study --shard i/n`: each shard studies its problems' traces; shard 0 compares them all."""
    from unittest import mock

    from test_study import PROBLEMS, answering, counting

    import stepsal.studies.evaluate
    import stepsal.studies.study

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                                for p in PROBLEMS))
    out = tmp_path / "study"
    common = ["study", "--model", str(chat_llama), "--problems", str(problems), "--k", "0", "--out", str(out)]
    calls: list = []
    with mock.patch.object(stepsal.studies.evaluate, "generate", answering(tokenizer)), \
            mock.patch.object(stepsal.studies.study, "step_saliency", counting(calls)):
        assert main([*common, "--shard", "1/2"]) == 0
        assert "shard 1/2 done: StudyResult(correct 0, wrong 2 traces" in capsys.readouterr().out
        assert not (out / "study.json").exists() and len(calls) == 2
        assert main([*common, "--shard", "0/2"]) == 0  # the other shard is done: nothing to wait for
    study = json.loads((out / "study.json").read_text())
    assert study["traces"] == {"correct": 2, "wrong": 2} and study["samples"] == len(PROBLEMS)
    assert len(calls) == len(set(calls)) == 4 and len(list(out.glob("*/*.safetensors"))) == 4
    assert "no comparison" not in capsys.readouterr().err
    assert main([*common, "--shard", "2/2"]) == 1 and "0 <= i < n" in capsys.readouterr().err
