"""The small reasoner: its stories, its LoRA merge, the shipped adapter and the training script."""

import copy
import json
import re
import shutil

import pytest
import torch

from stepsal.reasoner import CHAT_TEMPLATE, DATA, build_reasoner, lora_key, merge_lora, read_adapter
from stepsal.tasks.arithmetic import KINDS, QUESTION, START, make_problems

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.mark.parametrize("phrasing", ["train", "heldout"])
def test_stories_have_positive_integer_answers_that_their_thinking_computes(phrasing):
    problems = make_problems(300, seed=7, phrasing=phrasing)
    assert sorted({p.n_steps for p in problems}) == [1, 2, 3, 4, 5]
    for problem in problems:
        thinking = problem.thinking()
        assert len(thinking) == problem.n_steps + 1  # one sentence per step, after the start
        value = int(re.search(r"starts with (\d+)", thinking[0]).group(1))
        for sentence in thinking[1:]:  # evaluate each written equation on its own
            a, op, b, result = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$", sentence).groups()
            assert int(a) == value and OPS[op](int(a), int(b)) == int(result)
            value = int(result)
        assert value == problem.answer > 0
        assert problem.completion().endswith(f"\\boxed{{{problem.answer}}}.")
        assert problem.completion().count("</think>") == 1 and "<think>" not in problem.completion()
        assert str(problem.values[0]) in problem.question and problem.question.endswith("?")


def test_train_and_heldout_phrasings_do_not_share_a_sentence_frame():
    """Accuracy on held-out stories measures reading new wording: no template is in both families."""
    for kinds in [START, QUESTION, *KINDS.values()]:
        assert not set(kinds["train"]) & set(kinds["heldout"])
    frames = lambda p: {re.sub(r"\d+", "N", s) for s in re.split(r"(?<=[.?]) ", p.question)}  # noqa: E731
    train = set().union(*(frames(p) for p in make_problems(2000, seed=1, phrasing="train")))
    heldout = set().union(*(frames(p) for p in make_problems(2000, seed=1, phrasing="heldout")))
    assert not train & heldout


def test_stories_are_reproducible_and_seeds_differ():
    assert [p.question for p in make_problems(20, seed=3)] == [p.question for p in make_problems(20, seed=3)]
    assert [p.question for p in make_problems(20, seed=3)] != [p.question for p in make_problems(20, seed=4)]
    with pytest.raises(ValueError, match="phrasing"):
        make_problems(2, phrasing="test")
    with pytest.raises(ValueError, match="steps"):
        make_problems(2, steps=(0, 3))


def test_merge_equals_the_lora_forward():
    """W + s B A merged gives what the unmerged LoRA layer computes: x W^T + s (x A^T) B^T."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=True), torch.nn.Linear(5, 4, bias=False))
    x = torch.randn(3, 6)
    a0, b0, a1, b1 = (torch.randn(*shape).half().float() for shape in [(2, 6), (5, 2), (2, 5), (4, 2)])
    scale = 1.5
    h = model[0](x) + scale * (x @ a0.T) @ b0.T
    expected = model[1](h) + scale * (h @ a1.T) @ b1.T
    tensors = {lora_key("0", "A"): a0.half(), lora_key("0", "B"): b0.half(),
               lora_key("1", "A"): a1.half(), lora_key("1", "B"): b1.half()}
    assert merge_lora(model, tensors, scale) == ["0", "1"]  # fp16 matrices, as shipped
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_an_adapter_that_does_not_fit():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="lacks"):
        merge_lora(model, {lora_key("7", "A"): torch.zeros(2, 6), lora_key("7", "B"): torch.zeros(5, 2)}, 1.0)
    with pytest.raises(ValueError, match="lacks"):  # half a pair
        merge_lora(model, {lora_key("0", "A"): torch.zeros(2, 6)}, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora(model, {lora_key("0", "A"): torch.zeros(2, 5), lora_key("0", "B"): torch.zeros(5, 2)}, 1.0)


def test_chat_template_opens_the_thinking(tokenizer):
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_shipped_adapter_is_small_and_complete():
    tensors, meta = read_adapter()
    assert (DATA / "adapter.safetensors").stat().st_size < 20e6
    modules = {key.rsplit(".lora_", 1)[0] for key in tensors}
    assert len(modules) == 30 * len(meta["target_modules"])
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert {"prompt", "completion", "logprob"} <= set(meta["check"])


@pytest.mark.slow
def test_reasoner_builds_from_the_base_and_reproduces_its_recorded_logprob(tmp_path):
    import stepsal
    from stepsal.embedded import embedded_folder
    from stepsal.reasoner import completion_logprob

    folder = embedded_folder("smollm2-135m-reasoner")  # built (and checked) on first use
    _, meta = read_adapter()
    model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
    check = meta["check"]
    got = completion_logprob(model, model.tokenizer, check["prompt"], check["completion"])
    assert got == pytest.approx(check["logprob"], abs=1e-3)
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                               add_generation_prompt=True).endswith("assistant\n<think>\n")

    # a corrupt adapter (or another base) is caught by the recorded check, nothing is cached
    tensors, _ = read_adapter()
    from safetensors.torch import save_file

    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 3
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "adapter.safetensors"))
    (bad / "reasoner.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="recorded"):
        build_reasoner(tmp_path / "built", embedded_folder("smollm2-135m"), adapter_folder=bad)
    assert not (tmp_path / "built").exists()
    assert folder.exists()


@pytest.mark.slow
def test_training_script_smoke_run_writes_an_adapter_that_builds(tmp_path):
    """A few steps of training/train_reasoner.py: the adapter, its metadata and a model that builds."""
    pytest.importorskip("peft", reason="training needs peft: pip install peft==0.21.2")
    import importlib.util
    from pathlib import Path

    from stepsal.embedded import embedded_folder

    script = Path(__file__).parent.parent / "training" / "train_reasoner.py"
    spec = importlib.util.spec_from_file_location("train_reasoner", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = tmp_path / "adapter"
    train.main(["--steps", "2", "--batch", "2", "--rank", "2", "--eval", "2", "--precision", "fp32",
                "--out", str(out)])
    tensors, meta = read_adapter(out)
    assert len(tensors) == 2 * 30 * 7 and meta["rank"] == 2 and meta["steps"] == 2
    assert meta["evaluation"]["n"] == 2 and 0 <= meta["evaluation"]["accuracy"] <= 1
    build_reasoner(tmp_path / "built", embedded_folder("smollm2-135m"), adapter_folder=out)
    assert (tmp_path / "built" / "config.json").exists()
    shutil.rmtree(tmp_path / "built")
