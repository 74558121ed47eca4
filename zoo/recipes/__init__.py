"""Training recipes that belong to one model family (mmengine model wrappers with the family's losses).

- ``sparsifiner``: the two-phase Sparsifiner recipe (connectivity predictor, then sparse backbone).
"""
from .sparsifiner import SparsifinerClassifier

__all__ = ["SparsifinerClassifier"]
