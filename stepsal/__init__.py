"""stepsal: Step-Saliency and StepFlow for reasoning models, on TransformerLens."""

from ._offline import apply_offline_defaults

apply_offline_defaults()  # before anything imports huggingface_hub

from .errors import (  # noqa: E402
    ModelMismatchError,
    NonFiniteGradientError,
    StepsalError,
    TraceFormatError,
    UnsupportedModelError,
)
from .formats import FORMATS, TraceFormat, custom_format  # noqa: E402
from .generate import Generation, generate  # noqa: E402
from .metrics import LayerMetrics, compare_groups, layer_metrics  # noqa: E402
from .models import load_model  # noqa: E402
from .saliency import StepSaliency, step_saliency  # noqa: E402
from .stepflow import FlowEffect, StepFlow, saliency_change  # noqa: E402
from .traces import QUESTION, SUMMARY, THINKING, Step, StepLayout, Trace  # noqa: E402

__all__ = [
    "FlowEffect", "Generation", "StepFlow", "generate", "saliency_change",
    "FORMATS", "QUESTION", "SUMMARY", "THINKING", "LayerMetrics", "ModelMismatchError",
    "NonFiniteGradientError", "Step", "StepLayout", "StepSaliency", "StepsalError", "Trace",
    "TraceFormat", "TraceFormatError", "UnsupportedModelError", "compare_groups", "custom_format",
    "layer_metrics", "load_model", "step_saliency",
]
__version__ = "0.1.0"
