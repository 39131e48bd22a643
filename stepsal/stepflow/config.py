"""StepFlow configuration: which layers get the Odds-Equal Bridge and Step Momentum Injection."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from ..backends import Model, adapter_for
from ..errors import StepsalError, UnsupportedModelError
from ..hookpoints import model_label
from ..model_types import TLModel
from ..options import SMI_SITES, check_layer_range, flag, layer_numbers, refuse_unknown_settings
from ..sites import attention_sites
from ..traces import Trace
from .hooks import FlowRun


@dataclass(frozen=True)
class StepFlow:
    """Test-time repair of step flow (docs/paper.md sections 6-8).

    Args:
        oeb_layers: layers for the Odds-Equal Bridge; None = the bottom quarter, [] = off.
        smi_layers: layers for Step Momentum Injection; None = the top quarter, [] = off.
        tau_max: cap of the bridge target tau_B, in (0, 1).
        alpha: SMI strength, >= 0.
        smi_window: "step" (mean over the whole previous step, paper) or an int w (its last w tokens;
            the reference used 4).
        smi_site: "resid_post" (alpha * sum_h m_h W_O after the layer) or "z" (per head, reference).
        smi_at_summary: also inject the last thinking step's momentum at the summary start.
    """

    oeb_layers: Iterable | None = None  # of ints (numpy and torch integers too)
    smi_layers: Iterable | None = None
    tau_max: float = 0.15
    alpha: float = 0.06
    smi_window: str | int = "step"
    smi_site: str = "resid_post"
    smi_at_summary: bool = False

    def __post_init__(self) -> None:
        for name in ("oeb_layers", "smi_layers"):  # any iterable of integers (numpy, torch) -> tuple
            given = getattr(self, name)
            if given is not None:
                object.__setattr__(self, name, tuple(layer_numbers(given, name)))
        flag(self.smi_at_summary, "smi_at_summary")
        for name, paper in (("tau_max", 0.15), ("alpha", 0.06)):  # nan passes every comparison; "0.1" is no number
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise StepsalError(f"{name} must be a finite number; got {value!r}. The paper uses {paper}.")
        if not 0 < self.tau_max < 1:
            raise StepsalError(f"tau_max must lie in (0, 1); got {self.tau_max}. The paper uses 0.15.")
        if self.alpha < 0:
            raise StepsalError(f"alpha must be >= 0; got {self.alpha}. The paper uses 0.06.")
        if self.smi_site not in SMI_SITES:
            raise StepsalError(f"smi_site must be one of {SMI_SITES}; got {self.smi_site!r}.")
        window = self.smi_window
        if not (window == "step" or (isinstance(window, int) and not isinstance(window, bool) and window >= 1)):
            raise StepsalError(f"smi_window must be 'step' or a positive int; got {window!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (layers as lists; None = the default band)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("oeb_layers", "smi_layers"):
            data[name] = None if data[name] is None else list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepFlow:
        """Settings from :meth:`to_dict` (unknown keys are refused, naming the known ones)."""
        if not isinstance(data, dict):
            raise StepsalError(f"StepFlow.from_dict needs a dict of settings (what to_dict wrote); got "
                               f"{type(data).__name__}.")
        refuse_unknown_settings(cls, data, "StepFlow settings")
        return cls(**data)

    def layers(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(OEB layers, SMI layers) for a model with ``n_layers`` layers, validated."""
        quarter = max(1, n_layers // 4)
        bands = {"oeb_layers": (self.oeb_layers, range(quarter)),
                 "smi_layers": (self.smi_layers, range(n_layers - quarter, n_layers))}
        chosen = []
        for name, (given, default) in bands.items():
            layers = list(default if given is None else given)
            check_layer_range(layers, n_layers, name)
            chosen.append(layers)
        return chosen[0], chosen[1]

    def layers_for(self, model: TLModel) -> tuple[list[int], list[int]]:
        """(OEB layers, SMI layers) on ``model``: default bands keep the layers that have what each
        part hooks (hybrid models mix in linear-attention layers); chosen layers must all have it."""
        sites = attention_sites(model)
        oeb, smi = self.layers(model.cfg.n_layers)
        if self.alpha == 0:  # SMI off: nothing to hook, nothing to check
            smi = []
        usable = set(sites.attention_layers)
        label = model_label(model)
        for band, given, name in ((oeb, self.oeb_layers, "OEB"), (smi, self.smi_layers, "SMI")):
            if given is not None or not band:
                continue
            band[:] = [layer for layer in band if layer in usable]
            if not band:
                raise UnsupportedModelError(
                    f"StepFlow on {label}: the default {name} band (a quarter of the layers) has no layer with "
                    f"a usable attention pattern: {sites.describe_missing(list(range(sites.n_layers)))}. "
                    + (f"Choose oeb_layers / smi_layers among {sites.attention_layers}." if sites.attention_layers
                       else "Use backend='hooked' if HookedTransformer supports the architecture."))
        sites.require_attention(oeb, f"StepFlow's Odds-Equal Bridge on {label}")
        sites.require_attention(smi, f"StepFlow's Step Momentum Injection on {label}")
        no_values = [layer for layer in smi if layer not in sites.value_layout]
        if no_values:
            raise UnsupportedModelError(
                f"Step Momentum Injection on {label}: hook_v never fires in layers {no_values}, so there are "
                "no value vectors to average. Choose other smi_layers or set alpha=0.")
        no_z = [layer for layer in smi if layer not in sites.z_layers]
        if self.smi_site == "z" and no_z:
            raise UnsupportedModelError(
                f"Step Momentum Injection on {label}: hook_z does not split heads as [batch, pos, head, "
                f"d_value] in layers {no_z} on this adapter (multi-head latent attention, for one). Use "
                "smi_site='resid_post', which adds the same vector after the layer.")
        return oeb, smi

    def describe(self, model_or_n_layers: Any) -> str:
        """The configuration in words, with the layers that run on a model (or on ``n`` layers)."""
        if isinstance(model_or_n_layers, int):
            oeb, smi = self.layers(model_or_n_layers)
        else:
            oeb, smi = self.layers_for(model_or_n_layers)
        return (f"StepFlow(OEB layers {oeb or 'off'}, tau_max={self.tau_max}; SMI layers {smi or 'off'}, "
                f"alpha={self.alpha}, window={self.smi_window}, site={self.smi_site}, "
                f"at_summary={self.smi_at_summary})")

    @contextmanager
    def attached(self, model: Model, trace: Trace) -> Iterator[FlowRun]:
        """Attach StepFlow for teacher-forced forwards over ``trace`` (full sequence, no cache).

        Yields the :class:`FlowRun` whose ``stats`` fill as forwards run. Hooks are removed on
        exit, also when an exception escapes. ``model`` may be a plain transformers model (the fast
        path of :mod:`stepsal.backends.transformers`).
        """
        adapter = adapter_for(model)
        run = FlowRun.for_trace(self, adapter, trace, adapter.flow_layers(self))
        with adapter.attach_flow(run):
            yield run
