"""Figures (matplotlib) of Step-Saliency results."""

from .figures import plot_step_maps, step_labels

__all__ = ["plot_step_maps", "step_labels"]
