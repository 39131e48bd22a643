"""StepFlow's transformers fast path vs plain transformers ``generate``, batch 1 and 8, one process.

The reasoner (SmolLM2-135M + LoRA, fp32), greedy, a fixed number of new tokens (no early stop),
prompts from the shipped problems (left-padded at batch 8). Each figure is the best of ``--repeats``
interleaved rounds after a warm-up. Target: fast path with StepFlow >= 0.9x transformers (its default
attention, SDPA). Also measured: transformers with a static cache (our loop uses a dynamic one).

With ``--compile``: the same runs with the model's forward wrapped in ``torch.compile(dynamic=True)``
(compile time reported separately, from the warm-up).

Usage: python benchmarks/bench_fast_path.py [--tokens 48] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_generate import interleaved_rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="wrap the forward in torch.compile(dynamic=True)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import stepsal
    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m-reasoner")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # default attention: SDPA
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    problems = stepsal.load_problems(limit=8)
    flow = stepsal.StepFlow()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, attention "
          f"{model.config._attn_implementation}, {args.tokens} new tokens, greedy")
    for batch in args.batches:
        messages = [p.messages() for p in problems[:batch]]
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        tokenizer.padding_side = "left"
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        common = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id or 0)
        # this batch's inputs bound as defaults: each run is called within this iteration only
        runs = {
            "transformers": lambda encoded=encoded, common=common: model.generate(**encoded, **common),
            "transformers static cache": lambda encoded=encoded, common=common: model.generate(
                **encoded, **common, cache_implementation="static"),
            "stepsal fast path": lambda messages=messages: stepsal.generate(
                model, messages, None, max_new_tokens=args.tokens, stop_at_eos=False, tokenizer=tokenizer),
            "stepsal fast path+StepFlow": lambda messages=messages: stepsal.generate(
                model, messages, flow, max_new_tokens=args.tokens, stop_at_eos=False, tokenizer=tokenizer),
        }
        if args.compile:
            runs.pop("transformers static cache")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if args.compile:  # the first call of each compiles: timed on its own
                for name, fn in runs.items():
                    started = time.perf_counter()
                    fn()
                    print(f"first call (compiles) {name}: {time.perf_counter() - started:.1f} s", flush=True)
            rates = interleaved_rates(runs, args.tokens * batch, args.repeats)
        base = rates["transformers"]
        print(f"\n== batch {batch}, prompts {encoded['input_ids'].shape[1]} tokens (padded)")
        print(f"{'run':<28} {'tok/s':>8} {'vs transformers':>16}")
        for name, rate in rates.items():
            print(f"{name:<28} {rate:8.1f} {rate / base:16.2f}")
        # the same tokens: StepFlow's first decode steps already act on the bridge
        out = stepsal.generate(model, messages, flow, max_new_tokens=args.tokens, stop_at_eos=False,
                               tokenizer=tokenizer)
        print(f"StepFlow acted: {out.stats!r}")


if __name__ == "__main__":
    main()
