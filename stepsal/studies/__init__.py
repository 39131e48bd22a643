"""Studies: interventions and measurements over traces (knockouts, layer sweeps, attention suppression)."""

from .knockout import group_mask, knockout
from .suppression import SuppressionMatrix, suppression_matrix
from .sweep import SweepResult, layer_sweep

__all__ = ["SuppressionMatrix", "SweepResult", "group_mask", "knockout", "layer_sweep", "suppression_matrix"]
