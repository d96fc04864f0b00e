"""Model families (Allegro, NequIP), presets and the force heads."""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import torch

from ..data.stats import DatasetStatistics
from .allegro import Allegro
from .committee import CommitteeConfig, build_committee, committee_members
from .nequip import NequIP, weights_for_pruned
from .potential import DeployedPotential, Potential
from .presets import PRESETS, hyperparameters
from .property import DeployedProperty, PropertyCommittee, PropertyModel, check_property_head, element_features

HEADS = ("gradient", "direct")


@dataclass
class ModelConfig:
    family: str = "allegro"  # "allegro" (strictly local) or "nequip" (message passing)
    preset: str = "small"  # small | medium | large
    head: str = "gradient"  # "gradient" (conservative forces + stress) or "direct" (predicted forces)
    r_max: Optional[float] = None  # Å; None takes the preset's
    overrides: Dict[str, Any] = field(default_factory=dict)  # single hyperparameters, e.g. {"l_max": 2}
    # A property model (mlip.models.property): {name, unit, pooling, hidden}; None: a potential.
    property: Optional[Dict[str, Any]] = None

    def hyperparameters(self) -> Dict[str, Any]:
        overrides = dict(self.overrides)
        if self.r_max is not None:
            overrides["r_max"] = float(self.r_max)
        return hyperparameters(self.family, self.preset, overrides)

    def message_passing_layers(self) -> int:
        """Receptive field in units of r_max: ghost depth for domains and LAMMPS."""
        return self.hyperparameters()["num_layers"] if self.family == "nequip" else 1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def build_model(
    config: ModelConfig, statistics: DatasetStatistics, dtype: torch.dtype = torch.float32
) -> Potential:
    """A fresh potential with per-species shifts from ``statistics``."""
    if config.head not in HEADS:
        raise ValueError(f"unknown force head {config.head!r}; choose one of {HEADS}")
    params = config.hyperparameters()
    num_types = len(statistics.type_names)
    families = {"allegro": Allegro, "nequip": NequIP}
    energy_model = families[config.family](
        num_types=num_types,
        avg_num_neighbors=max(statistics.avg_num_neighbors, 1.0),
        vector_output=config.head == "direct" and config.property is None,
        **params,
    )
    if config.property is not None:
        model = _property_model(energy_model, config.property, statistics).to(dtype)
        model.config, model.statistics = config, statistics
        return model
    model = Potential(
        energy_model,
        reference_energies=torch.tensor(statistics.reference_energies, dtype=torch.float64),
        energy_scale=statistics.force_rms,
        gradient_head=config.head == "gradient",
    ).to(dtype)
    model.reference_energies = model.reference_energies.to(torch.float64)
    # Plain Python attributes: what a checkpoint or a deployed file needs to rebuild or describe it.
    model.config = config
    model.statistics = statistics
    return model


def _property_model(backbone: torch.nn.Module, head: Dict[str, Any], statistics: DatasetStatistics) -> PropertyModel:
    head = check_property_head(head)
    extensive = head["pooling"] == "extensive"
    prefix = "property_per_atom_" if extensive else "property_"
    if prefix + "mean" not in statistics.extra:
        raise ValueError(f"the training data carry no property {head['name']!r}: no target statistics")
    # A constant target (std 0) still trains: the readout then learns corrections in the target's unit.
    std = statistics.extra[prefix + "std"] or 1.0
    descriptors = (element_features(statistics.type_names) if head["element_features"]
                   else torch.zeros(len(statistics.type_names), 0, dtype=torch.float64))
    return PropertyModel(backbone, statistics.extra[prefix + "mean"], std, head["pooling"], head["hidden"], descriptors)


def rebuild_model(model_config: Dict[str, Any], statistics: DatasetStatistics, dtype: torch.dtype) -> Potential:
    """The architecture a checkpoint or model file describes (``model_metadata``'s "model_config"),
    with freshly initialised weights: one model, or a committee of them."""
    if "members" in model_config:
        return build_committee([build_model(ModelConfig(**m), statistics, dtype) for m in model_config["members"]])
    return build_model(ModelConfig(**model_config), statistics, dtype)


def adapt_weights(model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``weights`` (a state dict) for ``model``: the weights of NequIP models written before
    2026-12-02, which kept irreps that cannot reach the energy, are mapped onto today's pruned layout
    (same energies; ``nequip.weights_for_pruned``). Anything else comes back as it is."""
    for prefix, module in model.named_modules():
        if isinstance(module, NequIP):
            start = prefix + "." if prefix else ""
            own = {name[len(start):]: w for name, w in weights.items() if name.startswith(start)}
            mapped = weights_for_pruned(module, own)
            if mapped is not own:
                weights = {name: w for name, w in weights.items() if not name.startswith(start)}
                weights.update({start + name: w for name, w in mapped.items()})
    return weights


def model_metadata(model: torch.nn.Module) -> Dict[str, Any]:
    """What a model file states about a Potential or a PropertyModel (the latter: ``task``
    "property", its ``property`` head and ``force_head`` "none": it predicts no forces)."""
    config = model.config  # ModelConfig or CommitteeConfig
    params = config.hyperparameters()
    committee = isinstance(config, CommitteeConfig)
    head = config.property
    task = {"task": "property", "property": check_property_head(head)} if head else {"task": "potential"}
    return {
        **task,
        "model_family": config.family,
        "type_names": list(model.statistics.type_names),
        "r_max": float(params["r_max"]),
        "message_passing_layers": config.message_passing_layers(),
        "force_head": "none" if head else config.head,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "hyperparameters": params if committee else {"preset": config.preset, **params},
        "statistics": model.statistics.to_dict(),
        "model_config": config.to_dict(),
    }


__all__ = [
    "Allegro",
    "NequIP",
    "Potential",
    "DeployedPotential",
    "PropertyModel",
    "PropertyCommittee",
    "DeployedProperty",
    "ModelConfig",
    "PRESETS",
    "build_model",
    "build_committee",
    "committee_members",
    "CommitteeConfig",
    "rebuild_model",
    "adapt_weights",
    "model_metadata",
]
