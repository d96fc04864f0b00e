"""A committee: the mean of independently trained models of one training set, as one potential.

Models trained on the same structures from different initialisations make partly independent
errors on structures they have not seen; their mean cancels part of that generalization error
(3BPA test_300K here: models at ~20 meV/Å force RMSE each average to 16.9 by two, 15.8 by three).
The mean energy is one energy, so forces, virial and stress come from the same single autograd path
as for one model and stay conservative. Cost: the sum of the members' costs. The members' own energies and forces
come out too (their spreads are uncertainty estimates) at no extra cost: each member reads its own
copy of the edge vectors, so the one backward pass of the mean energy separates their gradients.

Members must share the training statistics (same structures, same train/validation split: the
reference energies and the energy scale are then one set for all), the cutoff, the force head and
the dtype. The committee's receptive field is its deepest member's.
"""

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .potential import Potential
from .property import PropertyCommittee, PropertyModel, build_property_committee, property_committee_members


@dataclass
class CommitteeConfig:
    """Same questions as ModelConfig answers (family, head, hyperparameters, receptive field)."""

    members: List[Any]  # ModelConfig of each member

    @property
    def family(self) -> str:  # "nequip" if any member passes messages: ghost atoms are then needed
        return "nequip" if any(m.family == "nequip" for m in self.members) else "allegro"

    @property
    def head(self) -> str:
        return self.members[0].head

    @property
    def property(self) -> Optional[Dict[str, Any]]:  # a committee of property models: their (shared) target
        return self.members[0].property

    def hyperparameters(self) -> Dict[str, Any]:
        return {"r_max": self.members[0].hyperparameters()["r_max"],
                "members": [{"family": m.family, "preset": m.preset, **m.hyperparameters()} for m in self.members]}

    def message_passing_layers(self) -> int:
        return max(m.message_passing_layers() for m in self.members)

    def to_dict(self) -> Dict[str, Any]:
        return {"members": [asdict(m) for m in self.members]}


class CommitteeEnergy(nn.Module):
    """Edge vectors (M, E, 3), one copy per member (so that each member's gradient comes out on its
    own) -> each member's raw per-atom energies (N, M) and vectors (N, 3, M) or None. The Potential
    takes their means."""

    def __init__(self, energy_models: List[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(energy_models)
        self.num_members = len(energy_models)

    def forward(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor, paired: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        energies: List[torch.Tensor] = []
        vectors: List[torch.Tensor] = []
        for k, member in enumerate(self.members):
            member_energies, member_vectors = member(edge_vectors[k], atom_types, edge_index, paired)
            energies.append(member_energies)
            if member_vectors is not None:
                vectors.append(member_vectors)
        stacked_vectors: Optional[torch.Tensor] = None
        if len(vectors) == len(energies):
            stacked_vectors = torch.stack(vectors, dim=2)
        return torch.stack(energies, dim=1), stacked_vectors


def build_committee(members: List[nn.Module]) -> nn.Module:
    """One potential whose energy is the mean of the members' energies, or of property models one
    PropertyCommittee (build_property_committee). A committee among ``members`` counts as its members:
    a committee file plus a newly trained model makes one committee of all."""
    properties = {isinstance(member, (PropertyModel, PropertyCommittee)) for member in members}
    if len(properties) > 1:
        raise ValueError("a committee averages either potentials or property models: these models mix both")
    if properties == {True}:
        return build_property_committee(members)
    members = [single for member in members for single in committee_members(member)]  # committees: their members
    if len(members) < 2:
        raise ValueError(f"a committee needs at least 2 models, got {len(members)}")
    for k, member in enumerate(members, start=1):
        if not isinstance(member, Potential):
            raise ValueError(f"committee model {k} is a {type(member).__name__}, not a potential")
    first = members[0]
    for k, member in enumerate(members[1:], start=2):
        differences = [
            what for what, same in (
                ("training statistics (reference energies, force scale, neighbors: train them on the same "
                 "structures and split)", member.statistics.to_dict() == first.statistics.to_dict()),
                ("force head", member.config.head == first.config.head),
                ("r_max", member.config.hyperparameters()["r_max"] == first.config.hyperparameters()["r_max"]),
                ("dtype", member.reference_energies.dtype == first.reference_energies.dtype
                 and next(member.parameters()).dtype == next(first.parameters()).dtype),
            ) if not same
        ]
        if differences:
            raise ValueError(f"committee model {k} differs from model 1 in {'; '.join(differences)}")
    committee = Potential(
        CommitteeEnergy([m.energy_model for m in members]),
        reference_energies=first.reference_energies,
        energy_scale=first.energy_scale,
        gradient_head=first.gradient_head,
    )
    committee.config = CommitteeConfig([m.config for m in members])
    committee.statistics = first.statistics
    return committee


def committee_members(model: nn.Module) -> List[nn.Module]:
    """The members of a committee, each a potential of its own (sharing the committee's weights and
    training statistics); a single model: itself; a PropertyCommittee: its property models. Why: a
    member that lives only in a committee file can then be fine-tuned, evaluated alone or joined with
    newly trained models."""
    if isinstance(model, (PropertyModel, PropertyCommittee)):
        return property_committee_members(model)
    if not isinstance(model.config, CommitteeConfig):
        return [model]
    singles = []
    for energy_model, config in zip(model.energy_model.members, model.config.members):
        single = Potential(energy_model, model.reference_energies, model.energy_scale, model.gradient_head)
        single.config, single.statistics = config, model.statistics
        singles.append(single.train(model.training))
    return singles


def force_uncertainty(member_forces: torch.Tensor) -> torch.Tensor:
    """Per-atom spread of a committee's forces, sqrt(mean_m |F_m - mean F|^2): (N, 3, M) -> (N,) eV/Å
    (DP-GEN's force model deviation; its maximum over atoms is the usual active-learning criterion)."""
    deviation = member_forces - member_forces.mean(dim=2, keepdim=True)
    return deviation.square().sum(dim=1).mean(dim=1).sqrt()
