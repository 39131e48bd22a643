"""Every input error stepsal raises is a StepsalError: ``except stepsal.StepsalError`` catches them all,
and each still is the built-in type it was before (ValueError, TypeError, FileNotFoundError, ...)."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS
from tiny import THINK_TRACE

import stepsal
from stepsal import errors
from stepsal.errors import StepsalError

PACKAGE = Path(stepsal.__file__).parent

# (file under stepsal/, exception raised, text in the raise) -> why it is not a StepsalError
ALLOWED = {
    ("__init__.py", "AttributeError", "has no attribute"):
        "module __getattr__: getattr/hasattr and `from stepsal import X` rely on AttributeError",
    ("embedded.py", "ModuleNotFoundError", "needs the PyPI package"):
        "a missing optional package, not bad input: the ImportError convention (the CLI reports it as expected)",
    ("embedded.py", "ModuleNotFoundError", "needs the 'gguf' package"):
        "a missing optional package, not bad input: the ImportError convention (the CLI reports it as expected)",
    ("blockwise_layers.py", "_Stop", "_Stop"):
        "private control flow: ends a forward pass early and is caught inside blockwise_layers",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.expr, namespace: object):
    """The object a raise names (``X`` or ``a.b.X``): the module's global, else a builtin, else None."""
    if isinstance(node, ast.Name):
        found = getattr(namespace, node.id, None)
        return found if found is not None else getattr(builtins, node.id, None)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, namespace)
        return None if owner is None else getattr(owner, node.attr, None)
    return None


def _raises():
    """(file, line, exception class, source of the raise) for every ``raise`` that names a class."""
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        module = importlib.import_module(_module_name(path))
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue  # a bare `raise` re-raises what was caught
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            found = _resolve(target, module)
            if not (inspect.isclass(found) and issubclass(found, BaseException)):
                continue  # a caught exception raised again (`raise error`)
            yield path.relative_to(PACKAGE).as_posix(), node.lineno, found, ast.get_source_segment(source, node)


def test_every_raise_is_a_stepsal_error_or_allowed():
    used, bad = set(), []
    for file, line, exception, text in _raises():
        if issubclass(exception, StepsalError):
            continue
        key = next((k for k in ALLOWED if k[0] == file and k[1] == exception.__name__ and k[2] in text), None)
        if key is None:
            bad.append(f"stepsal/{file}:{line}: {text.splitlines()[0].strip()}")
        used.add(key)
    assert not bad, ("raise a StepsalError subclass (stepsal/errors.py; multiple inheritance keeps the built-in "
                     "type callers catch today), or allow-list it with a reason:\n" + "\n".join(bad))
    assert not set(ALLOWED) - used, f"allow-list entries that match no raise any more: {set(ALLOWED) - used}"


def test_error_classes_are_documented_exported_and_in_the_family():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    for cls in classes:
        assert cls.__doc__ and "\n" not in cls.__doc__.strip(), f"{cls.__name__} needs a one-line docstring"
        assert cls.__name__ in stepsal.__all__ and getattr(stepsal, cls.__name__) is cls
        assert issubclass(cls, StepsalError) or cls is errors.StepsalWarning
    from stepsal.cli_common import CliError

    assert issubclass(CliError, StepsalError)


def _caught(call, builtin: type[BaseException], cls: type[StepsalError] = StepsalError, match: str = ""):
    """``call()`` raises an error that ``except cls`` and ``except builtin`` both catch; returns it."""
    with pytest.raises(builtin, match=match) as info:
        call()
    try:
        raise info.value
    except cls as error:  # the way a caller writes it
        return error


# ---------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def model(tl_models):
    return tl_models[("llama", BACKENDS[0])]


@pytest.fixture(scope="module")
def trace(model):
    return stepsal.Trace.from_text(THINK_TRACE, model)


def test_step_saliency_options(model, trace):
    _caught(lambda: stepsal.step_saliency(model, trace, rule="ig"), ValueError, errors.OptionError, "unknown rule")
    _caught(lambda: stepsal.step_saliency(model, trace, norm="softmax"), ValueError, errors.OptionError,
            "unknown normalisation")
    _caught(lambda: stepsal.step_saliency(model, trace, target="logit"), ValueError, errors.OptionError,
            "unknown target")
    _caught(lambda: stepsal.step_saliency(model, trace, layers=[5]), ValueError, match="layers must be")
    _caught(lambda: stepsal.step_saliency(model, trace, target="answer", answer="forty-two"), ValueError,
            match="does not occur")


def test_patterns_the_gradient_never_reached(model, trace, monkeypatch):
    import stepsal.saliency

    # a backward pass that reaches no hook_pattern (what a target that skips those layers leaves)
    monkeypatch.setattr(stepsal.saliency, "_choose_mode", lambda *args: lambda *run_args: None)
    _caught(lambda: stepsal.step_saliency(model, trace), RuntimeError, errors.NoGradientError,
            "never reached hook_pattern")


def test_stepflow_setting():
    _caught(lambda: stepsal.StepFlow(tau_max=1.0), ValueError, match="tau_max")
    _caught(lambda: stepsal.StepFlow(alpha=-1.0), ValueError, match="alpha")


def test_load_model(hf_models):
    _caught(lambda: stepsal.load_model(hf_models["llama"]), ValueError, match="needs its tokenizer")
    error = _caught(lambda: stepsal.load_model("someone/some-model"), FileNotFoundError, errors.ModelNotFoundError,
                    "downloads are off")
    assert isinstance(error, OSError) and "downloads are off" in str(error)
    _caught(lambda: stepsal.load_model(42), TypeError, errors.ArgumentTypeError, "cannot load a model from int")


@pytest.mark.filterwarnings("ignore:generating with HookedTransformer")
def test_generate_prompt(model):
    _caught(lambda: stepsal.generate(model, [], max_new_tokens=2), ValueError, match="prompt must be")
    _caught(lambda: stepsal.generate(model, "x", max_new_tokens=0), ValueError, match="max_new_tokens")


def test_trace_format(tokenizer):
    _caught(lambda: stepsal.Trace.from_text(THINK_TRACE, tokenizer, fmt="xml"), ValueError,
            errors.TraceFormatError, "unknown trace format")
    _caught(lambda: stepsal.Trace.from_text("Question: 2+2? Answer: 4.", tokenizer), ValueError,
            errors.TraceFormatError, "thinking marker")


def test_hook_point(model):
    from stepsal.hookpoints import hooks_attached

    def attach():
        with hooks_attached(model, [("blocks.0.hook_nothing", lambda x, hook: x)]):
            pass

    _caught(attach, KeyError, errors.HookPointError, "no hook point")


def test_folders_without_results(tmp_path):
    from stepsal.studies.evaluate import load_samples

    _caught(lambda: load_samples(tmp_path), FileNotFoundError, errors.ResultsNotFoundError, "no samples")
    _caught(lambda: stepsal.report_from_folder(tmp_path), FileNotFoundError, errors.ResultsNotFoundError,
            "no saved Step-Saliency results")


def test_a_target_that_ignores_the_logits_is_refused_by_name(tl_models, trace):
    """A callable target that returns a constant has no gradient: a NoGradientError naming the fix,
    not autograd's own RuntimeError."""
    from stepsal.errors import NoGradientError

    model = tl_models[("llama", "bridge")]
    for mode in ("patterns", "blockwise"):
        with pytest.raises(NoGradientError, match="does not depend on the model's logits"):
            stepsal.step_saliency(model, trace, target=lambda logits: torch.tensor(1.0), mode=mode)
