"""stepsal: Step-Saliency and StepFlow for reasoning models, on TransformerLens.

Importing the package is cheap (the command line's ``--help`` must not wait for torch): the public
names below are imported on first use.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "ModelMismatchError": "errors", "NonFiniteGradientError": "errors", "StepsalError": "errors",
    "TraceFormatError": "errors", "UnsupportedModelError": "errors", "StepsalWarning": "errors",
    "ArgumentTypeError": "errors", "HookPointError": "errors", "ModelNotFoundError": "errors",
    "NoGradientError": "errors", "OptionError": "errors", "ResultsNotFoundError": "errors",
    "SettingsMismatchError": "errors", "DamagedFileError": "errors", "DeviceError": "errors",
    "OutputBusyError": "errors",
    "FORMATS": "formats", "TraceFormat": "formats", "custom_format": "formats",
    "Generation": "generation", "generate": "generation",
    "LayerMetrics": "metrics", "compare_groups": "metrics", "layer_metrics": "metrics",
    "GroupComparison": "metrics",
    "load_model": "models", "embedded_folder": "embedded",
    "SaliencyOptions": "options", "adapter_for": "backends", "ModelAdapter": "backends",
    "StepSaliency": "saliency", "step_saliency": "saliency",
    "ReceiverHeads": "receivers", "receiver_heads": "receivers",
    "FlowEffect": "stepflow", "StepFlow": "stepflow", "saliency_change": "stepflow",
    "FlowStats": "stepflow",
    "QUESTION": "traces", "SUMMARY": "traces", "THINKING": "traces", "Step": "traces", "StepLayout": "traces",
    "Trace": "traces",
    "write_report": "vis.report", "report_from_folder": "studies.report",
    "knockout": "studies.knockout", "layer_sweep": "studies.sweep",
    "suppression_matrix": "studies.suppression", "SuppressionMatrix": "studies.suppression",
    "resampling_importance": "studies.resampling", "ResamplingImportance": "studies.resampling",
    "step_agreement": "studies.agreement", "agreement_over": "studies.agreement",
    "calibrate": "studies.calibration", "CalibrationResult": "studies.calibration",
    "StepAgreement": "studies.agreement", "AgreementSummary": "studies.agreement",
    "evaluate": "studies.evaluate", "load_samples": "studies.evaluate", "run_study": "studies.study",
    "SweepResult": "studies.sweep", "EvalResult": "studies.evaluate", "StudyResult": "studies.study",
    "load_problems": "tasks.problems", "WordProblem": "tasks.problems", "example_trace_text": "tasks.problems",
    "extract_answer": "tasks.answers", "is_correct": "tasks.answers", "pass_at_k": "tasks.answers",
}

if TYPE_CHECKING:  # the same names from the same modules, for type checkers and IDEs (at run time: on first use)
    # `name as name`: an explicit re-export, which type checkers honour in a typed package
    from .backends import ModelAdapter as ModelAdapter, adapter_for as adapter_for
    from .embedded import embedded_folder as embedded_folder
    from .errors import (
        ArgumentTypeError as ArgumentTypeError,
        DamagedFileError as DamagedFileError,
        DeviceError as DeviceError,
        HookPointError as HookPointError,
        ModelMismatchError as ModelMismatchError,
        ModelNotFoundError as ModelNotFoundError,
        NoGradientError as NoGradientError,
        NonFiniteGradientError as NonFiniteGradientError,
        OptionError as OptionError,
        OutputBusyError as OutputBusyError,
        ResultsNotFoundError as ResultsNotFoundError,
        SettingsMismatchError as SettingsMismatchError,
        StepsalError as StepsalError,
        StepsalWarning as StepsalWarning,
        TraceFormatError as TraceFormatError,
        UnsupportedModelError as UnsupportedModelError,
    )
    from .formats import FORMATS as FORMATS, TraceFormat as TraceFormat, custom_format as custom_format
    from .generation import Generation as Generation, generate as generate
    from .metrics import (
        GroupComparison as GroupComparison,
        LayerMetrics as LayerMetrics,
        compare_groups as compare_groups,
        layer_metrics as layer_metrics,
    )
    from .models import load_model as load_model
    from .options import SaliencyOptions as SaliencyOptions
    from .receivers import ReceiverHeads as ReceiverHeads, receiver_heads as receiver_heads
    from .saliency import StepSaliency as StepSaliency, step_saliency as step_saliency
    from .stepflow import (
        FlowEffect as FlowEffect,
        FlowStats as FlowStats,
        StepFlow as StepFlow,
        saliency_change as saliency_change,
    )
    from .studies.agreement import (
        AgreementSummary as AgreementSummary,
        StepAgreement as StepAgreement,
        agreement_over as agreement_over,
        step_agreement as step_agreement,
    )
    from .studies.calibration import CalibrationResult as CalibrationResult, calibrate as calibrate
    from .studies.evaluate import EvalResult as EvalResult, evaluate as evaluate, load_samples as load_samples
    from .studies.knockout import knockout as knockout
    from .studies.report import report_from_folder as report_from_folder
    from .studies.resampling import (
        ResamplingImportance as ResamplingImportance,
        resampling_importance as resampling_importance,
    )
    from .studies.study import StudyResult as StudyResult, run_study as run_study
    from .studies.suppression import (
        SuppressionMatrix as SuppressionMatrix,
        suppression_matrix as suppression_matrix,
    )
    from .studies.sweep import SweepResult as SweepResult, layer_sweep as layer_sweep
    from .tasks.answers import extract_answer as extract_answer, is_correct as is_correct, pass_at_k as pass_at_k
    from .tasks.problems import (
        WordProblem as WordProblem,
        example_trace_text as example_trace_text,
        load_problems as load_problems,
    )
    from .traces import (
        QUESTION as QUESTION,
        SUMMARY as SUMMARY,
        THINKING as THINKING,
        Step as Step,
        StepLayout as StepLayout,
        Trace as Trace,
    )
    from .vis.report import write_report as write_report

__all__ = sorted(_PUBLIC)  # pyright: ignore[reportUnsupportedDunderAll]  (one list of names: _PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'stepsal' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
