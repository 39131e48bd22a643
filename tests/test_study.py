"""`run_study` split across processes: each trace once, resumable, merged into the one-process result."""

import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
from conftest import BACKENDS
from tiny import fake_generation

import stepsal
import stepsal.studies.evaluate
import stepsal.studies.study

# one answer per problem: 13 is right, 14 wrong; the fifth never closes its thinking and the sixth has one
# thinking step (both counted, not studied)
ANSWERS = [
    "First, 6 and 7 make 13 when added together. Let me check the sum again to be sure. It is still 13 after all."
    "\n</think>\nSo the answer is \\boxed{13}.",
    "I think 6 plus 7 is 14. Let me verify that quickly. Yes, it is 14.\n</think>\nSo \\boxed{14}.",
    "Adding 6 and 7 gives 13. Double-checking: 7 plus 6 is 13 as well. Good.\n</think>\nThe answer is \\boxed{13}.",
    "Six and seven: that is fourteen, I believe. Counting on from seven gives 14 again.\n</think>\n\\boxed{14}.",
    "Six plus seven is going to be",
    "Start from 6. Add 7 to it. That is 13 in total.\n</think>\nSo the answer is \\boxed{13}.",
]
PROBLEMS = [stepsal.WordProblem(f"p{i}", f"What is 6 plus 7? (case {i})", 13) for i in range(len(ANSWERS))]


def answering(tokenizer, odd_ones_wait: float = 0.0):
    """A stand-in for generate: each problem's answer from ANSWERS (the odd cases' after a pause)."""
    def generate(adapter, prompts, flow=None, **kwargs):
        case = int(prompts[0][0]["content"].split("(case ")[1].split(")")[0])
        time.sleep(odd_ones_wait * (case % 2))
        return fake_generation(tokenizer, [ANSWERS[case]] * len(prompts))
    return generate


def counting(calls: list):
    """step_saliency, recording each trace it computes (its token ids)."""
    real = stepsal.studies.study.step_saliency
    lock = threading.Lock()

    def step_saliency(model, trace, **kwargs):
        with lock:
            calls.append(tuple(trace.tokens.tolist()))
        return real(model, trace, **kwargs)
    return step_saliency


@pytest.fixture
def study_models(tl_models, hf_models, tokenizer):
    """Two TransformerLens models with the same weights: one per shard (a model's hooks are its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl_models[("llama", BACKENDS[0])], stepsal.load_model(hf_models["llama"], tokenizer,
                                                                     backend=BACKENDS[0])


def run(model, out, calls, tokenizer, **kwargs):
    with mock.patch.object(stepsal.studies.evaluate, "generate", answering(tokenizer)), \
            mock.patch.object(stepsal.studies.study, "step_saliency", counting(calls)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # under 10 traces a group: descriptive only
        return stepsal.run_study(model, PROBLEMS, out=out, progress=False, **kwargs)


def test_shards_study_each_trace_once_and_merge_into_the_one_process_result(study_models, tokenizer, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(stepsal.studies.evaluate, "POLL_SECONDS", 0.01)
    single_calls: list = []
    single = run(study_models[0], tmp_path / "single", single_calls, tokenizer, agreement=True)
    assert {g: len(r) for g, r in single.groups.items()} == {"correct": 2, "wrong": 2} and len(single_calls) == 4
    assert single.skipped["thinking never closed"] == 1 and sum(single.skipped.values()) == 2

    calls: list = []
    study = lambda i: stepsal.run_study(study_models[i], PROBLEMS, out=tmp_path / "sharded", progress=False,  # noqa: E731
                                        shard=(i, 2), agreement=True)
    # shard 1 answers slowly: shard 0 waits for its samples and traces
    with mock.patch.object(stepsal.studies.evaluate, "generate", answering(tokenizer, odd_ones_wait=0.3)), \
            mock.patch.object(stepsal.studies.study, "step_saliency", counting(calls)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(2) as pool:  # two shards sharing out, as two processes would (shard 0 waits)
            merged, other = (future.result(timeout=300) for future in [pool.submit(study, i) for i in (0, 1)])
    assert sorted(calls) == sorted(single_calls)  # every trace once, between them

    for group, results in single.groups.items():
        assert [r.sums.tolist() for r in merged.groups[group]] == [r.sums.tolist() for r in results]
    assert merged.comparison.to_dataframe().equals(single.comparison.to_dataframe())
    assert merged.agreement.frame.equals(single.agreement.frame) and merged.skipped == single.skipped
    study_json = lambda name: json.loads((tmp_path / name / "study.json").read_text())  # noqa: E731
    assert study_json("sharded") == study_json("single")
    assert (tmp_path / "sharded" / "report.html").exists()
    # shard 1 returns its own traces (p1, p3, p5) and leaves the comparison to shard 0
    assert other.comparison is None and other.agreement is None
    assert {g: len(r) for g, r in other.groups.items()} == {"correct": 0, "wrong": 2} and len(other.skipped) == 1
    assert sorted(p.name for p in (tmp_path / "sharded" / "samples").glob("samples*")) == [
        "samples.0-of-2.jsonl", "samples.1-of-2.jsonl"]

    again: list = []  # a rerun, shard by shard, reuses every saved map
    run(study_models[1], tmp_path / "sharded", again, tokenizer, shard=(1, 2), agreement=True)
    rerun = run(study_models[0], tmp_path / "sharded", again, tokenizer, shard=(0, 2), agreement=True)
    assert again == [] and rerun.comparison.to_dataframe().equals(single.comparison.to_dataframe())
    whole: list = []  # and so does a run without shards over the shards' folder
    run(study_models[0], tmp_path / "sharded", whole, tokenizer, agreement=True)
    assert whole == []


def test_a_killed_shard_resumes_from_its_last_saved_trace(study_models, tokenizer, tmp_path):
    calls: list = []
    real = counting(calls)

    def dies_on_the_second(model, trace, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(model, trace, **kwargs)

    with mock.patch.object(stepsal.studies.evaluate, "generate", answering(tokenizer)), \
            mock.patch.object(stepsal.studies.study, "step_saliency", dies_on_the_second), \
            pytest.raises(KeyboardInterrupt):
        stepsal.run_study(study_models[0], PROBLEMS, out=tmp_path, progress=False, shard=(1, 2))
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 1 and not list(tmp_path.glob("*/.*.partial"))
    done = calls[:]
    run(study_models[0], tmp_path, calls, tokenizer, shard=(1, 2))
    assert len(calls) == 2 and done[0] not in calls[1:]  # the other trace (p5 is not studied), once


def test_shards_and_one_process_do_not_write_one_study_at_once(study_models, tmp_path):
    from stepsal.storage import writer_lock

    with writer_lock(tmp_path, fix="-"), pytest.raises(stepsal.OutputBusyError, match="another process is writing"):
        stepsal.run_study(study_models[0], PROBLEMS, out=tmp_path, progress=False, shard=(0, 2))
    one_share = writer_lock(tmp_path / stepsal.studies.study.SHARD_LOCK.format(1, 2), fix="-")  # a process a share
    with one_share, pytest.raises(stepsal.OutputBusyError, match=r"\.study\.1-of-2\.lock"):
        stepsal.run_study(study_models[0], PROBLEMS, out=tmp_path, progress=False, shard=(1, 2))
    with pytest.raises(stepsal.StepsalError, match="shard must be"):
        stepsal.run_study(study_models[0], PROBLEMS, out=tmp_path, progress=False, shard=(2, 2))
