"""mlip: E(3)-equivariant machine-learning interatomic potentials (Allegro, NequIP)."""

__version__ = "0.1.0"


def __getattr__(name):
    # The calculator pulls in ASE and the deploy loader; import it only when asked for.
    if name == "MLIPCalculator":
        from .calculators.ase import MLIPCalculator

        return MLIPCalculator
    raise AttributeError(f"module 'mlip' has no attribute {name!r}")
