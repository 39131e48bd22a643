"""Errors stepsal raises. Each message names the problem and the fix."""


class StepsalError(ValueError):
    """Base class of stepsal's input errors."""


class TraceFormatError(StepsalError):
    """The trace text does not match its format (markers missing, empty thinking, too few steps)."""


class ModelMismatchError(StepsalError):
    """Trace and model do not fit together (tokenizer, context length, vocabulary)."""


class UnsupportedModelError(StepsalError):
    """A backend, architecture or adapter that stepsal cannot work with faithfully."""


class NonFiniteGradientError(StepsalError, RuntimeError):
    """The backward pass produced NaN or inf."""


class NoGradientError(StepsalError, RuntimeError):
    """The target's gradient never reached the attention patterns of some requested layers."""


class OptionError(StepsalError):
    """An option value that is not one of the names stepsal knows (a rule, norm, mode, target, view, ...)."""


class ArgumentTypeError(StepsalError, TypeError):
    """An argument of a type stepsal cannot use (a model source that is no name, folder or model)."""


class ModelNotFoundError(StepsalError, FileNotFoundError):
    """A model (or a file it is built from) that is neither embedded, a local folder, nor allowed from the hub."""


class ResultsNotFoundError(StepsalError, FileNotFoundError):
    """A folder without the saved results or samples a study reads."""


class SettingsMismatchError(StepsalError):
    """An output folder holding results made with other settings than the run resuming into it."""


class DamagedFileError(StepsalError):
    """A saved file that is not what it should hold (bad JSON, wrong shapes, missing keys), named."""


class OutputBusyError(StepsalError):
    """Another process (or another call) is writing the same output file or folder."""


class DeviceError(StepsalError):
    """A device this machine or this torch build does not have (CUDA on a CPU-only machine, ...)."""


class HookPointError(StepsalError, KeyError):
    """A hook point name that the model does not have."""


class StepsalWarning(UserWarning):
    """Something worked but may not mean what it seems (StepFlow never acted, a slow backend, ...)."""
