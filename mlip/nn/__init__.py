"""Building blocks shared by the model families."""

from .gate import Gate
from .mlp import mlp
from .radial import BesselBasis, PolynomialCutoff
from .scatter import scatter_sum

__all__ = ["BesselBasis", "Gate", "PolynomialCutoff", "mlp", "scatter_sum"]
