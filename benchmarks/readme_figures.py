"""The figures the README quotes, measured again: SmolLM2 load times from the cache (both backends,
each in a fresh process, import of torch and stepsal apart) and the README's StepFlow example
on the small reasoner (rows OEB changed, bridge mass before -> after, SMI injections).

Usage: .venv/bin/python benchmarks/readme_figures.py [--stepflow-only]
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOAD = """
import time, warnings; warnings.simplefilter("ignore")
started = time.perf_counter(); import torch, stepsal; imported = time.perf_counter()
stepsal.load_model("smollm2-135m", backend="{backend}")
print(f"{{imported - started:.1f}} {{time.perf_counter() - imported:.1f}}")
"""

PROBLEM = 2  # the README's example: stepsal.load_problems()[2]


def load_times() -> None:
    import stepsal

    stepsal.load_model("smollm2-135m")  # builds the cache on first use, outside the timing
    for backend in ("bridge", "hooked"):
        out = subprocess.run([sys.executable, "-c", LOAD.format(backend=backend)], capture_output=True, text=True,
                             check=True).stdout.split()
        print(f"load smollm2-135m from the cache, {backend:>6}: import {out[0]} s, load {out[1]} s")


def stepflow_example() -> None:
    import stepsal

    warnings.simplefilter("ignore")
    flow = stepsal.StepFlow()
    model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
    problem = stepsal.load_problems()[PROBLEM]
    for f in (None, flow):
        out = stepsal.generate(model, problem.messages(), f, max_new_tokens=160)
        print(f"\nREADME StepFlow example, {'with' if f else 'without'} StepFlow: "
              f"{len(out.tokens[0]) - out.prompt_lengths[0]} new tokens, answer {stepsal.extract_answer(out.text)!r} "
              f"(gold {problem.answer})\n{out.text}")
    print(repr(out.stats))
    print(out.stats.table())


if __name__ == "__main__":
    if "--stepflow-only" not in sys.argv:
        load_times()
    stepflow_example()
