"""Does Step-Saliency point at what matters? The tables of docs/causal.md's results, on the small reasoner.

    .venv/bin/python benchmarks/what_matters.py --limit 60 --resample 40 --rollouts 4 --out results/what-matters

1. a study of the first ``--limit`` problems (greedy answers; per-head maps; each trace's suppression
   matrix): ``run_study(..., agreement=True)``;
2. accuracy along the trace for the first ``--resample`` studied traces (``--rollouts`` samples per
   prefix at R1's temperature), and the three-way agreement on those;
3. prints, as Markdown: the agreement of saliency with suppression over all traces, the three-way
   agreement on the resampled ones, P(correct) along the trace by relative position (correct vs wrong
   traces), and the heads with the highest mean kurtosis (receiver heads).

Everything is resumable under ``--out``; rerunning prints the tables without recomputing.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stepsal
from stepsal.options import SaliencyOptions
from stepsal.stats import spearman
from stepsal.studies.suppression import SuppressionMatrix


def markdown(frame: pandas.DataFrame, floats: str = "{:.3f}") -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    rows = ("| " + " | ".join(floats.format(v) if isinstance(v, float) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False))
    return head + "\n".join(rows)


def position_table(agreements: list) -> pandas.DataFrame:
    """Per importance: the mean over traces (and its range) of its rank correlation with the step's
    position, a confound the three measures can share or not."""
    rows = []
    for column in ("saliency_all", "saliency_shallow", "saliency_deep", "suppression", "resampling"):
        values = []
        for agreement in agreements:
            if column not in agreement.importances:
                continue
            importance = agreement.importances[column].to_numpy(dtype=float)
            known = np.isfinite(importance)
            if known.sum() > 2:
                values.append(spearman(np.flatnonzero(known), importance[known]))
        values = [v for v in values if np.isfinite(v)]
        rows.append({"importance": column, "traces": len(values), "mean rho with position": float(np.mean(values)),
                     "share of traces with rho > 0": float(np.mean(np.array(values) > 0))})
    return pandas.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-reasoner")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--resample", type=int, default=40, help="traces whose accuracy along the trace is measured")
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--out", default="results/what-matters")
    args = parser.parse_args()
    out = Path(args.out)
    model = stepsal.load_model(args.model)
    problems = stepsal.load_problems(limit=args.limit)
    gold = {p.id: p.answer for p in problems}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stepsal.StepsalWarning)
        study = stepsal.run_study(model, problems, out=out / "study", max_new_tokens=args.max_new_tokens,
                                  saliency=SaliencyOptions(per_head=True), agreement=True)
    print(f"# {repr(study)}\n")
    print("## Step-Saliency vs attention suppression, all studied traces\n")
    print(markdown(study.agreement.frame))

    traced = []  # (group, saved map, result, sample row) of every studied trace, in the samples' order
    for row in study.samples.frame.to_dict("records"):
        group = "correct" if row["correct"] else "wrong"
        path = out / "study" / group / f"{row['problem']}.{row['mode']}.{row['sample']}.safetensors"
        if row["condition"] == "baseline" and path.exists():
            traced.append((group, path, stepsal.StepSaliency.load(path), row))
    agreements, curves = [], []
    folder = stepsal.embedded_folder(args.model)  # rollouts through the transformers fast path (same weights)
    hf, tokenizer = (AutoModelForCausalLM.from_pretrained(folder, local_files_only=True),
                     AutoTokenizer.from_pretrained(folder, local_files_only=True))
    for group, path, result, row in traced[:args.resample]:
        trace = stepsal.Trace.from_tokens(row["tokens"], model, prompt_length=row["prompt_length"])
        resampling = stepsal.resampling_importance(hf, trace, gold[row["problem"]], n_rollouts=args.rollouts,
                                                   max_new_tokens=args.max_new_tokens, progress=False,
                                                   out=out / "resample" / path.stem, tokenizer=tokenizer)
        suppression = SuppressionMatrix.load(path.with_suffix(".suppression.json"))
        agreements.append(stepsal.step_agreement(result, suppression, resampling))
        p = resampling.p_correct.numpy()
        curves.append((group, np.linspace(0, 1, len(p)), p))
    if agreements:
        print(f"\n## Three importances on {len(agreements)} traces (resampling: {args.rollouts} rollouts a prefix)\n")
        print(markdown(stepsal.agreement_over(agreements).frame))
        grid = np.linspace(0, 1, 6)
        table = {f"{group} (n = {sum(g == group for g, _, _ in curves)})":
                 np.nanmean([np.interp(grid, x, p) for g, x, p in curves if g == group], axis=0)
                 for group in ("correct", "wrong") if any(g == group for g, _, _ in curves)}
        frame = pandas.DataFrame({"position in thinking": grid, **table})
        print("\n## P(correct | prefix) along the thinking (0 = before it, 1 = after its last step)\n")
        print(markdown(frame))
        moved = [float(np.nanmax(p) - np.nanmin(p)) for _, _, p in curves]
        print(f"\nP(correct) constant along the whole trace in {sum(m == 0 for m in moved)} of {len(moved)} traces; "
              f"it moves by 0.5 or more in {sum(m >= 0.5 for m in moved)} (rank agreement with resampling is defined "
              "only where its importance varies)")
        print("\n## Each importance against the step's position (Spearman with the thinking step's index)\n")
        print(markdown(position_table(agreements)))

    layers = traced[0][2].layers
    for proximity in (1, 2, 4):  # reasoner traces have 5-9 steps: Thought Anchors' 4 leaves few scores per step
        receivers = [r.receiver_heads(proximity) for _, _, r, _ in traced]
        kurtosis = torch.stack([heads.kurtosis for heads in receivers]).double()
        top = [torch.nan_to_num(heads.vertical, nan=-1.0).argmax(-1) for heads in receivers
               if torch.isfinite(heads.vertical[0, 0]).sum() >= 2]  # [layer, head]: the step each head points at
        question = float(torch.stack([(t == 0).double().mean() for t in top]).mean())
        mean = torch.nanmean(kurtosis, 0)
        order = torch.nan_to_num(mean, nan=-float("inf")).flatten().argsort(descending=True)[:8]
        n_heads = mean.shape[1]
        heads = pandas.DataFrame([{"layer": layers[int(i) // n_heads], "head": int(i) % n_heads,
                                   "mean kurtosis": float(mean.flatten()[i]),
                                   "traces": int(kurtosis.flatten(1)[:, i].isfinite().sum())} for i in order])
        print(f"\n## Receiver heads: highest mean kurtosis over {len(traced)} traces (proximity {proximity})\n")
        print(markdown(heads))
        print(f"\nThe question is the step a head's vertical scores rank first in {question:.1%} of (trace, head) "
              f"pairs ({len(top)} traces with 2 or more scores).")

if __name__ == "__main__":
    main()
