"""Studies: interventions and measurements over traces (knockouts, layer sweeps; evaluation to come)."""

from .knockout import group_mask, knockout
from .sweep import SweepResult, layer_sweep

__all__ = ["SweepResult", "group_mask", "knockout", "layer_sweep"]
