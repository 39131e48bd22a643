"""The blockwise mode (blockwise kernel) against the pattern hooks on every architecture of docs/models.md.

For each tiny architecture (tests/archs.py) and backend that loads: the relative difference of the
step sums, per-head sums and token-level sums between ``mode="patterns"`` (pattern hooks) and
``mode="blockwise"`` (blockwise kernel), targets "all" and a token's logit; or why the kernel does
not cover the model (then the blockwise mode falls back to the model's own attention).

Usage: python benchmarks/check_blockwise_mode.py   (about a minute on 2 cores)
"""

import os
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from archs import ARCHITECTURES, make_arch_model
from tiny import THINK_TRACE, make_tokenizer

import stepsal
from stepsal.blockwise_layers import blockwise_problem
from stepsal.models import hooked_transformer_class


def relative(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def main() -> None:
    tokenizer = make_tokenizer(tempfile.mkdtemp())
    backends = ["hooked", "bridge"] if hooked_transformer_class() is not None else ["bridge"]
    text = THINK_TRACE.replace(" Let me check", " Let me check" * 12)  # longer than one block of queries
    for arch in ARCHITECTURES:
        hf = make_arch_model(arch.name, len(tokenizer))
        for backend in backends:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = stepsal.load_model(hf, tokenizer, backend=backend)
            except stepsal.UnsupportedModelError:
                print(f"{arch.name:12s} {backend:6s} does not load")
                continue
            problem = blockwise_problem(model)
            if problem:
                print(f"{arch.name:12s} {backend:6s} falls back: {problem[:150]}")
                continue
            trace = stepsal.Trace.from_text(text, model)
            worst = 0.0
            for target in ("all", 5):
                kwargs = dict(target=target, per_head=True, token_level=True)
                a = stepsal.step_saliency(model, trace, mode="patterns", **kwargs)
                b = stepsal.step_saliency(model, trace, mode="blockwise", **kwargs)
                worst = max(worst, relative(a.sums, b.sums), relative(a.head_sums, b.head_sums),
                            relative(a.token_sums, b.token_sums))
            print(f"{arch.name:12s} {backend:6s} max relative difference {worst:.1e} (T = {len(trace)}, "
                  f"layers {a.layers})")


if __name__ == "__main__":
    main()
