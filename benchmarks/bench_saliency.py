"""Step-Saliency cost, measured side by side in one run and printed as ratios.

1. time: step_saliency vs a plain forward+backward of the same model and trace, at T = 256, 1024,
   2048 on 4- and 8-layer models (SmolLM2-135M's widths, random weights). Two baselines:
   ``fb_params`` = loss.backward() with parameter gradients (what a user would write) and
   ``fb_input`` = the same graph without parameter gradients (gradient to the embeddings only,
   the floor of any attention x gradient method). Target: <= 1.15x.
2. peak memory (each measurement in a fresh process: peak RSS during the call, reset through
   /proc/self/clear_refs, minus RSS before it) vs the same
   baselines; target <= 1.25x. Blockwise mode: on the 2-layer model against a
   plain forward+backward at T = 2048 and 4096 (time <= 1.5x), alone at T = 8192 and 16384
   (<= 3 GB); on SmolLM2-135M against the normal mode at T = 2048 and alone up to T = 16384 (< 8 GB).
3. pooling: one matrix product vs the reference's double loop over step pairs at S = 60, T = 2000;
   target >= 100x.

Usage: python benchmarks/bench_saliency.py [--quick] [--skip-long]
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

LONG_CONTEXT = 32768  # positions the long blockwise runs allow (SmolLM2's own config says 8192)


def random_model(n_layers: int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import stepsal
    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m")
    config = LlamaConfig.from_pretrained(folder)
    config.num_hidden_layers = n_layers
    config.max_position_embeddings = LONG_CONTEXT
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    return stepsal.load_model(hf, AutoTokenizer.from_pretrained(folder))


def smollm2_long_context():
    """The real SmolLM2-135M-Instruct with its context raised to LONG_CONTEXT (rotary extends; the
    outputs past 8192 tokens are extrapolation, which does not change cost)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    import stepsal
    from stepsal.embedded import embedded_folder

    folder = embedded_folder("smollm2-135m")
    hf = LlamaForCausalLM.from_pretrained(folder, max_position_embeddings=LONG_CONTEXT).eval()
    return stepsal.load_model(hf, AutoTokenizer.from_pretrained(folder))


def synthetic_trace(model, n_tokens: int, n_steps: int = 40):
    """A trace of exactly n_tokens random ids with n_steps equal steps (Q, thinking, 2 summary)."""
    import stepsal

    generator = torch.Generator().manual_seed(n_tokens)
    tokens = torch.randint(100, model.cfg.d_vocab, (n_tokens,), generator=generator)
    n_steps = min(n_steps, n_tokens // 4)
    token_step = torch.arange(n_tokens) * n_steps // n_tokens
    segments = [0] + [1] * (n_steps - 3) + [2, 2]
    return stepsal.Trace("", tokens, [(0, 0)] * n_tokens, stepsal.StepLayout.from_token_step(token_step, segments))


def run_once(kind: str, model, trace) -> None:
    import torch.nn.functional as F

    import stepsal

    tokens = trace.tokens[None]
    if kind == "fb_params":
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        F.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
        model.zero_grad(set_to_none=True)
    elif kind == "fb_input":
        from stepsal.saliency import frozen_parameters

        store = {}

        def leaf(x, hook):
            store["x"] = x.detach().requires_grad_(True)
            return store["x"]

        with frozen_parameters(model), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", leaf)]):
            logits = model(tokens)
            torch.autograd.grad(F.cross_entropy(logits[0, :-1], tokens[0, 1:]), store["x"])
    elif kind == "saliency":
        stepsal.step_saliency(model, trace, mode="patterns")
    elif kind == "saliency_long":
        stepsal.step_saliency(model, trace, mode="blockwise")
    else:
        raise ValueError(kind)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def worker(kind: str, n_layers: int, n_tokens: int, repeats: int) -> None:
    """One measurement in a fresh process: best time of ``repeats`` and peak RSS over the call."""
    torch.set_grad_enabled(True)
    model = random_model(n_layers) if n_layers > 0 else smollm2_long_context()
    trace = synthetic_trace(model, n_tokens)
    run_once(kind, model, synthetic_trace(model, 32))  # warm-up
    times = []
    for _ in range(repeats):
        before = rss_bytes()
        reset_peak_rss()
        started = time.perf_counter()
        run_once(kind, model, trace)
        times.append(time.perf_counter() - started)
        peak = peak_rss_bytes() - before
    print(json.dumps({"time": min(times), "peak": peak}))


def measure(kind: str, n_layers: int, n_tokens: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(n_layers), str(n_tokens), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_time_and_memory(sizes: list[int], layer_counts: list[int], repeats: int) -> None:
    print("\n== 1-2. step_saliency vs plain forward+backward (random SmolLM2-width models, fp32, CPU)")
    print(f"{'layers':>6} {'T':>5} {'fb_params s':>11} {'fb_input s':>10} {'saliency s':>10} "
          f"{'t/fb_params':>11} {'t/fb_input':>10} {'mem/fb_params':>13} {'mem/fb_input':>12}")
    for n_layers in layer_counts:
        for n_tokens in sizes:
            r = {kind: measure(kind, n_layers, n_tokens, repeats) for kind in ("fb_params", "fb_input", "saliency")}
            print(f"{n_layers:6d} {n_tokens:5d} {r['fb_params']['time']:11.2f} {r['fb_input']['time']:10.2f} "
                  f"{r['saliency']['time']:10.2f} {r['saliency']['time'] / r['fb_params']['time']:11.2f} "
                  f"{r['saliency']['time'] / r['fb_input']['time']:10.2f} "
                  f"{r['saliency']['peak'] / r['fb_params']['peak']:13.2f} "
                  f"{r['saliency']['peak'] / r['fb_input']['peak']:12.2f}", flush=True)


def bench_blockwise_two_layers(long_sizes: list[int]) -> None:
    """The blockwise mode (memory linear in T) on the 2-layer SmolLM2-width model:
    against a plain forward+backward where that fits, alone at T = 16384."""
    print("\n== 2b. blockwise mode, 2 layers with SmolLM2's widths")
    print(f"{'T':>6} {'fb_input s':>10} {'pattern s':>9} {'long s':>8} {'long/fb_input':>13} "
          f"{'fb_input GB':>11} {'pattern GB':>10} {'long GB':>8}")
    for n_tokens in (2048, 4096):
        r = {kind: measure(kind, 2, n_tokens, 2) for kind in ("fb_input", "saliency", "saliency_long")}
        print(f"{n_tokens:6d} {r['fb_input']['time']:10.2f} {r['saliency']['time']:9.2f} "
              f"{r['saliency_long']['time']:8.2f} {r['saliency_long']['time'] / r['fb_input']['time']:13.2f} "
              f"{r['fb_input']['peak'] / 2**30:11.2f} {r['saliency']['peak'] / 2**30:10.2f} "
              f"{r['saliency_long']['peak'] / 2**30:8.2f}", flush=True)
    for n_tokens in long_sizes:
        r = measure("saliency_long", 2, n_tokens, 1)
        print(f"{n_tokens:6d} {'-':>10} {'-':>9} {r['time']:8.2f} {'-':>13} {'-':>11} {'-':>10} "
              f"{r['peak'] / 2**30:8.2f}   (target at 16384: <= 3 GB)", flush=True)


def bench_blockwise_smollm2(sizes: list[int]) -> None:
    print("\n== 2c. blockwise mode on SmolLM2-135M-Instruct (30 layers; context raised past 8192)")
    print(f"{'T':>6} {'mode':>14} {'time s':>8} {'peak GB':>8}")
    for n_tokens, kind in [(2048, "saliency"), *((t, "saliency_long") for t in sizes)]:
        r = measure(kind, 0, n_tokens, 1)
        print(f"{n_tokens:6d} {kind:>14} {r['time']:8.1f} {r['peak'] / 2**30:8.2f}", flush=True)
    print("target: T = 16384 within 8 GB")


def bench_pooling(n_steps: int = 60, n_tokens: int = 2000) -> None:
    from stepsal.pooling import pool

    torch.manual_seed(0)
    scores = torch.rand(n_tokens, n_tokens).tril()
    n_steps = min(n_steps, n_tokens // 4)
    token_step = torch.arange(n_tokens) * n_steps // n_tokens
    members = torch.nn.functional.one_hot(token_step, n_steps).T.float()

    def reference_loop() -> torch.Tensor:  # the reference's O(S^2 T) double loop, rescanning all tokens
        out = torch.zeros(n_steps, n_steps)
        for i in range(n_steps):
            for j in range(n_steps):
                rows = (token_step == i).nonzero().flatten()
                cols = (token_step == j).nonzero().flatten()
                out[i, j] = scores[rows][:, cols].sum()
        return out

    started = time.perf_counter()
    expected = reference_loop()
    loop_time = time.perf_counter() - started
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        got = pool(scores, members)
        best = min(best, time.perf_counter() - started)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-2)
    print(f"\n== 3. pooling S={n_steps}, T={n_tokens}: double loop {loop_time:.3f} s, matrix product "
          f"{best * 1000:.1f} ms, speed-up {loop_time / best:.0f}x (target >= 100x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="T = 256 only, 4 layers")
    parser.add_argument("--skip-long", action="store_true", help="skip the long blockwise runs (T up to 16384, ~1 h)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, n_layers, n_tokens, repeats = args.worker
        return worker(kind, int(n_layers), int(n_tokens), int(repeats))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_pooling()
    if args.quick:
        bench_time_and_memory([256], [4], 2)
        return
    bench_time_and_memory([256, 1024, 2048], [4, 8], 2)
    if not args.skip_long:
        bench_blockwise_two_layers([8192, 16384])
        bench_blockwise_smollm2([2048, 4096, 16384])


if __name__ == "__main__":
    main()
