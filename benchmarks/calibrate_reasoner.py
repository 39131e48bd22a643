"""StepFlow calibrated on the small reasoner: the search, the choice, and the test split (docs/results.md).

    .venv/bin/python benchmarks/calibrate_reasoner.py --limit 100 --max-candidates 9 --out results/calibrate

``stepsal.calibrate`` on the first ``--limit`` shipped problems (greedy answers, half of them held out
as the test split), then, once the choice is made, the paper's settings on the same test split for
comparison (they were not chosen by it, so reading the test split for them steers nothing). Prints
Markdown: the search, the chosen settings, and both paired results on the test split. Resumable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas
from what_matters import markdown

import stepsal
from stepsal.backends import adapter_for
from stepsal.studies.calibration import PAPER, candidate_flow
from stepsal.studies.evaluate import evaluate, shard_file


def paired_row(name: str, result: stepsal.EvalResult) -> dict:
    paired = result.paired("greedy")
    low, high = paired["ci"]
    return {"StepFlow": name, "problems": paired["problems"], "baseline": paired["baseline"],
            "StepFlow pass@1": paired["stepflow"], "difference": paired["difference"],
            "95% CI": f"[{low:+.3f}, {high:+.3f}]", "changed": paired["problems_changed"],
            "sign-flip p": paired["p_value"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-reasoner")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-candidates", type=int, default=9)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--out", default="results/calibrate")
    args = parser.parse_args()
    out = Path(args.out)
    model = stepsal.load_model(args.model)
    problems = stepsal.load_problems(limit=args.limit)
    result = stepsal.calibrate(model, problems, out=out, k=0, max_new_tokens=args.max_new_tokens,
                               max_candidates=args.max_candidates, eta=args.eta, progress=False)
    print(f"# {result!r}\n")
    print("## The search on the development split (greedy pass@1, paired with the baseline)\n")
    columns = ["round", "candidate", "problems", "baseline", "stepflow", "gain", "p_value"]
    print(markdown(result.search[columns]))
    print(f"\nchosen: `{json.dumps(result.chosen)}`\n")

    test = [p for p in problems if p.id in set(result.split["test"])]  # the split calibrate made
    paper_folder = out / "test-paper"  # after the choice: the paper's settings on the same test split
    if not shard_file(paper_folder, (0, 1)).exists():  # the test baseline, once: only StepFlow is generated there
        paper_folder.mkdir(parents=True, exist_ok=True)
        lines = shard_file(out / "test", (0, 1)).read_text().splitlines(keepends=True)
        shard_file(paper_folder, (0, 1)).write_text("".join(line for line in lines
                                                            if json.loads(line)["condition"] == "baseline"))
    n_layers = adapter_for(model).n_layers
    paper = evaluate(model, test, candidate_flow(PAPER, n_layers), out=paper_folder, k=0,
                     max_new_tokens=args.max_new_tokens, progress=False)
    chosen = stepsal.load_samples(out / "test")
    print(f"## The test split ({len(test)} problems, greedy), read once the choice was made\n")
    print(markdown(pandas.DataFrame([paired_row("calibrated (chosen on dev)", chosen),
                                     paired_row("the paper's settings", paper)])))


if __name__ == "__main__":
    main()
