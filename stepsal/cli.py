"""Command line: ``stepsal analyze`` (Step-Saliency of a trace and its report), ``stepsal report`` (one page
from saved results), ``stepsal sweep`` (an intervention layer by layer), ``stepsal generate`` (with StepFlow),
``stepsal eval`` (accuracy with and without StepFlow) and ``stepsal study`` (correct vs wrong traces)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import cast

from ._offline import apply_offline_defaults
from .cli_common import (
    CliError,
    check_out,
    check_trace_text,
    example_trace_text as example_trace_text,  # re-exported: notebooks import it here
    load_for_cli,
    make_out,
    parse_layers,
    read_trace_text,
)
from .cli_studies import add_study_parsers
from .errors import StepsalWarning
from .formats import FORMATS
from .options import BACKENDS, DTYPE_NAMES, MODES, NORMS, RULES, SWEEP_METRICS, TARGET_NAMES, SaliencyOptions


def analyze(args: argparse.Namespace) -> int:
    text = read_trace_text(args)
    check_trace_text(text, args.fmt, args.min_steps, args.target, args.answer)
    out = check_out(args.out)
    from . import Trace, step_saliency  # lazy: keeps --help torch-free
    from .saliency import check_trace_fits  # lazy: keeps --help torch-free
    from .vis.report import write_report  # lazy: keeps --help torch-free

    model = load_for_cli(args)
    trace = Trace.from_text(text, model, fmt=args.fmt, min_thinking_steps=args.min_steps)
    check_trace_fits(model, trace)  # before printing the steps: a trace too long for the model stops here
    print(trace.describe(max_steps=20))
    started = time.perf_counter()
    options = SaliencyOptions.from_dict({"target": args.target, "rule": args.rule, "norm": args.norm,
                                         "per_head": args.per_head, "answer": args.answer, "token_level": True,
                                         "mode": args.mode})
    result = step_saliency(model, trace, options=options)
    print(f"\nStep-Saliency ({args.rule}, target {result.target}) in {time.perf_counter() - started:.1f} s")
    metrics = result.metrics()
    print("\nper-layer measures (row-normalised maps):")
    print(metrics.table())
    print("\nper-trace summary (shallow = bottom quarter, deep = top half of the layers):")
    for name, value in metrics.per_trace().items():
        print(f"  {name:<17} {value: .4f}")
    result.save(make_out(out) / "saliency.safetensors")
    (out / "trace.json").write_text(json.dumps(trace.to_dict()))
    (out / "metrics.json").write_text(json.dumps(metrics.per_trace(), indent=2))
    result.plot(path=out / "step_maps.png")
    write_report(out, [result], [f"{args.model}: {'example trace' if args.example else args.trace}"])
    print(f"\nwrote {out}/report.html, step_maps.png, saliency.safetensors, trace.json, metrics.json")
    return 0


def parse_intervention(text: str):
    """'knockout:QUERIES:KEYS' (groups: question/thinking/summary or step indices like 3+4), 'oeb' or
    'smi' (StepFlow's part at the swept layer only) -> model -> ((layer, trace) -> context manager)."""
    parts = text.split(":")
    if parts[0] == "knockout" and len(parts) == 3:
        try:
            queries, keys = ([int(s) for s in p.split("+")] if p[:1].isdigit() else p for p in parts[1:])
        except ValueError:
            raise CliError(f"--intervention {text}: a group is question, thinking, summary or step indices like "
                           "3+4.") from None

        def knockout_at(model):
            from .studies import knockout  # lazy: keeps --help torch-free

            return lambda layer, trace: knockout(model, trace, queries, keys, layers=[layer])
        return knockout_at
    if text in ("oeb", "smi"):
        def stepflow_part_at(model):
            from .stepflow import StepFlow  # lazy: keeps --help torch-free

            def attach(layer: int, trace):
                return StepFlow(oeb_layers=[layer] if text == "oeb" else [],
                                smi_layers=[layer] if text == "smi" else []).attached(model, trace)
            return attach
        return stepflow_part_at
    raise CliError(f"--intervention must be 'knockout:QUERIES:KEYS', 'oeb' or 'smi'; got {text!r}.")


def sweep_command(args: argparse.Namespace) -> int:
    make_intervention = parse_intervention(args.intervention)
    texts = []
    for path in args.trace:
        texts.append(read_trace_text(argparse.Namespace(example=False, trace=path)))
        check_trace_text(texts[-1], args.fmt, 1)
    layers = parse_layers(args.layers)  # before the model loads: a typo fails at once
    out = check_out(args.out)
    from . import Trace, layer_sweep  # lazy: keeps --help torch-free

    model = load_for_cli(args)
    traces = [Trace.from_text(text, model, fmt=args.fmt, min_thinking_steps=1) for text in texts]
    sweep = layer_sweep(model, traces, make_intervention(model), metric=args.metric, layers=layers)
    with open(make_out(out) / "sweep.jsonl", "w") as handle:
        for row in sweep.frame.to_dict("records"):
            handle.write(json.dumps({**row, "trace_file": args.trace[row["trace"]], "intervention": args.intervention,
                                     "metric": args.metric}) + "\n")
    fig = sweep.plot()
    fig.savefig(out / "sweep.png", dpi=120)
    print(sweep.summary().to_string(index=False))
    print(f"\nwrote {out}/sweep.jsonl, sweep.png")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from .studies.report import report_from_folder  # lazy: keeps --help torch-free

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder; pass the folder that holds saved results (*.safetensors).")
    out = make_out(check_out(args.out)) if args.out else None
    path = report_from_folder(folder, out, max_sections=None if args.max_sections < 0 else args.max_sections)
    print(f"wrote {path}")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.message):
        raise CliError("pass either --prompt TEXT (used as is) or --message TEXT (chat).")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}.")
    oeb_layers, smi_layers = parse_layers(args.oeb_layers), parse_layers(args.smi_layers)
    flow_options = [args.oeb_layers, args.smi_layers, args.tau_max, args.alpha]
    if not args.stepflow and any(option is not None for option in flow_options):
        raise CliError("--oeb-layers/--smi-layers/--tau-max/--alpha need --stepflow.")
    if not args.sample and any(option is not None for option in (args.temperature, args.top_p, args.seed)):
        raise CliError("--temperature/--top-p/--seed need --sample (without it, decoding is greedy).")
    out_dir = check_out(args.out)
    from . import StepFlow, generate  # lazy: keeps --help torch-free

    model = load_for_cli(args)
    prompt: str = args.prompt
    if args.message:
        tokenizer = model.tokenizer
        if tokenizer is None:  # load_model always attaches one
            raise CliError(f"--message needs the model's tokenizer (its chat template); {args.model} has none.")
        # tokenize=False: the text (transformers types the return as text or ids)
        prompt = cast(str, tokenizer.apply_chat_template([{"role": "user", "content": args.message}],
                                                         tokenize=False, add_generation_prompt=True))
        if args.start_thinking and not prompt.rstrip().endswith("<think>"):  # R1-style templates open it already
            prompt += "<think>\n"
    flow = None
    if args.stepflow:
        defaults = StepFlow()
        flow = StepFlow(oeb_layers=oeb_layers, smi_layers=smi_layers,
                        tau_max=defaults.tau_max if args.tau_max is None else args.tau_max,
                        alpha=defaults.alpha if args.alpha is None else args.alpha)
        print(flow.describe(model))
    started = time.perf_counter()
    out = generate(model, prompt, flow, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                   temperature=1.0 if args.temperature is None else args.temperature,
                   top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed, fmt=args.fmt,
                   marker_in_output=args.marker_in_output)
    seconds = time.perf_counter() - started
    n_new = len(out.tokens[0]) - out.prompt_lengths[0]
    print(f"--- {n_new} new tokens in {seconds:.1f} s ({n_new / seconds:.1f} tok/s) ---")
    print(out.text)
    if out.stats is not None:
        print("\n" + out.stats.table())
    record = {"prompt": prompt, "text": out.text, "tokens": out.tokens[0].tolist(),
              "stepflow": None if flow is None else flow.describe(model),
              "stats": None if out.stats is None else out.stats.to_dict(), "trace_error": out.trace_errors[0]}
    (make_out(out_dir) / "generation.json").write_text(json.dumps(record, indent=2))
    if out.traces[0] is not None:
        (out_dir / "trace.json").write_text(json.dumps(out.traces[0].to_dict()))
    print(f"\nwrote {out_dir}/generation.json" + (", trace.json" if out.traces[0] is not None else ""))
    return 0


DEFAULT_MODEL = "smollm2-135m-reasoner"  # every command's: the model that writes traces in the think format


def add_model_arguments(parser: argparse.ArgumentParser, default_backend: str | None) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded name or a save_pretrained folder (default {DEFAULT_MODEL}; smollm2-135m: "
                             "the base model)")
    parser.add_argument("--backend", choices=BACKENDS, default=default_backend)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # options every command takes, before or after its name
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="stepsal", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", parents=[common], help="Step-Saliency of one trace: metrics, heatmap, saved result")
    add_model_arguments(a, default_backend=None)
    a.add_argument("--trace", help="a text file holding the full trace (chat template included)")
    a.add_argument("--example", action="store_true", help="use the example trace shipped with stepsal")
    a.add_argument("--fmt", default="think", choices=sorted(FORMATS))
    a.add_argument("--min-steps", type=int, default=2, help="minimum number of thinking steps")
    a.add_argument("--target", default="all", choices=TARGET_NAMES)
    a.add_argument("--answer", help="answer text (for --target answer)")
    a.add_argument("--rule", default="ag", choices=RULES)
    a.add_argument("--norm", default="causal", choices=NORMS)
    a.add_argument("--per-head", action="store_true")
    a.add_argument("--mode", default="auto", choices=MODES,
                   help="backward pass: auto (blockwise from 1024 tokens), patterns, blockwise (memory linear in "
                        "the trace length), recompute")
    a.add_argument("--out", default="stepsal-out", help="output folder (report.html, figures, saved result)")
    a.set_defaults(func=analyze)

    r = sub.add_parser("report", parents=[common],
                       help="one offline HTML page from saved results (a folder of *.safetensors)")
    r.add_argument("folder", help="folder of saved results; two subfolders (e.g. correct/, wrong/) are compared")
    r.add_argument("--out", default=None, help="where report.html goes (default: the folder)")
    r.add_argument("--max-sections", type=int, default=20,
                   help="full sections (widgets, figure) for the first N results; all are listed (-1: all)")
    r.set_defaults(func=report_command)

    s = sub.add_parser("sweep", parents=[common], help="an intervention at one layer at a time: what it changes")
    add_model_arguments(s, default_backend=None)
    s.add_argument("--trace", action="append", required=True, help="a trace file (repeat for several)")
    s.add_argument("--fmt", default="think", choices=sorted(FORMATS))
    s.add_argument("--intervention", default="knockout:summary:thinking",
                   help="'knockout:QUERIES:KEYS' (question/thinking/summary or steps like 3+4), 'oeb' or 'smi'")
    s.add_argument("--metric", default="summary_loss", choices=SWEEP_METRICS)
    s.add_argument("--layers", help="e.g. '0,1,2' (default: every layer with attention)")
    s.add_argument("--out", default="stepsal-out", help="output folder (sweep.jsonl, sweep.png)")
    s.set_defaults(func=sweep_command)

    g = sub.add_parser("generate", parents=[common], help="generate with the KV cache, optionally with StepFlow")
    # the faster backend for decoding; the small reasoner, which writes <think> steps </think> summary
    add_model_arguments(g, default_backend="bridge")
    g.add_argument("--prompt", help="prompt text, used as is (include the chat template)")
    g.add_argument("--message", help="a user message; the chat template is applied")
    g.add_argument("--start-thinking", action="store_true", help="with --message: append '<think>\\n'")
    g.add_argument("--fmt", default="think", choices=sorted(FORMATS))
    g.add_argument("--stepflow", action="store_true", help="attach StepFlow (paper defaults)")
    g.add_argument("--oeb-layers", help="e.g. '0,1,2', or 'off' (default: bottom quarter)")
    g.add_argument("--smi-layers", help="e.g. '27,28,29', or 'off' (default: top quarter)")
    g.add_argument("--tau-max", type=float, default=None, help="default 0.15")
    g.add_argument("--alpha", type=float, default=None, help="default 0.06")
    g.add_argument("--marker-in-output", action="store_true", help="the model writes the thinking marker")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, help="with --sample (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="with --sample (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="with --sample")
    g.add_argument("--out", default="stepsal-out", help="output folder")
    g.set_defaults(func=generate_command)

    add_study_parsers(sub, common, add_model_arguments)
    return parser


EXPECTED = (CliError, OSError, ValueError, ModuleNotFoundError, KeyError)  # StepsalError is a ValueError


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (CliError, ValueError, OSError)) else f"{type(error).__name__}: {text}"


def as_flags(text: str, args: argparse.Namespace) -> str:
    """A library message in the command's terms: ``name=True`` becomes ``--name`` and ``name=value``
    ``--name value`` for each of the command's options; a message that names a flag already was
    written for the command line and is left alone."""
    flags = {name: "--" + name.replace("_", "-") for name in vars(args) if name not in ("func", "command")}
    if any(re.search(rf"{flag}\b", text) for flag in flags.values()):
        return text
    for name, flag in flags.items():
        text = re.sub(rf"(?<![\w.-]){name}=True\b", flag, text)
        text = re.sub(rf"(?<![\w.-]){name}=(?=\S)", flag + " ", text)
    return text


def report_warnings(args: argparse.Namespace, caught: list, ours: type) -> None:
    """stepsal's warnings as one line each (once per text); other libraries' as they would show."""
    seen = set()
    for warning in caught:
        if not issubclass(warning.category, ours):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        text = as_flags(" ".join(str(warning.message).split()), args)
        if text not in seen:
            seen.add(text)
            print(f"stepsal {args.command}: warning: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a problem prints one line on stderr and returns 1 (``--debug``: the traceback)."""
    apply_offline_defaults()  # a program, not the library: offline for this process (before any hub import)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what started it (eval's data parallelism reuses it)
    caught: list = []
    try:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", StepsalWarning)
                return args.func(args)
        finally:  # also when the command fails (a warning may explain the error); outside the recording
            report_warnings(args, caught, StepsalWarning)  # context, where showing a warning shows it
    except KeyboardInterrupt:
        print(f"stepsal {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every error becomes one line unless --debug (which re-raises)
        if getattr(args, "debug", False):
            raise
        hint = "" if isinstance(error, EXPECTED) else " (an unexpected error: rerun with --debug for the traceback)"
        print(f"stepsal {args.command}: error: {as_flags(one_line(error), args)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
