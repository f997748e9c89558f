"""The ``pqflow-pruned`` model format moved to :mod:`pqflow.formats.pruned`; these names stay
for the callers (the prune stage, exports, tests) that import them from here."""

from pqflow.formats.pruned import NAME as FORMAT
from pqflow.formats.pruned import load as load_pruned_folder
from pqflow.formats.pruned import shape_layers

__all__ = ["FORMAT", "load_pruned_folder", "shape_layers"]
