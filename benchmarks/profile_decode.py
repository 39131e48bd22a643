"""Where decoding time goes: cProfile of stepsal.generate on SmolLM2-135M, top functions by own time.

Backs the explanations in docs/performance.md (HookedTransformer's weight copies, the bridge's
per-module attribute lookups). Usage: python benchmarks/profile_decode.py [hooked|bridge] [--stepflow]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import stepsal

N_TOKENS = 16


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "hooked"
    flow = stepsal.StepFlow() if "--stepflow" in sys.argv else None
    model = stepsal.load_model("smollm2-135m", backend=backend)
    tokenizer = model.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 times 4?"}], tokenize=False,
                                           add_generation_prompt=True) + "<think>\n"
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepsal.generate(model, ids, flow, max_new_tokens=4, stop_at_eos=False)  # warm-up
        profiler = cProfile.Profile()
        profiler.runcall(stepsal.generate, model, ids, flow, max_new_tokens=N_TOKENS, stop_at_eos=False)
    print(f"{backend}, StepFlow {'on' if flow else 'off'}, {N_TOKENS} new tokens")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
