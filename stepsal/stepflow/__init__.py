"""StepFlow: Odds-Equal Bridge (shallow layers) and Step Momentum Injection (deep layers) as hooks."""

from .check import FlowEffect, saliency_change
from .config import StepFlow
from .hooks import FlowRun, FlowStats
from .oeb import odds_equal_bridge
from .tracker import PhaseTracker

__all__ = ["FlowEffect", "FlowRun", "FlowStats", "PhaseTracker", "StepFlow", "odds_equal_bridge", "saliency_change"]
