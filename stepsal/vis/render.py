"""One offline render path for circuitsvis widgets: notebooks and the HTML report share it.

circuitsvis's own ``_repr_html_`` probes the internet on every display and falls back to a CDN;
its HTML writes ``<div id=... />``, which browsers do not close, so a second widget nests inside
the first and vanishes. Here the installed bundle (``circuitsvis/dist/cdn/iife.js``) is inlined,
guarded so that a page runs it once, and every widget gets a closed ``<div>`` and a classic
script calling ``CircuitsVis.render``. Nothing is ever fetched.
"""

from __future__ import annotations

import html
import json
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import torch

from ..errors import OptionError

COMPONENTS = ("AttentionHeads", "ColoredTokens", "ColoredTokensMulti")


# stepsal's AttentionHeads views always show step maps: the "heads" are layers (or one layer's heads)
# and the "tokens" are steps, so the bundle's labels say so
RELABEL = {"Head Selector (hover to view, click to lock)": "Maps: a layer each, or a head each (hover to view, "
                                                         "click to lock)",
           '"Destination Token"': '"Query step (row)"', '"Source Token"': '"Key step (column)"'}


@lru_cache(maxsize=1)
def bundle_js() -> str:
    """The installed circuitsvis bundle, safe to inline (no closing script tag, no source map link),
    with the labels of :data:`RELABEL`."""
    source = resources.files("circuitsvis").joinpath("dist/cdn/iife.js").read_text(encoding="utf-8")
    source = source.replace("</script>", "<\\/script>")
    for old, new in RELABEL.items():
        source = source.replace(old, new)
    return "\n".join(line for line in source.splitlines() if not line.startswith("//# sourceMappingURL"))


def bundle_script() -> str:
    """A script tag that defines ``CircuitsVis`` unless the page already has it."""
    return f'<script>if (typeof CircuitsVis === "undefined") {{\n{bundle_js()}\n}}</script>'


def to_js(value: Any) -> Any:
    """Props as JSON-ready values (tensors and arrays to nested lists, non-finite numbers to null)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        return to_js(value.tolist())
    if isinstance(value, dict):
        return {key: to_js(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [to_js(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class Widget:
    """A circuitsvis component with its props; displays itself in Jupyter, offline.

    ``html(bundle=False)`` gives the mount point and render call only, for pages that load the
    bundle once (the report).
    """

    component: str
    props: dict[str, Any]
    title: str = ""
    element_id: str = field(default_factory=lambda: "stepsal-" + uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise OptionError(f"unknown circuitsvis component {self.component!r}: use one of {COMPONENTS}.")

    def html(self, bundle: bool = True) -> str:
        # no '<' reaches the HTML parser: trace text in props cannot open a comment or a script
        props = json.dumps(to_js(self.props), allow_nan=False).replace("<", "\\u003c")
        heading = f'<div class="stepsal-widget-title">{html.escape(self.title)}</div>' if self.title else ""
        mount = (f'{heading}<div id="{self.element_id}" class="stepsal-widget" data-component="{self.component}" '
                 f'style="margin: 8px 0;"></div>\n'
                 f'<script>CircuitsVis.render("{self.element_id}", CircuitsVis.{self.component}, {props});</script>')
        return (bundle_script() + "\n" + mount) if bundle else mount

    def _repr_html_(self) -> str:
        return self.html(bundle=True)

    def __repr__(self) -> str:
        return f"Widget({self.component}{', ' + repr(self.title) if self.title else ''})"
