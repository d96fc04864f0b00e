"""Statistics of a training set that fix a model's per-species shifts and scales."""

from dataclasses import asdict, dataclass, field
from typing import Dict, List


@dataclass
class DatasetStatistics:
    """What a model needs to know about its training data (all in eV, Å)."""

    type_names: List[str]
    reference_energies: List[float]  # eV per atom of each type (least squares or isolated atoms)
    force_rms: float = 1.0  # eV/Å, RMS of the force components: the model's energy scale
    avg_num_neighbors: float = 1.0  # mean edges per atom within r_max: message normalization
    extra: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStatistics":
        return cls(**d)
