"""Tasks for evaluation: answer extraction and checking (problem sets arrive with the studies)."""

from .answers import extract_answer, is_correct, pass_at_k

__all__ = ["extract_answer", "is_correct", "pass_at_k"]
