"""Generation speed: StepFlow on vs off, our loop vs TransformerLens's and plain transformers', both backends.

Greedy, fixed number of new tokens (no early stop), same weights and prompt everywhere; each
figure is the best of ``--repeats`` runs after a warm-up, all measured in this one process.
Targets: StepFlow decoding >= 0.85x the same backend without it, and >= 0.7x plain transformers.

Usage: python benchmarks/bench_generate.py [--tokens 48] [--repeats 2] [--tiny-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

PROMPT_MESSAGES = [{"role": "user", "content": "A shop sells pencils at 3 dollars each. Tom buys 4 pencils and "
                                               "pays with a 20 dollar bill. How much change does he get?"}]


def best_rate(fn, n_tokens: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return n_tokens / best


def bench_model(label: str, hf_model, tokenizer, prompt_text: str, n_tokens: int, repeats: int) -> None:
    import stepsal

    ids = torch.tensor([tokenizer(prompt_text, add_special_tokens=False)["input_ids"]])
    print(f"\n== {label}: prompt {ids.shape[1]} tokens, {n_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads")
    rates = {}
    with torch.no_grad():
        rates["transformers"] = best_rate(
            lambda: hf_model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id or 0), n_tokens, repeats)
    for backend in ("bridge", "hooked"):
        model = stepsal.load_model(hf_model, tokenizer, backend=backend)
        flow = stepsal.StepFlow()
        rates[f"{backend} TL.generate"] = best_rate(
            lambda: model.generate(ids, max_new_tokens=n_tokens, do_sample=False, stop_at_eos=False,
                                   verbose=False), n_tokens, repeats)
        rates[f"{backend} stepsal"] = best_rate(
            lambda: stepsal.generate(model, ids, None, max_new_tokens=n_tokens, stop_at_eos=False),
            n_tokens, repeats)
        rates[f"{backend} stepsal+StepFlow"] = best_rate(
            lambda: stepsal.generate(model, ids, flow, max_new_tokens=n_tokens, stop_at_eos=False),
            n_tokens, repeats)
        del model
    base = rates["transformers"]
    print(f"{'run':<26} {'tok/s':>8} {'vs transformers':>16}")
    for name, rate in rates.items():
        print(f"{name:<26} {rate:8.1f} {rate / base:16.2f}")
    for backend in ("bridge", "hooked"):
        with_flow, without = rates[f"{backend} stepsal+StepFlow"], rates[f"{backend} stepsal"]
        print(f"{backend}: StepFlow / no StepFlow = {with_flow / without:.2f} (target >= 0.85); "
              f"StepFlow / transformers = {with_flow / base:.2f} (target >= 0.7)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny-only", action="store_true")
    args = parser.parse_args()
    import tempfile

    from tiny import make_hf_model, make_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(folder)
        prompt = ("<|im_start|>user\nWhat is 2+2 and then times 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
                  "First, we add the two numbers together. The sum of 2 and 2 is 4. Then")
        bench_model("tiny Llama (4 layers, d_model 64, random)", make_hf_model("llama", len(tokenizer), n_layers=4),
                    tokenizer, prompt, args.tokens, args.repeats)
    if args.tiny_only:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True) + "<think>\n"
    bench_model("SmolLM2-135M-Instruct (30 layers)", hf_model, tokenizer, prompt, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
