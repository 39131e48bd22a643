"""docs/models.md stays true: each architecture and backend is probed against plain transformers
(logits, token saliency against an eager computation, StepFlow acting, greedy and cached generation)
and must match its row for the installed TransformerLens."""

import pytest
from arch_probe import probe, stack
from archs import ARCHITECTURES
from conftest import BACKENDS
from models_table import read_rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", [arch.name for arch in ARCHITECTURES])
def test_architecture_row_of_docs_models_md_holds(arch, backend, tokenizer):
    documented = read_rows().get((arch, stack(), backend))
    assert documented is not None, (f"docs/models.md has no row for {arch} / {stack()} / {backend}: "
                                    "run python tests/models_table.py")
    assert probe(arch, backend, tokenizer) == documented
