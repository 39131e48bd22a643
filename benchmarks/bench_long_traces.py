"""Step-Saliency's blockwise mode (long traces) against the floor, side by side in one run.

The floor of any attention x gradient method: one forward and backward of plain transformers with
fused attention (``attn_implementation="sdpa"``) and gradient checkpointing, parameters frozen,
the gradient taken to the input embeddings (``benchmarks/gpu.py``'s ``hf_sdpa_ckpt_fb``). Against
it: ``step_saliency(model, trace, mode="blockwise")`` on the same weights through TransformerLens
(target ``all``: the mean next-token loss, like the floor's).

Model: SmolLM2-135M-Instruct (30 layers, fp32; its context raised past 8192 for T = 16384, which
changes values, not cost). Trace: T random tokens in 60 equal steps. Each measurement runs in a
fresh process (time of the call, best of ``--repeats``; peak resident memory over it); the two kinds
alternate at each T. Goal: blockwise / floor <= 1.5 at T = 2048, 4096 and 16384.

Usage: python benchmarks/bench_long_traces.py [--sizes 2048 4096 16384] [--repeats 1] [--backend hooked]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(__file__))

KINDS = ("floor", "blockwise")


def load(kind: str, backend: str | None):
    """The floor's transformers model (sdpa, checkpointing, frozen) or the TransformerLens model."""
    from bench_saliency import LONG_CONTEXT
    from transformers import AutoTokenizer, LlamaForCausalLM

    import stepsal
    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m")
    hf = LlamaForCausalLM.from_pretrained(folder, max_position_embeddings=LONG_CONTEXT, attn_implementation="sdpa")
    if kind == "blockwise":
        return stepsal.load_model(hf.eval(), AutoTokenizer.from_pretrained(folder), backend=backend)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()  # checkpointing is active in train mode only; Llama has no dropout
    hf.requires_grad_(False)
    return hf


def worker(kind: str, n_tokens: int, repeats: int, backend: str | None) -> None:
    from bench_saliency import peak_rss_bytes, reset_peak_rss, rss_bytes
    from gpu import hf_checkpointed_forward_backward, synthetic_trace

    import stepsal

    model = load(kind, backend)
    vocab = model.config.vocab_size if kind == "floor" else model.cfg.d_vocab
    run = (lambda trace: hf_checkpointed_forward_backward(model, trace.tokens)) if kind == "floor" else \
        (lambda trace: stepsal.step_saliency(model, trace, mode="blockwise"))
    run(synthetic_trace(64, vocab))  # warm-up
    trace = synthetic_trace(n_tokens, vocab)
    times, peak = [], 0
    for _ in range(repeats):
        before = rss_bytes()
        reset_peak_rss()
        started = time.perf_counter()
        run(trace)
        times.append(time.perf_counter() - started)
        peak = max(peak, peak_rss_bytes() - before)
    print(json.dumps({"time": min(times), "peak": peak}))


def measure(kind: str, n_tokens: int, repeats: int, backend: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", kind, str(n_tokens), str(repeats), backend or "default"]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[2048, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=1, help="calls per measurement (the best counts)")
    parser.add_argument("--backend", default=None, help="TransformerLens backend (default: load_model's)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, n_tokens, repeats, backend = args.worker
        return worker(kind, int(n_tokens), int(repeats), None if backend == "default" else backend)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M fp32, random tokens, 60 steps")
    print(f"{'T':>6} {'floor s':>8} {'blockwise s':>11} {'ratio':>6} {'floor GB':>8} {'blockwise GB':>12}")
    for n_tokens in args.sizes:
        r = {kind: measure(kind, n_tokens, args.repeats, args.backend) for kind in KINDS}
        print(f"{n_tokens:6d} {r['floor']['time']:8.1f} {r['blockwise']['time']:11.1f} "
              f"{r['blockwise']['time'] / r['floor']['time']:6.2f} {r['floor']['peak'] / 2**30:8.2f} "
              f"{r['blockwise']['peak'] / 2**30:12.2f}", flush=True)
    print("goal: ratio <= 1.5 at every T")


if __name__ == "__main__":
    main()
