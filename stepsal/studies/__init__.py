"""Studies: interventions and measurements over traces (knockouts; sweeps and evaluation to come)."""

from .knockout import group_mask, knockout

__all__ = ["group_mask", "knockout"]
