"""Writes the notebooks from their cell sources (keeps the .ipynb files free of outputs and easy to review).

Run: .venv/bin/python notebooks/build_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

STEP_SALIENCY = [
    new_markdown_cell("""# Step-Saliency: where does each reasoning step look?

A reasoning model writes `question -> thinking steps -> summary`. **Step-Saliency** asks, for every
layer, how much each step's tokens depend on each earlier step. It is attention x gradient,
computed on every layer's attention pattern `A` (TransformerLens `hook_pattern`):

    I[l, t, k] = (1/H) sum_h | A[l,h,t,k] * dL/dA[l,h,t,k] |

and pooled over the tokens of each pair of steps into a step -> step map per layer. One forward and
one backward pass; nothing else. This notebook runs it on SmolLM2-135M-Instruct, a real (small)
model shipped through PyPI, entirely offline on a CPU."""),
    new_code_cell("""import stepsal  # offline: stepsal loads local and embedded models only, unless asked to download
from stepsal.cli import example_trace_text

model = stepsal.load_model("smollm2-135m")  # first call converts and caches the model (~30 s)
model.cfg.n_layers, model.cfg.n_heads"""),
    new_markdown_cell("""## 1. Segment the trace

The trace is the exact text the model would have produced, chat template included. stepsal splits it
at the `<think>` markers, then thinking into sentences and the summary into paragraphs, and maps
every token to exactly one step through the tokenizer's character offsets."""),
    new_code_cell("""text = example_trace_text()
trace = stepsal.Trace.from_text(text, model, fmt="think")
print(trace.describe())"""),
    new_code_cell("""trace.show()  # the segmentation as an interactive widget: hover a token to see its step"""),
    new_code_cell("""# every token belongs to one step; a step's tokens decode back to its text
step = trace.layout.steps[3]
print(step.kind, step.token_span, repr(model.tokenizer.decode(trace.tokens[slice(*step.token_span)])))
trace.layout.token_step[:12], trace.layout.token_segment[-5:]"""),
    new_markdown_cell("""## 2. Compute the step maps

`target="all"` differentiates the mean next-token loss over the whole trace (the paper's choice).
`norm="causal"` divides each block by its number of causally valid token pairs."""),
    new_code_cell("""result = stepsal.step_saliency(model, trace, target="all", norm="causal", per_head=True, token_level=True)
result.maps.shape, result.head_maps.shape   # [layer, step_q, step_k], [layer, head, step_q, step_k]"""),
    new_code_cell("""result  # evaluating a result shows a summary: a few layers' maps and the per-trace measures"""),
    new_markdown_cell("""### Look at it

`result.show()` puts every layer's step map in one circuitsvis view: the steps play the tokens and the
layers play the heads (click a layer to enlarge it; rows are query steps, columns the steps they
draw on, row-normalised). `show("heads", layer=...)` splits one layer by head, and `show("tokens")`
colours the trace's tokens by the saliency they receive from the summary, one colouring per layer.
Everything renders offline."""),
    new_code_cell("""result.show()"""),
    new_code_cell("""result.show("tokens")"""),
    new_code_cell("""result.to_dataframe().query("layer == 29 and kind_q == 'summary'").nlargest(5, "value")"""),
    new_code_cell("""%matplotlib inline
fig = result.plot(layers=[0, 7, 15, 22, 29])
fig"""),
    new_markdown_cell("""## 3. Shallow Lock-in and Deep Decay

On row-normalised maps (each step's row is a distribution over earlier steps):
*local share* = mass a thinking step puts on itself and the step before; *question share* = mass on
the question; in the summary rows, *summary->thinking*, *summary self* and *recency* (share of the
thinking mass on the last 3 thinking steps)."""),
    new_code_cell("""metrics = result.metrics()
print(metrics.table())
metrics.per_trace()"""),
    new_markdown_cell("""## 4. Try it

- Change the target: `target="summary"` (only the summary's loss) or `target="answer", answer="8"`.
- Compare `result.normalized("block")` with the causal maps: why is the diagonal of the block
  normalisation about half as bright?
- Write a wrong trace (say the change is 9 dollars) and compare its metrics with this one; with many
  traces, `stepsal.compare_groups(correct, wrong)` gives bootstrap confidence intervals."""),
    new_markdown_cell("""### Solutions"""),
    new_code_cell("""# 1. The target decides which tokens' loss the gradient comes from: the maps' rows that are not
# on the target's path (e.g. thinking rows with target="summary") carry only what feeds the target.
summary = stepsal.step_saliency(model, trace, target="summary")
answer = stepsal.step_saliency(model, trace, target="answer", answer="8")
for name, run in (("all", result), ("summary", summary), ("answer", answer)):
    print(f"{name:8}", {key: round(value, 3) for key, value in run.metrics().per_trace().items()})"""),
    new_code_cell("""# 2. In a diagonal block only the pairs t >= k are causally valid: n(n+1)/2 of the n*n pairs. The block
# normalisation divides by n*n, the causal one by n(n+1)/2, so their ratio is (n+1)/(2n), about 1/2.
import torch

n = torch.tensor([end - start for start, end in (step.token_span for step in trace.layout.steps)],
                 dtype=torch.float64)
ratio = result.normalized("block")[15].diagonal().double() / result.normalized("causal")[15].diagonal().double()
print("block / causal on the diagonal:", [round(value, 3) for value in ratio.tolist()])
print("(n + 1) / (2n):                ", [round(value, 3) for value in ((n + 1) / (2 * n)).tolist()])"""),
    new_code_cell("""# 3. A wrong trace: the same story with the subtraction slipped (20 minus 12 "gives 9")
wrong_text = text.replace("That gives 8 dollars", "That gives 9 dollars").replace("12 plus 8 is 20", "12 plus 9 is 20")
wrong_text = wrong_text.replace("He gets 8 dollars", "He gets 9 dollars")
wrong = stepsal.step_saliency(model, stepsal.Trace.from_text(wrong_text, model, fmt="think"), target="all")
import pandas as pd

pd.DataFrame({"correct": result.metrics().per_trace(), "wrong": wrong.metrics().per_trace()}).round(3)"""),
]


LAYER_ABLATION = [
    new_markdown_cell("""# Layer by layer: which layers carry the step flow?

Step-Saliency says where each step *looks*. Ablations say what the model *needs*: remove some
attention and measure what changes. This notebook uses the small reasoner shipped with stepsal
(SmolLM2-135M taught to write `<think> steps </think> summary`) on a CPU, offline.

A **knockout** removes the attention from the tokens of one group (queries) to those of another
(keys) and renormalises each row over its remaining keys: the same as masking those keys out of the
softmax. A **layer sweep** applies an intervention at one layer at a time and measures a metric
against the unmodified model."""),
    new_code_cell("""import torch
import stepsal
from stepsal.tasks.problems import load_problems

model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")  # built from the embedded base on first use
problems = [p for p in load_problems(limit=20) if p.n_steps == 3][:3]
out = stepsal.generate(model, [p.messages() for p in problems], max_new_tokens=120)
for problem, text in zip(problems, out.texts):
    answer = stepsal.extract_answer(text)
    print(problem.question, "\\n->", repr(text[-60:]), "| gold", problem.answer,
          "| correct" if stepsal.is_correct(answer, problem.answer) else "| wrong")
traces = [t for t in out.traces if t is not None]
trace = traces[0]
print(trace.describe())"""),
    new_markdown_cell("""## 1. One knockout: the summary without its thinking

`summary_loss` is the mean next-token loss over the summary's tokens (teacher forcing: the trace is
fixed). If the summary copies its answer from the thinking, cutting summary -> thinking at every
layer should make the summary much harder to predict."""),
    new_code_cell("""from stepsal.studies.sweep import measure

with torch.no_grad():
    plain = model(trace.tokens[None])[0]
    with stepsal.knockout(model, trace, queries="summary", keys="thinking"):
        knocked = model(trace.tokens[None])[0]
print(f"summary loss: plain {measure('summary_loss', plain, plain, trace):.3f}, "
      f"summary->thinking knocked out {measure('summary_loss', knocked, plain, trace):.3f}")"""),
    new_markdown_cell("""## 2. A layer sweep

The same knockout, one layer at a time, over all traces: per layer the change in summary loss with a
bootstrap interval over traces (three traces here: a demonstration, not a finding)."""),
    new_code_cell("""sweep = stepsal.layer_sweep(model, traces,
                            lambda layer, t: stepsal.knockout(model, t, "summary", "thinking", layers=[layer]),
                            metric="summary_loss", progress=False)
sweep.summary().nlargest(5, "mean_delta")"""),
    new_code_cell("""%matplotlib inline
fig = sweep.plot()
fig"""),
    new_markdown_cell("""Compare these per-layer deltas with the all-layer knockout above: when removing one layer's
summary -> thinking attention barely matters but removing all of them does, the copy is spread
over many layers (each can stand in for the others)."""),
    new_markdown_cell("""## 3. A StepFlow band sweep

StepFlow's Odds-Equal Bridge acts on shallow layers. Where does it change the model most? Attach it
at one layer at a time (no Step Momentum Injection) and measure the KL divergence of the summary's
next-token distributions from the plain model's."""),
    new_code_cell("""oeb_sweep = stepsal.layer_sweep(
    model, traces, lambda layer, t: stepsal.StepFlow(oeb_layers=[layer], smi_layers=[]).attached(model, t),
    metric="summary_kl", layers=range(0, model.cfg.n_layers, 3), progress=False)
oeb_sweep.summary()[["layer", "mean_delta", "ci_low", "ci_high"]]"""),
    new_markdown_cell("""## Exercises

1. Knock out the **question** from the thinking steps (`queries="thinking", keys="question"`) one
   layer at a time. In which layers do the steps read the numbers of the story?
2. Knock out only the **last thinking step** from the summary (`keys=[index]`, a step index from
   `trace.describe()`): is the answer copied from that step alone?
3. At the layer that matters most in exercise 1, knock out one head at a time (`heads=[h]`)."""),
    new_markdown_cell("""### Solutions"""),
    new_code_cell("""# 1. the question, layer by layer
question = stepsal.layer_sweep(model, traces,
                               lambda layer, t: stepsal.knockout(model, t, "thinking", "question", layers=[layer]),
                               metric="loss", layers=range(0, model.cfg.n_layers, 2), progress=False)
top = question.summary().nlargest(3, "mean_delta")
top"""),
    new_code_cell("""# 2. only the last thinking step, at every layer
last_step = max(i for i, step in enumerate(trace.layout.steps) if step.kind == "thinking")
with torch.no_grad(), stepsal.knockout(model, trace, queries="summary", keys=[last_step]):
    knocked = model(trace.tokens[None])[0]
print(f"last step {last_step} knocked out: summary loss {measure('summary_loss', knocked, plain, trace):.3f}")"""),
    new_code_cell("""# 3. one head at a time at the layer exercise 1 found
layer = int(top.iloc[0]["layer"])
print(f"plain loss {measure('loss', plain, plain, trace):.3f}")
per_head = []
for head in range(model.cfg.n_heads):
    with torch.no_grad(), stepsal.knockout(model, trace, "thinking", "question", layers=[layer], heads=[head]):
        per_head.append(measure("loss", model(trace.tokens[None])[0], plain, trace))
print(f"layer {layer}: loss per knocked-out head", [round(v, 3) for v in per_head])"""),
]

STEPFLOW = [
    new_markdown_cell("""# StepFlow: what the Odds-Equal Bridge and Step Momentum Injection do

StepFlow repairs the step flow at test time, without training, with two hooks:

- **Odds-Equal Bridge (OEB)**, shallow layers, on `hook_pattern`: while the model writes thinking,
  every attention row gives the *question* (the bridge) at least `tau_B` (about 15%) of its mass,
  by rescaling the bridge and the current segment (the KL projection onto that constraint).
- **Step Momentum Injection (SMI)**, deep layers, on `hook_resid_post`: at the first token of each
  new thinking step, add `alpha` times the previous step's mean attention output.

We look at both on a trace of the small reasoner, then generate with StepFlow."""),
    new_code_cell("""import torch
import stepsal
from stepsal.tasks.problems import load_problems
from stepsal.traces import QUESTION, THINKING, SUMMARY

model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
problem = [p for p in load_problems(limit=20) if p.n_steps == 4][0]
trace = stepsal.generate(model, problem.messages(), max_new_tokens=140).trace
flow = stepsal.StepFlow()
print(flow.describe(model))
print(trace.describe())"""),
    new_markdown_cell("""## 1. OEB on the attention pattern

Capture the pattern of the first OEB layer without and with StepFlow (our hook is registered after
StepFlow's, so it sees the edited pattern) and sum each thinking query's attention over the keys of
each segment."""),
    new_code_cell("""oeb_layer = flow.layers_for(model)[0][0]
name = f"blocks.{oeb_layer}.attn.hook_pattern"
captured = {}

def keep(tag):
    def hook(pattern, hook):
        captured[tag] = pattern[0].detach().clone()   # [head, query, key]
    return hook

with torch.no_grad():
    with model.hooks(fwd_hooks=[(name, keep("plain"))]):
        model(trace.tokens[None])
    with flow.attached(model, trace) as run, model.hooks(fwd_hooks=[(name, keep("stepflow"))]):
        model(trace.tokens[None])

segment = trace.layout.token_segment
thinking_rows = (segment == THINKING).nonzero().flatten()
for tag in ("plain", "stepflow"):
    mass = {kind: captured[tag][:, thinking_rows][..., segment == code].sum(-1)
            for kind, code in (("question", QUESTION), ("thinking", THINKING))}
    low = (mass["question"] < 0.15 - 1e-6).float().mean()
    print(f"{tag:9s} question mass of thinking rows: mean {mass['question'].mean():.3f}, "
          f"min {mass['question'].min():.3f}, rows below 0.15: {low:.0%}")
print(run.stats.table())"""),
    new_markdown_cell("""With StepFlow no thinking row of this layer gives the question less than its target (rows that
already gave more are untouched: bit-identical). In deeper OEB layers and in summary rows the
"after" mass can sit below 0.15: there the bridge is the thinking and the target is capped at what the
question leaves (`1 - p(O)`). The statistics table counts the rows OEB changed and the bridge
mass before -> after.

## 2. SMI on the residual stream

Attach SMI alone (`oeb_layers=[]`: OEB would change every thinking row upstream) and capture
`hook_resid_post` of the first SMI layer without and with it: the difference is zero except at the
first token of each thinking step after the first, where it is `alpha * sum_h m_h W_O`."""),
    new_code_cell("""smi_layer = flow.layers_for(model)[1][0]
name = f"blocks.{smi_layer}.hook_resid_post"
captured = {}
with torch.no_grad():
    with model.hooks(fwd_hooks=[(name, keep("plain"))]):
        model(trace.tokens[None])
    with stepsal.StepFlow(oeb_layers=[]).attached(model, trace), model.hooks(fwd_hooks=[(name, keep("stepflow"))]):
        model(trace.tokens[None])
changed = (captured["stepflow"] - captured["plain"]).norm(dim=-1)   # [position] (hook_resid_post has no head axis)
positions = changed.nonzero().flatten().tolist()
starts = [step.token_span[0] for step in trace.layout.steps if step.kind == "thinking"]
print("positions SMI changed:", positions)
print("thinking step starts:  ", starts)"""),
    new_markdown_cell("""Only step starts change, from the second thinking step on (the first has no previous step);
later layers differ everywhere downstream, since the residual stream carries the injection on.

## 3. Generate with and without StepFlow

Greedy answers to a few held-out problems; then the paper's mechanistic check, Step-Saliency of the
same trace with and without StepFlow (teacher forcing)."""),
    new_code_cell("""few = load_problems(limit=6)
for condition, f in (("baseline", None), ("stepflow", flow)):
    out = stepsal.generate(model, [p.messages() for p in few], f, max_new_tokens=140)
    right = [stepsal.is_correct(stepsal.extract_answer(t), p.answer) for p, t in zip(few, out.texts)]
    print(f"{condition:9s} {sum(right)}/{len(few)} correct", out.stats if f is not None else "")"""),
    new_code_cell("""%matplotlib inline
effect = stepsal.saliency_change(model, trace, flow)
fig = effect.plot()
fig"""),
    new_markdown_cell("""Six problems say nothing about accuracy: `stepsal eval` runs the paired comparison (k samples
per problem, the same seeds with and without StepFlow, bootstrap CIs and a paired test); the
figures for this model are in `docs/results.md`.

## Exercises

1. Raise `tau_max` to 0.3: how many rows does OEB change now, and how far does the question's mass
   move?
2. Check the OEB equation by hand for one changed row: rescale its bridge and thinking keys by
   `tau_B / p(B)` and `tau_S / p(S)` and compare with the captured pattern.
3. Set `alpha=0.0`: what does StepFlow still do?"""),
    new_markdown_cell("""### Solutions"""),
    new_code_cell("""# 1.
with torch.no_grad(), stepsal.StepFlow(tau_max=0.3).attached(model, trace) as run:
    model(trace.tokens[None])
print(run.stats.table())"""),
    new_code_cell("""# 2. one changed row of the OEB layer (question = bridge B, thinking = current segment S, summary = O)
plain, edited = captured_oeb = None, None
name = f"blocks.{oeb_layer}.attn.hook_pattern"
captured = {}
with torch.no_grad():
    with model.hooks(fwd_hooks=[(name, keep("plain"))]):
        model(trace.tokens[None])
    with flow.attached(model, trace), model.hooks(fwd_hooks=[(name, keep("stepflow"))]):
        model(trace.tokens[None])
diff = (captured["stepflow"] - captured["plain"]).abs().sum(-1)      # [head, query]
head, query = [int(i) for i in (diff == diff.max()).nonzero()[0]]
row = captured["plain"][head, query]
causal = torch.arange(len(row)) <= query
bridge, current = (segment == QUESTION) & causal, (segment == THINKING) & causal
other = row[~bridge & ~current].sum()
p_b, p_s = row[bridge].sum(), row[current].sum()
tau_b = min((bridge.sum() / (bridge.sum() + current.sum())).sqrt().item(), flow.tau_max)
expected = row.clone()
expected[bridge] *= tau_b / p_b
expected[current] *= (1 - other - tau_b) / p_s
print(f"head {head}, query {query}: p(B) {p_b:.3f} -> {captured['stepflow'][head, query][bridge].sum():.3f}; "
      f"largest deviation from the equation {(expected - captured['stepflow'][head, query]).abs().max():.2e}")"""),
    new_code_cell("""# 3. OEB only: SMI's band is empty with alpha = 0
print(stepsal.StepFlow(alpha=0.0).describe(model))"""),
]

CORRECT_VS_WRONG = [
    new_markdown_cell("""# Correct vs wrong: do wrong traces show Shallow Lock-in and Deep Decay?

The paper's claim is about groups of traces: in wrong ones, shallow layers lock onto the current
step (*Shallow Lock-in*) and the summary, in deep layers, draws on the last few thinking steps only
(*Deep Decay*). A study answers it for a model: generate answers, label them by the gold answer,
compute Step-Saliency for each trace, and compare the groups per measure and per layer with
bootstrap confidence intervals. `stepsal study` does it from the command line; here it is in Python,
on a handful of problems (a demonstration: a study needs many more traces per group)."""),
    new_code_cell("""import tempfile
from pathlib import Path

import stepsal
from stepsal.studies.study import run_study
from stepsal.tasks.problems import load_problems

model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
problems = load_problems(limit=10)
out = Path(tempfile.mkdtemp(prefix="stepsal-study-demo-"))  # a temporary folder: nothing is left beside the notebook
study = run_study(model, problems, out=out, k=0, greedy=True, max_new_tokens=160, progress=False)
print(f"written to {out}")
study"""),
    new_markdown_cell("""The samples sit in `samples/samples.jsonl` in that folder (one row per answer, with its exact
token ids), the saliency results in `correct/` and `wrong/`, the page in `report.html`: open it in a
browser. Run again with the same `out` and the study resumes: nothing already there is recomputed
(`out="study"` keeps a study beside the notebook)."""),
    new_code_cell("""study.samples.summary()"""),
    new_code_cell("""print(study.comparison.table())"""),
    new_code_cell("""%matplotlib inline
fig = study.comparison.plot()
fig"""),
    new_markdown_cell("""With fewer than 10 traces in a group, stepsal warns and marks the comparison *descriptive only*:
the intervals describe these traces and support no claims. `docs/results.md` has the study run on
all 200 shipped problems with samples.

## Exercises

1. Add a sampled answer per problem (`k=1`, temperature 0.6, top-p 0.95) to get more traces per
   group. How many of the samples differ from the greedy answers? Which measures move?
2. Look at one wrong trace's maps next to a correct one's: `study.groups["wrong"][0].show()`.
3. The paper's code reports the summary x summary over thinking x thinking block intensity ratio
   (`final_heat_anomaly`): compare it between the groups with `result.reference_measures()`."""),
    new_markdown_cell("""### Solutions"""),
    new_code_cell("""# 1. (resumes: the greedy answers are reused)
more = run_study(model, problems, out=out, k=1, greedy=True, max_new_tokens=160, progress=False)
texts = more.samples.frame.pivot(index="problem", columns="mode", values="text")
print(f"{(texts['sampled'] != texts['greedy']).sum()} of {len(texts)} samples differ from the greedy answer")
print(more.comparison.table() if more.comparison is not None else more)"""),
    new_code_cell("""# 2.
study.groups["wrong"][0].show()"""),
    new_code_cell("""# 3.
import numpy as np
for group, results in study.groups.items():
    anomaly = [r.reference_measures()["final_heat_anomaly"].nanmean().item() for r in results]
    print(f"{group:8s} mean final_heat_anomaly over layers: {np.mean(anomaly):.3f} ({len(results)} traces)")"""),
]

WHAT_MATTERS = [
    new_markdown_cell("""# What matters in a chain of thought? Three answers side by side

Step-Saliency is a gradient heuristic: it says which earlier steps each step's tokens are sensitive
to. Does that agree with what *causally* matters? Two standard causal answers for reasoning traces
(Thought Anchors, arXiv 2506.19143):

- **attention suppression** (white box): hide step *i* from every later query and measure how much
  less likely each later step's tokens become;
- **resampling** (black box): continue the trace from just before and just after step *i* and see
  how often the final answer is right.

This notebook computes all three for one trace of the small reasoner, ranks the steps by each, then
does it over several traces. Everything runs offline on a CPU (a few minutes)."""),
    new_code_cell("""import stepsal
from stepsal.tasks.problems import load_problems

model = stepsal.load_model("smollm2-135m-reasoner", backend="bridge")
problem = load_problems(limit=3)[2]
out = stepsal.generate(model, problem.messages(), max_new_tokens=160)
trace = out.traces[0]
print(problem.question, "| gold:", problem.answer)
print(trace.describe())"""),
    new_markdown_cell("""## 1. Step-Saliency

`per_head=True` keeps one map per head as well: we need them for receiver heads below."""),
    new_code_cell("""saliency = stepsal.step_saliency(model, trace, per_head=True)
saliency.show()"""),
    new_markdown_cell("""## 2. Attention suppression

One forward per step with that step's keys hidden from every later query (a knockout in every
layer). `maps[j, i]` is the change in log-probability of step *j*'s tokens, in nats per token:
negative means step *j* leaned on step *i*."""),
    new_code_cell("""%matplotlib inline
suppression = stepsal.suppression_matrix(model, trace)
print(suppression)
fig = suppression.plot()
fig"""),
    new_markdown_cell("""## 3. Accuracy along the trace (resampling)

Continue the trace from before the first thinking step (k = 0) and after each thinking step
(k = 1..S), and read the answer of each continuation from its summary. With `temperature=0` each
prefix gets one greedy rollout, so P(correct) is 0 or 1; sampling (exercise 1) gives proportions with
intervals."""),
    new_code_cell("""resampling = stepsal.resampling_importance(model, trace, problem.answer, temperature=0, max_new_tokens=120,
                                           progress=False)
resampling.to_dataframe()[["prefix", "label", "p_correct", "importance", "top_answer"]]"""),
    new_markdown_cell("""## 4. Do they agree?

Each measure ranks the thinking steps. `step_agreement` compares the rankings with Spearman's rho and
Kendall's tau-b (1: the same order, -1: reversed, NaN: a measure does not vary)."""),
    new_code_cell("""agreement = stepsal.step_agreement(saliency, suppression, resampling)
print(agreement.importances.round(4).to_string(index=False))
agreement.to_dataframe().round(3)"""),
    new_code_cell("""fig = agreement.plot()
fig"""),
    new_markdown_cell("""## 5. Receiver heads

Some heads send the attention (here: the saliency) of many later steps to a few steps. The kurtosis of
what each step receives from steps at least `proximity` later is high for such heads."""),
    new_code_cell("""heads = saliency.receiver_heads(proximity=2)
print(heads)
heads.to_dataframe().head(5)"""),
    new_markdown_cell("""## 6. Over several traces

One trace says little. A study computes the maps of many answers and, with `agreement=True`, each
trace's suppression matrix and the rank agreement, averaged over traces with bootstrap intervals
(resampling is left out of studies: it costs many generations per trace)."""),
    new_code_cell("""import tempfile
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", stepsal.StepsalWarning)  # a handful of traces: descriptive only
    out = tempfile.mkdtemp(prefix="stepsal-what-matters-demo-")  # nothing is left beside the notebook
    study = stepsal.run_study(model, load_problems(limit=6), out=out, k=0, max_new_tokens=160,
                              progress=False, agreement=True)
print(f"written to {out}")
print(study.agreement)
study.agreement.to_dataframe().round(3)"""),
    new_markdown_cell("""The same table is in `report.html` in that temporary folder (`study.folder`). `benchmarks/what_matters.py` runs this on many
traces, with resampling on a subset; `docs/causal.md` explains every measure and how it is checked.

## Exercises

1. Sample 4 rollouts per prefix (`temperature=0.6`, `n_rollouts=4`): where along the trace does
   P(correct) jump, and is that step ranked high by the other two measures?
2. Compare the saliency bands: which of `saliency_shallow` and `saliency_deep` agrees better with
   suppression on this trace?
3. Knock out the step that suppression ranks first (`stepsal.knockout(model, trace, "summary", [i])`)
   and recompute the summary's loss: does it rise more than for the step ranked last?"""),
    new_markdown_cell("""### Solutions"""),
    new_code_cell("""# 1.
sampled = stepsal.resampling_importance(model, trace, problem.answer, n_rollouts=4, temperature=0.6,
                                        max_new_tokens=120, progress=False)
frame = sampled.to_dataframe()
print(frame[["label", "p_correct", "ci_low", "ci_high", "importance"]].round(2).to_string(index=False))
jump = frame.iloc[1:]["importance"].abs().idxmax()
print("largest change after", frame.loc[jump, "label"])"""),
    new_code_cell("""# 2.
table = agreement.to_dataframe().set_index(["a", "b"])
for band in ("saliency_shallow", "saliency_deep"):
    print(band, "vs suppression: rho", round(float(table.loc[(band, "suppression"), "spearman"]), 3))"""),
    new_code_cell("""# 3.
import torch

summary_rows = (trace.layout.token_segment == stepsal.SUMMARY).nonzero().flatten()

def summary_loss():
    with torch.no_grad():
        logits = model(trace.tokens[None])[0]
    rows = summary_rows[summary_rows > 0]
    return torch.nn.functional.cross_entropy(logits[rows - 1], trace.tokens[rows]).item()

ranked = agreement.importances.sort_values("suppression", ascending=False)["step"].tolist()
plain = summary_loss()
for step in (ranked[0], ranked[-1]):
    with stepsal.knockout(model, trace, "summary", [step]):
        print(f"knock out step {step}: summary loss {plain:.3f} -> {summary_loss():.3f}")"""),
]


def write(name: str, cells: list) -> None:
    for index, cell in enumerate(cells):  # stable ids: a rebuild changes only what changed
        cell["id"] = f"{name[:2]}-{index:02d}"
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
    nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    write("01_step_saliency.ipynb", STEP_SALIENCY)
    write("02_layer_ablation.ipynb", LAYER_ABLATION)
    write("03_stepflow.ipynb", STEPFLOW)
    write("04_correct_vs_wrong.ipynb", CORRECT_VS_WRONG)
    write("05_what_matters.ipynb", WHAT_MATTERS)
