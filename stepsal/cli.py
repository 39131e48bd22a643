"""Command line: ``stepsal analyze`` runs Step-Saliency on a trace and writes a report folder."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from ._offline import apply_offline_defaults

apply_offline_defaults()


def example_trace_text() -> str:
    """The example trace shipped with the package (SmolLM2 chat template, ``think`` format)."""
    return resources.files("stepsal").joinpath("data/example_trace.txt").read_text()


def analyze(args: argparse.Namespace) -> int:
    import torch

    from . import Trace, load_model, step_saliency
    from .vis.figures import plot_step_maps

    if args.example == bool(args.trace):
        raise SystemExit("stepsal analyze: pass either --example or --trace FILE.")
    text = example_trace_text() if args.example else Path(args.trace).read_text()
    started = time.perf_counter()
    model = load_model(args.model, backend=args.backend, device=args.device,
                       dtype=getattr(torch, args.dtype))
    print(f"model {args.model} ({type(model).__name__}, {model.cfg.n_layers} layers, "
          f"{model.cfg.n_heads} heads) loaded in {time.perf_counter() - started:.1f} s")
    trace = Trace.from_text(text, model, fmt=args.fmt, min_thinking_steps=args.min_steps)
    print(trace.describe())
    started = time.perf_counter()
    result = step_saliency(model, trace, target=args.target, rule=args.rule, norm=args.norm,
                           per_head=args.per_head, answer=args.answer,
                           checkpoint={"auto": None, "on": True, "off": False}[args.checkpoint])
    print(f"\nStep-Saliency ({args.rule}, target {result.target}) in {time.perf_counter() - started:.1f} s")
    metrics = result.metrics()
    print("\nper-layer measures (row-normalised maps):")
    print(metrics.table())
    print("\nper-trace summary (shallow = bottom quarter, deep = top half of the layers):")
    for name, value in metrics.per_trace().items():
        print(f"  {name:<17} {value: .4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "saliency.safetensors")
    (out / "trace.json").write_text(json.dumps(trace.to_dict()))
    (out / "metrics.json").write_text(json.dumps(metrics.per_trace(), indent=2))
    plot_step_maps(result, path=out / "step_maps.png")
    print(f"\nwrote {out}/step_maps.png, saliency.safetensors, trace.json, metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="Step-Saliency of one trace: metrics, heatmap, saved result")
    a.add_argument("--model", default="smollm2-135m", help="embedded name or a save_pretrained folder")
    a.add_argument("--backend", choices=["hooked", "bridge"], default=None)
    a.add_argument("--device", default=None)
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--trace", help="a text file holding the full trace (chat template included)")
    a.add_argument("--example", action="store_true", help="use the example trace shipped with stepsal")
    a.add_argument("--fmt", default="think", choices=["think", "harmony", "plain"])
    a.add_argument("--min-steps", type=int, default=2, help="minimum number of thinking steps")
    a.add_argument("--target", default="all", choices=["all", "summary", "answer"])
    a.add_argument("--answer", help="answer text (for --target answer)")
    a.add_argument("--rule", default="ag", choices=["ag", "ag_signed", "g"])
    a.add_argument("--norm", default="causal", choices=["causal", "block", "row"])
    a.add_argument("--per-head", action="store_true")
    a.add_argument("--checkpoint", default="auto", choices=["auto", "on", "off"],
                   help="recompute one block at a time (long traces)")
    a.add_argument("--out", default="stepsal-out", help="output folder")
    a.set_defaults(func=analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
