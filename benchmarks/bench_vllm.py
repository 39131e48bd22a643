"""StepFlow inside vLLM: its cost over plain vLLM, and vLLM against transformers ``generate``, side by side.

For each batch size: the first N shipped problems (chat template, thinking opened), greedy,
``--new-tokens`` new tokens per row (EOS ignored, so every run decodes the same number of tokens).
Runs alternate (plain, StepFlow, plain, ...) and the median of ``--repeats`` is kept, so the ratios
come from one run on one machine; absolute tokens/s on a shared CPU are not comparable across runs.
The last table sets vLLM (plain and StepFlow) beside transformers ``generate`` (plain, and StepFlow's
fast path) at the first batch size.

Usage (the vLLM environment, make venv-vllm):
  VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=4 .venv-vllm/bin/python benchmarks/bench_vllm.py
On a GPU (vLLM installed there): python benchmarks/bench_vllm.py --dtype bfloat16 --batches 8 32 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import stepsal
from stepsal.formats import get_format
from stepsal.generation import encode_prompts
from stepsal.tasks.problems import load_problems
from stepsal.vllm import Request, load_engine, run_requests


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def vllm_rates(engine, tokenizer, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s of plain and StepFlow requests (alternating runs, medians)."""
    fmt, flow = get_format("think"), stepsal.StepFlow()
    times: dict[str, list[float]] = {"plain": [], "stepflow": []}
    for _ in range(repeats):
        for name, condition in (("plain", None), ("stepflow", flow)):
            requests = [Request(p, condition, new_tokens, stop_at_eos=False) for p in prompts]
            times[name].append(timed(lambda r=requests: run_requests(engine, tokenizer, r, fmt)))
    return {name: len(prompts) * new_tokens / statistics.median(t) for name, t in times.items()}


def transformers_rates(folder, tokenizer, messages: list, new_tokens: int, repeats: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    times: dict[str, list[float]] = {"plain": [], "stepflow": []}
    for _ in range(repeats):
        for name, condition in (("plain", None), ("stepflow", stepsal.StepFlow())):
            times[name].append(timed(lambda c=condition: stepsal.generate(
                model, messages, c, max_new_tokens=new_tokens, stop_at_eos=False, tokenizer=tokenizer)))
    return {name: len(messages) * new_tokens / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-reasoner")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers generate table")
    args = parser.parse_args()
    engine = load_engine(args.model, dtype=args.dtype, seed=0)
    tokenizer = engine.get_tokenizer()
    problems = load_problems(limit=max(args.batches))
    messages = [problem.messages() for problem in problems]
    prompts = [encode_prompts(tokenizer, m)[0] for m in messages]
    run_requests(engine, tokenizer, [Request(prompts[0], stepsal.StepFlow(), 8)], get_format("think"))  # warm up
    print(f"vLLM {args.model} ({args.dtype}), {args.new_tokens} new tokens per row, median of {args.repeats}")
    print(f"{'batch':>6} {'plain tok/s':>12} {'StepFlow tok/s':>15} {'StepFlow / plain':>17}")
    first = None
    for batch in args.batches:
        rates = vllm_rates(engine, tokenizer, prompts[:batch], args.new_tokens, args.repeats)
        first = first or (batch, rates)
        ratio = rates["stepflow"] / rates["plain"]
        print(f"{batch:>6} {rates['plain']:>12.1f} {rates['stepflow']:>15.1f} {ratio:>17.2f}")
    if args.no_transformers or first is None:
        return
    from stepsal.embedded import EMBEDDED, embedded_folder

    batch, served = first
    folder = embedded_folder(args.model) if args.model in EMBEDDED else args.model
    local = transformers_rates(folder, tokenizer, messages[:batch], args.new_tokens, args.repeats)
    print(f"\nbatch {batch}: vLLM / transformers generate (same machine, same run)")
    for name in ("plain", "stepflow"):
        print(f"  {name:>8}: vLLM {served[name]:.1f} tok/s, transformers {local[name]:.1f} tok/s, "
              f"ratio {served[name] / local[name]:.2f}")


if __name__ == "__main__":
    main()
