"""Building blocks shared by the model families."""

from .mlp import mlp
from .radial import BesselBasis, PolynomialCutoff
from .scatter import scatter_max, scatter_sum

__all__ = ["BesselBasis", "PolynomialCutoff", "mlp", "scatter_max", "scatter_sum"]
