"""The tables of docs/results.md from an evaluation folder (and a study folder), as Markdown.

    .venv/bin/stepsal eval --limit 100 --k 4 --out results/eval            # ~1 h on 2 CPU cores
    .venv/bin/stepsal study --limit 100 --k 4 --out results/study          # reuses results/eval's samples if copied
    .venv/bin/python benchmarks/results_tables.py results/eval [results/study]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas

from stepsal.saliency import StepSaliency
from stepsal.studies.evaluate import load_samples


def markdown(frame, floats: str = "{:.3f}") -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    rows = ("| " + " | ".join(floats.format(v) if isinstance(v, float) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False))
    return head + "\n".join(rows)


def main(eval_folder: str, study_folder: str | None = None) -> None:
    result = load_samples(eval_folder)
    print("## Accuracy and format\n")
    print(markdown(result.summary()))
    per = result.per_problem()
    by_steps = per.pivot_table(index="steps", columns=["condition", "mode"], values="pass@1", aggfunc="mean")
    by_steps.columns = [f"{c} {m}" for c, m in by_steps.columns]
    counts = per[(per.condition == "baseline") & (per["mode"] == per["mode"].iloc[0])].groupby("steps").size()
    by_steps.insert(0, "problems", counts)
    print("\n## pass@1 by number of steps\n")
    print(markdown(by_steps.reset_index()))
    print("\n## StepFlow - baseline, paired\n")
    for mode in sorted(result.frame["mode"].unique()):
        try:
            paired = result.paired(mode)
        except ValueError as error:
            print(f"- {mode}: {error}")
            continue
        low, high = paired["ci"]
        print(f"- {mode}: baseline {paired['baseline']:.3f}, StepFlow {paired['stepflow']:.3f}, difference "
              f"{paired['difference']:+.3f} (95% CI [{low:+.3f}, {high:+.3f}], {paired['problems']} problems, "
              f"{paired['problems_changed']} changed; sign-flip p = {paired['p_value']:.3f})")
    if study_folder:
        study = json.loads((Path(study_folder) / "study.json").read_text())
        print("\n## Correct vs wrong\n")
        print(f"traces: {study['traces']}, not studied: {study['skipped']}, "
              f"descriptive only: {study['descriptive_only']}\n")
        if study["comparison"]:
            print(markdown(pandas.DataFrame(study["comparison"])))
            print("\n## Correct vs wrong at the same number of steps (per-trace means; n correct / wrong)\n")
            print(markdown(by_steps_table(Path(study_folder), result)))


def by_steps_table(folder: Path, result) -> pandas.DataFrame:
    """Per number of steps in the problem: each per-trace measure's mean in correct and wrong traces, so
    that a difference is not only the harder problems' longer traces."""
    steps = dict(zip(result.frame["problem"], result.frame["steps"], strict=True))
    rows = []
    for group in ("correct", "wrong"):
        for path in sorted((folder / group).glob("*.safetensors")):
            measures = StepSaliency.load(path).metrics().per_trace()
            rows.append({"group": group, "steps": steps[path.name.split(".")[0]], **measures})
    frame = pandas.DataFrame(rows)
    table = frame.groupby(["steps", "group"]).agg(n=("lock_in", "size"), lock_in=("lock_in", "mean"),
                                                   recency=("recency", "mean"), decay=("decay", "mean"))
    wide = table.unstack("group")
    wide.columns = [f"{measure} {group}" for measure, group in wide.columns]
    return wide.reset_index()


if __name__ == "__main__":
    main(*sys.argv[1:])
