"""Evaluation of heads on a store (torch-free): ``cv`` (cross-validation, and ``compare`` of
heads on shared folds) and ``report`` (text, JSON and plots of the results).
"""

from .cv import run_compare, run_cv

__all__ = ["run_cv", "run_compare"]
