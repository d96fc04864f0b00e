"""A property model: a backbone's invariant atom features -> one number per structure.

The NequIP and Allegro backbones that make energies also describe each atom's environment by
invariant features (``invariant_features``: (N, F), unchanged by rotations, translations and
permutations, a function of the atoms within the receptive field). A property head reads them:

- intensive (a per-structure quantity that does not grow with the cell, e.g. a phonon frequency or a
  band gap): y = mean + std * MLP(mean over the structure's atoms of the features). A supercell has
  the same mean features, hence the same y;
- extensive (grows with the number of atoms): y = sum over atoms of (mean + std * MLP(features_i)),
  with mean, std those of y / N. A supercell of n cells gives n times y;
- max (intensive): y = mean + std * max over atoms of MLP(features_i), for targets that an extreme
  environment sets (the highest phonon frequency: the stiffest bond to the lightest atom);
- meanmax (intensive): y = mean + std * MLP([mean over atoms, max over atoms] of the features)
  (element-wise max). A supercell has the same mean and max, hence the same y.

mean and std are the target's, over the training split: the MLP outputs O(1) numbers. Property
models predict no energy, forces or stress: MD engines refuse them (their files say ``task``).

A PropertyCommittee is the mean of several property models of one target trained on the same
structures and split (e.g. seeds of one recipe, ``mlip cv --members``); its file also gives their
spread (``property_uncertainty``: the standard deviation over the models).
"""

from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from ase.data import atomic_masses, atomic_numbers, covalent_radii
from torch import nn

from ..data import keys
from ..nn import mlp, scatter_max, scatter_sum

POOLINGS = ("intensive", "extensive", "max", "meanmax")


def element_features(type_names: Sequence[str]) -> torch.Tensor:
    """(num_types, 5) float64 descriptors of each element that hold across elements, where a species'
    own embedding is learnt only from the structures that contain it (a few, for rare elements):
    1/sqrt(mass) (vibrational frequencies scale with it), covalent radius, Z, period and group (Å, u,
    scaled to O(1))."""
    rows = []
    for name in type_names:
        z = atomic_numbers[name]
        period, group = _period_and_group(z)
        rows.append([3.0 / np.sqrt(atomic_masses[z]), covalent_radii[z], z / 50.0, period / 4.0, group / 10.0])
    return torch.tensor(rows, dtype=torch.float64)


def _period_and_group(z: int):
    """Row and column of element ``z`` in the 18-column table (lanthanides/actinides: group 3)."""
    ends = [2, 10, 18, 36, 54, 86, 118]
    period = next(p for p, end in enumerate(ends, start=1) if z <= end)
    start = [0] + ends
    k = z - start[period - 1]  # position in the period, from 1
    if period == 1:
        return period, 1 if k == 1 else 18
    if period <= 3:
        return period, k if k <= 2 else k + 10
    if period <= 5:
        return period, k
    if k <= 2:
        return period, k
    if k <= 17:
        return period, 3  # La-Lu, Ac-Lr
    return period, k - 14


class PropertyModel(nn.Module):
    """Reads positions, atom_types, edge_index, edge_shifts, batch, num_atoms; writes property (B,)."""

    def __init__(self, backbone: nn.Module, mean: float, std: float, pooling: str, hidden: List[int],
                 descriptors: torch.Tensor):
        """descriptors: (num_types, D) per-element features joined to each atom's learnt ones before the
        readout (``element_features``), or (num_types, 0)."""
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.mean = float(mean)
        self.std = float(std)
        self.register_buffer("descriptors", descriptors.clone())
        width = backbone.num_invariant_features + descriptors.shape[1]
        self.readout = mlp([width * (2 if pooling == "meanmax" else 1)] + list(hidden) + [1])

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {keys.PROPERTY: self.predict(data[keys.POSITIONS], data[keys.ATOM_TYPES], data[keys.EDGE_INDEX],
                                            data[keys.EDGE_SHIFTS], data[keys.BATCH], data[keys.NUM_ATOMS])}

    def predict(
        self,
        positions: torch.Tensor,  # (N, 3) Å
        atom_types: torch.Tensor,  # (N,)
        edge_index: torch.Tensor,  # (2, E)
        edge_shifts: torch.Tensor,  # (E, 3) Å
        batch: torch.Tensor,  # (N,) structure of each atom
        num_atoms: torch.Tensor,  # (B,) atoms per structure
    ) -> torch.Tensor:
        """(B,) float64, in the target's unit."""
        edge_vectors = positions[edge_index[1]] - positions[edge_index[0]] + edge_shifts
        features = self.backbone.invariant_features(edge_vectors, atom_types, edge_index, False)  # (N, F)
        if self.descriptors.shape[1] > 0:
            features = torch.cat([features, self.descriptors.to(features.dtype)[atom_types]], dim=1)
        num_graphs = num_atoms.shape[0]
        if self.pooling == "extensive":
            per_atom = self.readout(features).squeeze(-1).to(torch.float64)
            return scatter_sum(self.mean + self.std * per_atom, batch, num_graphs)
        if self.pooling == "max":
            top = scatter_max(self.readout(features).squeeze(-1), batch, num_graphs)
            return self.mean + self.std * top.to(torch.float64)
        pooled = scatter_sum(features, batch, num_graphs) / num_atoms.to(features.dtype).clamp(min=1).unsqueeze(-1)
        if self.pooling == "meanmax":
            pooled = torch.cat([pooled, scatter_max(features, batch, num_graphs)], dim=1)
        return self.mean + self.std * self.readout(pooled).squeeze(-1).to(torch.float64)

    def predict_members(self, positions: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor,
                        edge_shifts: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        """(1, B): as PropertyCommittee.predict_members, for one model."""
        return self.predict(positions, atom_types, edge_index, edge_shifts, batch, num_atoms).unsqueeze(0)


class PropertyCommittee(nn.Module):
    """The mean of several PropertyModels' predictions (reads and writes what PropertyModel does).
    ``config`` (a CommitteeConfig) and ``statistics`` (the members' shared ones) are set by
    ``build_property_committee``."""

    def __init__(self, members: List[PropertyModel]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {keys.PROPERTY: self.predict(data[keys.POSITIONS], data[keys.ATOM_TYPES], data[keys.EDGE_INDEX],
                                            data[keys.EDGE_SHIFTS], data[keys.BATCH], data[keys.NUM_ATOMS])}

    def predict(self, positions: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_shifts: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        """(B,) float64: the members' mean."""
        return self.predict_members(positions, atom_types, edge_index, edge_shifts, batch, num_atoms).mean(dim=0)

    def predict_members(self, positions: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor,
                        edge_shifts: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        """(M, B) float64: each member's predictions."""
        out: List[torch.Tensor] = []
        for member in self.members:
            out.append(member.predict(positions, atom_types, edge_index, edge_shifts, batch, num_atoms))
        return torch.stack(out)


def build_property_committee(members: List[nn.Module]) -> PropertyCommittee:
    """One property model predicting the mean of ``members`` (committees among them count as their
    members), which must share target, unit, training statistics (structures and split), r_max and dtype."""
    members = [m for member in members for m in property_committee_members(member)]
    if len(members) < 2:
        raise ValueError(f"a committee needs at least 2 models, got {len(members)}")
    for k, member in enumerate(members, start=1):
        if not isinstance(member, PropertyModel):
            raise ValueError(f"committee model {k} is a {type(member).__name__}: a property committee averages "
                             "property models only")
    first = members[0]
    for k, member in enumerate(members[1:], start=2):
        differences = [what for what, same in (
            ("target", (member.config.property["name"], member.config.property.get("unit"))
             == (first.config.property["name"], first.config.property.get("unit"))),
            ("training statistics (train them on the same structures and split)",
             member.statistics.to_dict() == first.statistics.to_dict()),
            ("r_max", member.config.hyperparameters()["r_max"] == first.config.hyperparameters()["r_max"]),
            ("dtype", next(member.parameters()).dtype == next(first.parameters()).dtype),
        ) if not same]
        if differences:
            raise ValueError(f"committee model {k} differs from model 1 in {'; '.join(differences)}")
    from .committee import CommitteeConfig

    committee = PropertyCommittee(members)
    committee.config = CommitteeConfig([m.config for m in members])
    committee.statistics = first.statistics
    return committee


def property_committee_members(model: nn.Module) -> List[nn.Module]:
    """The members of a PropertyCommittee (each a PropertyModel with its config and statistics); any
    other model: itself."""
    if not isinstance(model, PropertyCommittee):
        return [model]
    members = list(model.members)
    for member, config in zip(members, model.config.members):
        member.config, member.statistics = config, model.statistics
    return members


def is_property_model(model: nn.Module) -> bool:
    """A PropertyModel or a committee of them (a file with ``task: property``)."""
    return isinstance(model, (PropertyModel, PropertyCommittee))


class DeployedProperty(nn.Module):
    """The file-level form of a property model: flat tensors of a batch of structures in, (B,) out
    (a committee: their mean, and their spread under ``property_uncertainty``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.committee = isinstance(model, PropertyCommittee)

    def forward(
        self,
        positions: torch.Tensor,
        atom_types: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shifts: torch.Tensor,
        batch: torch.Tensor,
        num_atoms: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        each = self.model.predict_members(positions, atom_types, edge_index, edge_shifts, batch, num_atoms).detach()
        out = {keys.PROPERTY: each.mean(dim=0)}
        if self.committee:
            out[keys.PROPERTY_UNCERTAINTY] = each.std(dim=0, unbiased=False)
        return out


def check_property_head(head: Dict[str, Any]) -> Dict[str, Any]:
    """A model config's ``property`` mapping, completed and checked: name (the target's info key),
    unit, pooling (intensive | extensive | max | meanmax: the module docstring), hidden (widths of
    the readout MLP's hidden layers), element_features (join ``element_features`` of each atom's
    element to its learnt features)."""
    allowed = {"name", "unit", "pooling", "hidden", "element_features"}
    unknown = sorted(set(head) - allowed)
    if unknown:
        raise ValueError(f"property: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    head = {"unit": "", "pooling": "intensive", "hidden": [64, 64], "element_features": False, **head}
    if not isinstance(head["element_features"], bool):
        raise ValueError(f"property.element_features: expected true or false, got {head['element_features']!r}")
    if head["pooling"] not in POOLINGS:
        raise ValueError(f"property.pooling: {head['pooling']!r} is not one of {list(POOLINGS)}")
    hidden = head["hidden"]
    if not (isinstance(hidden, list) and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)):
        raise ValueError(f"property.hidden: expected a list of integers >= 1, got {hidden!r}")
    if not isinstance(head.get("name"), str) or not head["name"]:
        raise ValueError("property.name: the info key of the target is missing")
    return head
