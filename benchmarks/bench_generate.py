"""Generation speed: StepFlow on vs off, our loop vs TransformerLens's and plain transformers', both backends.

Greedy, fixed number of new tokens (no early stop), same weights and prompt everywhere; each
figure is the best of ``--repeats`` interleaved rounds after a warm-up, all in this one process.
Targets: StepFlow decoding >= 0.85x the same backend without it, and >= 0.7x plain transformers.

Usage: python benchmarks/bench_generate.py [--tokens 64] [--repeats 4] [--hooked-repeats 1] [--tiny-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

PROMPT_MESSAGES = [{"role": "user", "content": "A shop sells pencils at 3 dollars each. Tom buys 4 pencils and "
                                               "pays with a 20 dollar bill. How much change does he get?"}]


def interleaved_rates(runs: dict, n_tokens: int, repeats: int) -> dict[str, float]:
    """tok/s per named run: one warm-up each, then ``repeats`` rounds A, B, C, ... (best of them).

    Interleaving spreads the machine's slow phases over all runs instead of one of them.
    """
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: n_tokens / seconds for name, seconds in best.items()}


def bench_model(label: str, hf_model, tokenizer, prompt_text: str, n_tokens: int, repeats: int,
                hooked_repeats: int) -> None:
    import warnings

    import stepsal

    ids = torch.tensor([tokenizer(prompt_text, add_special_tokens=False)["input_ids"]])
    print(f"\n== {label}: prompt {ids.shape[1]} tokens, {n_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads")
    flow = stepsal.StepFlow()
    models = {backend: stepsal.load_model(hf_model, tokenizer, backend=backend) for backend in ("bridge", "hooked")}

    def runs_for(backend: str) -> dict:
        model = models[backend]
        return {
            f"{backend} TL.generate": lambda: model.generate(ids, max_new_tokens=n_tokens, do_sample=False,
                                                             stop_at_eos=False, verbose=False),
            f"{backend} stepsal": lambda: stepsal.generate(model, ids, None, max_new_tokens=n_tokens,
                                                           stop_at_eos=False),
            f"{backend} stepsal+StepFlow": lambda: stepsal.generate(model, ids, flow, max_new_tokens=n_tokens,
                                                                    stop_at_eos=False),
        }

    transformers_run = {"transformers": lambda: hf_model.generate(  # runs under no_grad itself
        ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
        pad_token_id=tokenizer.eos_token_id or 0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate() warns about HookedTransformer's speed: measured here
        rates = interleaved_rates({**transformers_run, **runs_for("bridge")}, n_tokens, repeats)
        rates.update(interleaved_rates(runs_for("hooked"), n_tokens, hooked_repeats))
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
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds (bridge, transformers)")
    parser.add_argument("--hooked-repeats", type=int, default=1, help="rounds for the slow HookedTransformer")
    parser.add_argument("--tiny-only", action="store_true")
    args = parser.parse_args()
    import tempfile

    from tiny import make_hf_model, make_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(folder)
        prompt = ("<|im_start|>user\nWhat is 2+2 and then times 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
                  "First, we add the two numbers together. The sum of 2 and 2 is 4. Then")
        bench_model("tiny Llama (4 layers, d_model 64, random)", make_hf_model("llama", len(tokenizer), n_layers=4),
                    tokenizer, prompt, args.tokens, args.repeats, args.repeats)
    if args.tiny_only:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True) + "<think>\n"
    bench_model("SmolLM2-135M-Instruct (30 layers)", hf_model, tokenizer, prompt, args.tokens, args.repeats,
                args.hooked_repeats)


if __name__ == "__main__":
    main()
