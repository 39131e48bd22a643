"""stepsal: Step-Saliency and StepFlow for reasoning models, on TransformerLens.

Importing the package is cheap (the command line's ``--help`` must not wait for torch): the public
names below are imported on first use.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "ModelMismatchError": "errors", "NonFiniteGradientError": "errors", "StepsalError": "errors",
    "TraceFormatError": "errors", "UnsupportedModelError": "errors", "StepsalWarning": "errors",
    "FORMATS": "formats", "TraceFormat": "formats", "custom_format": "formats",
    "Generation": "generation", "generate": "generation",
    "LayerMetrics": "metrics", "compare_groups": "metrics", "layer_metrics": "metrics",
    "load_model": "models", "embedded_folder": "embedded",
    "StepSaliency": "saliency", "step_saliency": "saliency",
    "FlowEffect": "stepflow", "StepFlow": "stepflow", "saliency_change": "stepflow",
    "QUESTION": "traces", "SUMMARY": "traces", "THINKING": "traces", "Step": "traces", "StepLayout": "traces",
    "Trace": "traces",
    "write_report": "vis.report", "report_from_folder": "studies.report",
    "knockout": "studies.knockout", "layer_sweep": "studies.sweep",
    "evaluate": "studies.evaluate", "load_samples": "studies.evaluate", "run_study": "studies.study",
    "load_problems": "tasks.problems", "WordProblem": "tasks.problems",
    "extract_answer": "tasks.answers", "is_correct": "tasks.answers", "pass_at_k": "tasks.answers",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'stepsal' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
