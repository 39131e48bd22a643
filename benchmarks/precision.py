"""What changes in bf16 and fp16 against float32, on the embedded SmolLM2-135M and the example trace.

Printed per dtype: logits (max |diff| relative to the largest logit), step maps (max |diff| relative
to the largest map entry, per layer: worst and median), the per-trace metrics (lock-in, decay
slope, ...), and how many greedy tokens agree before the first difference (with and without StepFlow).

Usage: python benchmarks/precision.py [--new-tokens 48] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import stepsal
    from stepsal.cli import example_trace_text

    results = {}
    prompt = [{"role": "user", "content": "What is 17 * 3? Think step by step."}]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = stepsal.load_model("smollm2-135m", backend="bridge", dtype=dtype, device=args.device)
        trace = stepsal.Trace.from_text(example_trace_text(), model)
        with torch.no_grad():
            logits = model(trace.tokens[None].to(args.device), use_cache=False).double().cpu()
        saliency = stepsal.step_saliency(model, trace)
        flow = stepsal.StepFlow()
        generated = {name: stepsal.generate(model, prompt, f, max_new_tokens=args.new_tokens, stop_at_eos=False,
                                            marker_in_output=True).tokens[0]
                     for name, f in (("plain", None), ("StepFlow", flow))}
        results[dtype] = (logits, saliency, generated)
        del model
    logits32, saliency32, generated32 = results[torch.float32]
    maps32 = saliency32.maps.double()
    metrics32 = saliency32.metrics().per_trace()
    print(f"SmolLM2-135M, example trace ({len(trace)} tokens, {trace.layout.n_steps} steps), device {args.device}")
    for dtype in (torch.bfloat16, torch.float16):
        logits, saliency, generated = results[dtype]
        maps = saliency.maps.double()
        per_layer = ((maps - maps32).abs().flatten(1).max(1).values / maps32.abs().flatten(1).max(1).values)
        print(f"\n== {dtype}")
        print(f"logits: max |diff| / max |logit| = {float((logits - logits32).abs().max() / logits32.abs().max()):.2e}")
        print(f"step maps: relative max |diff| per layer: worst {float(per_layer.max()):.2e} "
              f"(layer {int(per_layer.argmax())}), median {float(per_layer.median()):.2e}; whole maps "
              f"{float((maps - maps32).norm() / maps32.norm()):.2e} (Frobenius)")
        metrics = saliency.metrics().per_trace()
        for name, value in metrics.items():
            reference = metrics32[name]
            print(f"  metric {name:<28} fp32 {reference:+.5f}  {str(dtype)[6:]:>8} {value:+.5f}  "
                  f"diff {value - reference:+.2e}")
        for name, tokens in generated.items():
            reference = generated32[name]
            n = min(len(tokens), len(reference))
            same = int((tokens[:n] == reference[:n]).long().cumprod(0).sum())
            print(f"  greedy {name:<9}: first {same} of {n} tokens equal to float32 (prompt included)")


if __name__ == "__main__":
    main()
