"""Errors stepsal raises. Each message names the problem and the fix."""


class StepsalError(ValueError):
    """Base class of stepsal's input errors."""


class TraceFormatError(StepsalError):
    """The trace text does not match its format (markers missing, empty thinking, too few steps)."""


class ModelMismatchError(StepsalError):
    """Trace and model do not fit together (tokenizer, context length, vocabulary)."""


class UnsupportedModelError(StepsalError):
    """A backend, architecture or adapter that stepsal cannot work with faithfully."""


class NonFiniteGradientError(RuntimeError):
    """The backward pass produced NaN or inf."""


class StepsalWarning(UserWarning):
    """Something worked but may not mean what it seems (StepFlow never acted, a slow backend, ...)."""
