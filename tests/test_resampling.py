"""Accuracy along the trace (stepsal.resampling_importance): greedy rollouts against plain transformers
`generate` from each step-boundary prefix, and the statistics against hand computations."""

import math
from statistics import NormalDist
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import BACKENDS
from tiny import THINK_TRACE

import stepsal
import stepsal.studies.resampling as resampling
from stepsal.segments import THINKING
from stepsal.tasks.answers import extract_answer


@pytest.fixture(scope="module")
def trace(tokenizer):
    return stepsal.Trace.from_text(THINK_TRACE, tokenizer)


def boundaries(trace) -> list[int]:
    """Prefix ends by a walk over the tokens: just after the token that completes "<think>" (found in
    the text), then each thinking step's end."""
    segments, steps = trace.layout.token_segment.tolist(), trace.layout.token_step.tolist()
    marker_end = trace.text.index("<think>") + len("<think>")
    ends = [next(t for t, (start, end) in enumerate(trace.offsets) if start < marker_end <= end) + 1]
    assert segments[ends[0] - 1] == THINKING and ends[0] - 1 == segments.index(THINKING)  # the marker opens T1
    for t in range(len(steps)):
        if segments[t] == THINKING and (t + 1 == len(steps) or steps[t + 1] != steps[t]):
            ends.append(t + 1)
    return ends


def transformers_greedy(hf_model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", [*BACKENDS, "transformers"])
def test_greedy_rollouts_equal_transformers_generate(kind, tl_models, hf_models, tokenizer, trace):
    hf = hf_models["llama"]
    model = hf if kind == "transformers" else tl_models[("llama", kind)]
    result = stepsal.resampling_importance(model, trace, "12", temperature=0, max_new_tokens=6, progress=False,
                                           tokenizer=tokenizer if kind == "transformers" else None)
    ends = boundaries(trace)
    assert result.n_prefixes == len(ends) == 1 + len(trace.layout.steps_of(THINKING))
    assert result.rollouts["prefix_length"].tolist() == ends and (result.rollouts["rollout"] == 0).all()
    for row, end in zip(result.rollouts.to_dict("records"), ends, strict=True):
        expected = transformers_greedy(hf, tokenizer, trace.tokens[:end], 6)
        assert row["tokens"] == expected
        assert row["answer"] == extract_answer(tokenizer.decode(expected), thinking_open=True)


def fake_generate(answers_by_prefix: dict[int, list[str | None]], ends: list[int], calls: list):
    """generate() returning, for the prefix ending at ends[k], one text per rollout with the given answer
    (None: thinking that never closes)."""
    def fake(model, prompts, *args, **kwargs):
        k = ends.index(len(prompts[0]))
        calls.append(k)
        texts = [f"so.\n</think>\nThe answer is \\boxed{{{a}}}." if a is not None else "and then 3 * "
                 for a in answers_by_prefix[k][:len(prompts)]]
        tokens = [torch.cat([prompts[0], torch.tensor([7, 8])]) for _ in texts]
        return SimpleNamespace(texts=texts, tokens=tokens)
    return fake


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def loop_kl(now: list, before: list) -> float:
    keys = sorted(set(now) | set(before), key=str)
    p = [(now.count(key) + 1) / (len(now) + len(keys)) for key in keys]
    q = [(before.count(key) + 1) / (len(before) + len(keys)) for key in keys]
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_statistics_equal_hand_computations(tl_models, trace, tmp_path):
    ends = boundaries(trace)
    # four rollouts per prefix: fewer right early, the same answer written two ways later
    table = {k: (["12"] * min(k, 4) + ["7", None, "12.0", "$12"])[:4] for k in range(len(ends))}
    with mock.patch.object(resampling, "generate", fake_generate(table, ends, [])):
        result = stepsal.resampling_importance(tl_models[("llama", BACKENDS[0])], trace, 12, n_rollouts=4,
                                               progress=False)
    correct = [sum(a is not None and a.lstrip("$") in ("12", "12.0") for a in table[k]) for k in range(len(ends))]
    assert result.p_correct.tolist() == [c / 4 for c in correct]
    for k, c in enumerate(correct):
        assert result.interval[k].tolist() == pytest.approx(wilson(c, 4), abs=1e-12)
    assert math.isnan(result.importance[0]) and math.isnan(result.kl[0])
    assert result.importance[1:].tolist() == pytest.approx([(correct[k] - correct[k - 1]) / 4
                                                            for k in range(1, len(ends))])
    keyed = [["12" if a is not None and a.lstrip("$") in ("12", "12.0") else a or "<no answer>" for a in table[k]]
             for k in range(len(ends))]
    assert result.kl[1:].tolist() == pytest.approx([loop_kl(keyed[k], keyed[k - 1]) for k in range(1, len(ends))])
    frame = result.to_dataframe()
    assert frame["label"].tolist()[0] == "before thinking" and frame["label"].tolist()[1] == "T1"
    assert frame["rollouts"].tolist() == [4] * len(ends)
    loaded = stepsal.ResamplingImportance.load(result.save(tmp_path / "r.json"))
    assert loaded.p_correct.tolist() == result.p_correct.tolist() and loaded.gold == "12"


def test_resumes_and_refuses_other_settings(tl_models, trace, tmp_path):
    ends = boundaries(trace)
    table = {k: ["12", "7", "12"] for k in range(len(ends))}
    model = tl_models[("llama", BACKENDS[0])]
    calls: list = []
    with mock.patch.object(resampling, "generate", fake_generate(table, ends, calls)):
        first = stepsal.resampling_importance(model, trace, 12, n_rollouts=2, out=tmp_path, progress=False)
        assert calls == list(range(len(ends)))
        again = stepsal.resampling_importance(model, trace, 12, n_rollouts=2, out=tmp_path, progress=False)
        assert calls == list(range(len(ends)))  # nothing redone
        assert again.p_correct.tolist() == first.p_correct.tolist() == [0.5] * len(ends)
        more = stepsal.resampling_importance(model, trace, 12, n_rollouts=3, out=tmp_path, progress=False)
        assert len(more.rollouts) == 3 * len(ends) and more.p_correct.tolist() == [2 / 3] * len(ends)
        with pytest.raises(stepsal.SettingsMismatchError, match=r"rollouts made with max_new_tokens=256; this run "
                                                                r"asks for max_new_tokens=9"):
            stepsal.resampling_importance(model, trace, 12, n_rollouts=2, out=tmp_path, max_new_tokens=9,
                                          progress=False)
    lines = (tmp_path / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(ends)  # each rollout written once
    moved = [line.replace(f'"prefix_length": {ends[0]},', f'"prefix_length": {ends[0] - 1},') for line in lines]
    (tmp_path / "rollouts.jsonl").write_text("\n".join(moved) + "\n")  # as written with other prefix ends
    with pytest.raises(stepsal.SettingsMismatchError, match=rf"rollouts of prefix 0 ending at token {ends[0] - 1}; "
                                                            r"this run's prefixes end at \["):
        stepsal.resampling_importance(model, trace, 12, n_rollouts=2, out=tmp_path, progress=False)


def test_refusals(tl_models, tokenizer):
    model = tl_models[("llama", BACKENDS[0])]
    plain = stepsal.Trace("ab", torch.tensor([5, 6]), [(0, 1), (1, 2)],  # a question and a summary step only
                          stepsal.StepLayout.from_token_step([0, 1], [0, 2]))
    with pytest.raises(stepsal.TraceFormatError, match="this trace has none"):
        stepsal.resampling_importance(model, plain, 2, progress=False)
    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    with pytest.raises(stepsal.OptionError, match="n_rollouts must be a whole number >= 1"):
        stepsal.resampling_importance(model, trace, 12, n_rollouts=0, progress=False)
