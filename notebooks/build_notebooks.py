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
    new_code_cell("""import stepsal  # sets HF_HUB_OFFLINE=1 and friends: nothing is downloaded
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
from stepsal.vis import plot_step_maps

plot_step_maps(result, layers=[0, 7, 15, 22, 29])"""),
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
]


def write(name: str, cells: list) -> None:
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
    nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    write("01_step_saliency.ipynb", STEP_SALIENCY)
