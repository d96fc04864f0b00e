"""Physics of both model families and both heads: symmetry, derivatives, locality, compilation."""

import numpy as np
import pytest
import torch
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from mlip import MLIPCalculator
from mlip.deploy import deploy_model, load_model
from mlip.models import model_metadata

from physics import (
    R_MAX, TOLERANCE, TYPE_NAMES, assert_close, assert_symmetric, cluster, predict, tiny_model, triclinic_alloy,
)

FAMILIES = ["allegro", "nequip"]
HEADS = ["gradient", "direct"]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_invariance_and_equivariance(family, head, dtype, reflect):
    """E invariant; forces and stress rotate, under O(3), translation and atom permutation."""
    model = tiny_model(family, head, dtype)
    before = assert_symmetric(model, triclinic_alloy(), np.random.default_rng(1), reflect, TOLERANCE[dtype], translate=3.0)
    assert ("stress" in before) == (head == "gradient")


@pytest.mark.parametrize("family", FAMILIES)
def test_forces_and_stress_are_energy_derivatives(family):
    """Forces = -dE/dx and stress = (1/V) dE/dstrain by central differences, triclinic cell."""
    model = tiny_model(family)
    atoms = triclinic_alloy()
    atoms.calc = MLIPCalculator(model)
    forces = atoms.get_forces()
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    assert np.abs(forces).max() > 1e-2
    assert_close(forces, numerical, 1e-6, "forces vs finite differences")
    stress = atoms.get_stress()
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(stress).max() > 1e-3
    assert_close(stress, numerical, 1e-6, "stress vs finite differences")


@pytest.mark.parametrize("family", FAMILIES)
def test_supercell_invariance(family):
    model = tiny_model(family)
    atoms = triclinic_alloy(repeat=(1, 1, 1))
    supercell = atoms.repeat((2, 2, 2))
    single, eight = predict(model, [atoms]), predict(model, [supercell])
    assert_close(eight["energy"], 8 * single["energy"], 1e-10, "energy")
    assert_close(eight["forces"], np.tile(single["forces"], (8, 1)), 1e-9, "forces")
    assert_close(eight["stress"], single["stress"], 1e-9, "stress")


@pytest.mark.parametrize("family", FAMILIES)
def test_smooth_at_cutoff(family):
    """A third atom crossing r_max changes neither energy nor forces discontinuously."""
    model = tiny_model(family)
    base = cluster(n=2)
    base.positions = [[0, 0, 0], [2.2, 0, 0]]
    energies, forces = [], []
    for distance in (R_MAX - 1e-4, R_MAX + 1e-4):
        atoms = base.copy()
        atoms += atoms[:1]
        atoms.positions[2] = [-distance, 0, 0]
        out = predict(model, [atoms])
        energies.append(out["energy"][0])
        forces.append(out["forces"])
    # Beyond r_max the third atom is alone: the energy is that of the pair plus a lone atom.
    separate = predict(model, [base])["energy"][0] + predict(model, [base[:1]])["energy"][0]
    assert abs(energies[1] - separate) < 1e-10
    assert abs(energies[0] - energies[1]) < 1e-9, "energy jumps at r_max"
    # The envelope vanishes as (r_max - r)^3: 1e-4 Å inside r_max, forces differ by O(1e-7), not O(1).
    assert np.abs(forces[0] - forces[1]).max() < 1e-5, "forces jump at r_max"


def test_locality_allegro_strict_nequip_receptive_field():
    """Allegro's E_0 ignores atoms beyond r_max; NequIP's (2 layers) feels them up to 2 r_max."""
    chain = cluster(n=4)
    spacing = 0.8 * R_MAX
    chain.positions = np.array([[k * spacing, 0.3 * (k % 2), 0] for k in range(4)])  # atom 2 at 1.6 r_max, 3 at 2.4
    changed = {}
    for family in FAMILIES:
        model = tiny_model(family)
        reference = predict(model, [chain])["atomic_energies"][0]
        for atom in (2, 3):
            moved = chain.copy()
            moved.positions[atom] += [0.3, 0.4, -0.2]
            changed[family, atom] = abs(predict(model, [moved])["atomic_energies"][0] - reference)
    assert changed["allegro", 2] < 1e-12 and changed["allegro", 3] < 1e-12
    assert changed["nequip", 2] > 1e-10, "NequIP's second layer should see atoms within 2 r_max"
    assert changed["nequip", 3] < 1e-12, "NequIP sees beyond its receptive field"


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single_structures(family, head):
    """Structures batched together give what each gives alone: nothing leaks between them."""
    model = tiny_model(family, head)
    structures = [triclinic_alloy(seed=0), cluster(seed=1), triclinic_alloy(seed=2, repeat=(1, 2, 1))]
    batched = predict(model, structures)
    start = 0
    for k, atoms in enumerate(structures):
        alone = predict(model, [atoms])
        stop = start + len(atoms)
        assert_close(batched["energy"][k], alone["energy"][0], 1e-12, "energy")
        assert_close(batched["forces"][start:stop], alone["forces"], 1e-12, "forces")
        if head == "gradient":
            assert_close(batched["stress"][k], alone["stress"][0], 1e-12, "stress")
        start = stop
    if head == "gradient":
        assert np.all(batched["stress"][1] == 0), "a non-periodic structure must not get a stress"


def test_training_mode_force_gradients_reach_parameters():
    """The force loss backpropagates into the weights (double backward), per structure only."""
    model = tiny_model("allegro").train()
    import mlip.data as data

    graphs = [data.atoms_to_graph(a, R_MAX, data.TypeMapper(["Cu", "Ni"])) for a in (triclinic_alloy(), cluster())]
    out = model(data.collate(graphs, torch.float64))
    n0 = len(graphs[0]["atom_types"])
    # Loss on structure 1's forces only: its gradient must not depend on structure 0's atoms.
    loss = out["forces"][n0:].pow(2).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_scripted_equals_eager(family, head, dtype, tmp_path):
    model = tiny_model(family, head, dtype)
    path = tmp_path / "model.pt"
    deploy_model(model, path)
    atoms = triclinic_alloy()
    results = []
    for calc_model in (model, load_model(path)):
        atoms.calc = MLIPCalculator(calc_model)
        properties = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if head == "gradient":
            properties["stress"] = atoms.get_stress()
        results.append(properties)
    for key in results[0]:
        assert_close(results[1][key], results[0][key], TOLERANCE[dtype], key)
    loaded, metadata = load_model(path)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference weights should be frozen"
    assert metadata["force_head"] == head
    assert metadata["message_passing_layers"] == (2 if family == "nequip" else 1)
    assert metadata["dtype"] == str(dtype).replace("torch.", "")


@pytest.mark.parametrize("l_max", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_higher_l_max_symmetry_and_derivatives(family, l_max):
    """l_max 2 and 3 take the general Clebsch-Gordan paths (for NequIP only in a middle layer, hence 3
    layers): O(3) + permutation, and finite differences."""
    model = tiny_model(family, l_max=l_max, **({"num_layers": 3} if family == "nequip" else {}))
    atoms = triclinic_alloy()
    assert_symmetric(model, atoms, np.random.default_rng(2))
    atoms.calc = MLIPCalculator(model)
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2
    assert_close(forces, calculate_numerical_forces(atoms, eps=1e-4), 1e-6, "forces vs finite differences")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("overrides", [dict(l_max=2, num_layers=2, correlation=3),
                                       dict(l_max=2, parity=False, num_layers=3, correlation=2)],
                         ids=["l2-corr3", "l2-no-parity-corr2"])
def test_nequip_density_products(overrides, head, tmp_path):
    """NequIP with MACE-style density products (correlation > 1): O(3) + permutation, finite-difference
    forces and stress, the deployed file equals the eager model, and the products do change the energy."""
    model = tiny_model("nequip", head, **overrides)
    atoms = triclinic_alloy()
    before = assert_symmetric(model, atoms, np.random.default_rng(3))
    if head == "gradient":
        atoms.calc = MLIPCalculator(model)
        forces, stress = atoms.get_forces(), atoms.get_stress()
        assert np.abs(forces).max() > 1e-2
        assert_close(forces, calculate_numerical_forces(atoms, eps=1e-4), 1e-6, "forces vs finite differences")
        assert_close(stress, calculate_numerical_stress(atoms, eps=1e-5), 1e-6, "stress vs finite differences")

    path = tmp_path / "model.pt"
    deploy_model(model, path)
    results = []
    for calc_model in (model, load_model(path)):
        atoms.calc = MLIPCalculator(calc_model)
        results.append({"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()})
    for key in results[0]:
        assert_close(results[1][key], results[0][key], 1e-9, key)

    with torch.no_grad():  # products off: zero the weights that mix each product's left factor
        for layer in model.energy_model.layers:
            assert len(layer.products) == overrides["correlation"] - 1
            for product in layer.products:
                for weight in product.mix.weights:
                    weight.zero_()
    assert np.abs(predict(model, [atoms])["energy"] - before["energy"]).max() > 1e-7  # float64 noise: ~1e-13

    with pytest.raises(ValueError, match="correlation"):
        tiny_model("nequip", head, correlation=0)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_paired_edges_give_the_same_results(family, head):
    """Edges as [one direction; reverses] with paired=True (NequIP then computes radial weights
    once per pair) give the energies, forces, virial and training gradients of the plain list."""
    import mlip.data as data
    from mlip.models import DeployedPotential

    model = tiny_model(family, head)
    deployed = torch.jit.script(DeployedPotential(model))
    atoms = triclinic_alloy()
    positions = torch.tensor(atoms.positions)
    types = torch.tensor(data.TypeMapper(["Cu", "Ni"])(atoms.numbers))
    edge_index, shifts = data.neighbor_list(atoms.positions, atoms.cell.array, True, R_MAX)
    paired_index, paired_shifts = data.pair_edges(edge_index, shifts)
    plain = deployed(positions, types, torch.tensor(edge_index), torch.tensor(shifts @ atoms.cell.array), len(atoms))
    paired = deployed(positions, types, torch.tensor(paired_index), torch.tensor(paired_shifts @ atoms.cell.array),
                      len(atoms), True)
    assert set(paired) == set(plain)
    for key in plain:
        assert_close(paired[key], plain[key], 1e-12, key)

    # Training: a force loss and its parameter gradients (double backward through the pairs).
    model.train()
    graphs = [data.atoms_to_graph(a, R_MAX, data.TypeMapper(["Cu", "Ni"])) for a in (atoms, cluster())]
    results = []
    for pair in (False, True):
        batch = data.collate(graphs, torch.float64, paired=pair)
        assert (data.keys.EDGES_PAIRED in batch) == pair
        out = model(batch)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
        parameters = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        results.append([out["energy"].detach(), out["forces"].detach()] +
                       [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, parameters)])
    for got, want in zip(results[1], results[0]):
        assert_close(got.detach().numpy(), want.detach().numpy(), 1e-10, "training")


@pytest.mark.parametrize("head", HEADS)
def test_nequip_builds_only_what_reaches_the_energy_and_reads_older_weights(head, tmp_path):
    """Blocks from which no path leads to the energy are not built (e.g. 1e and 2o in the output of the
    layer before the last, whose Y are 0e, 1o, 2e), so every weight gets a gradient of the energy
    (or of the forces: the direct head reads 1o).
    Weights of the unpruned layout (NequIP models trained before 2026-12-02) load mapped onto it with
    the same energies, forces and stress, also once deployed; resuming such a run is refused (its
    optimizer state would not fit). Five layers: the fourth then has a residual between different
    irreps lists."""
    import copy

    from mlip.models.nequip import NequIP
    from mlip.train.checkpoint import CheckpointError
    from mlip.train.trainer import _load_weights

    model = tiny_model("nequip", head, l_max=2, num_layers=5)
    unpruned = copy.deepcopy(model)
    torch.manual_seed(1)
    unpruned.energy_model = NequIP(**model.energy_model.unpruned_arguments).double()
    with torch.no_grad():
        for name, parameter in unpruned.energy_model.named_parameters():
            if "readout" in name:
                parameter.mul_(10.0)
    atoms = triclinic_alloy()

    def unused_weights(potential):
        parameters = list(potential.energy_model.parameters())
        grads = torch.autograd.grad(energy_and_forces_sum(potential, atoms), parameters, allow_unused=True)
        return sum(1 for g in grads if g is None or g.abs().max() == 0)

    assert unused_weights(model) == 0
    assert unused_weights(unpruned) > 0  # what the pruning removes
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in unpruned.parameters())

    _load_weights(model, unpruned.state_dict())
    got, want = predict(model, [atoms]), predict(unpruned, [atoms])
    for key in want:
        assert_close(got[key], want[key], 1e-10, key)
    deploy_model(model, tmp_path / "model.pt")
    atoms.calc = MLIPCalculator(load_model(tmp_path / "model.pt"))
    assert_close(atoms.get_potential_energy(), want["energy"][0], 1e-10, "deployed energy")
    assert_close(atoms.get_forces(), want["forces"], 1e-10, "deployed forces")
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        _load_weights(model, unpruned.state_dict(), resuming=True)


def energy_and_forces_sum(model, atoms) -> torch.Tensor:
    """Energy plus a fixed projection of the forces of one structure, as a tensor that keeps its graph
    to the weights (training mode: forces are taken with create_graph)."""
    import mlip.data as data

    graph = data.atoms_to_graph(atoms, model.config.hyperparameters()["r_max"], data.TypeMapper(TYPE_NAMES))
    out = model.train()(data.collate([graph], torch.float64))
    model.eval()
    projection = torch.linspace(-1.0, 1.0, out["forces"].numel(), dtype=torch.float64).view_as(out["forces"])
    return out["energy"].sum() + (out["forces"] * projection).sum()


def test_calculator_gives_old_model_files_plain_edges():
    """A deployed model without the ``paired`` argument (files written before it existed) gets
    the plain full list, with the same results."""
    from mlip.models import DeployedPotential

    class OldContract(torch.nn.Module):
        def __init__(self, deployed):
            super().__init__()
            self.deployed = deployed

        def forward(self, positions, atom_types, edge_index, edge_shifts, num_local: int):
            return self.deployed(positions, atom_types, edge_index, edge_shifts, num_local)

    model = tiny_model("nequip")
    metadata = model_metadata(model)
    deployed = DeployedPotential(model).eval()
    atoms = triclinic_alloy()
    results = []
    for module in (deployed, torch.jit.script(OldContract(deployed))):
        calc = MLIPCalculator((module, metadata))
        assert calc.paired == (module is deployed)
        atoms.calc = calc
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, 1e-12)


@pytest.mark.parametrize("head", HEADS)
def test_committee_is_the_mean_of_its_members(head, tmp_path):
    """A committee file (NequIP with 3 layers + Allegro + NequIP with density products) gives the
    mean of its members' energies, per-atom energies, forces and stress; it is O(3)-symmetric; its
    receptive field is the deepest member's, so domains still equal the whole system; and the file
    re-deploys to the same numbers."""
    from mlip.calculators import domains
    from mlip.models import build_committee

    members = [tiny_model("nequip", head, seed=0, num_layers=3), tiny_model("allegro", head, seed=1),
               tiny_model("nequip", head, seed=2, l_max=2, correlation=3)]
    committee = build_committee(members)
    atoms = triclinic_alloy()
    got = assert_symmetric(committee, atoms, np.random.default_rng(4))
    each = [predict(member, [atoms]) for member in members]
    for key in got:
        assert_close(got[key], np.mean([e[key] for e in each], axis=0), 1e-12, key)
    spread = np.abs(each[0]["forces"] - each[1]["forces"]).max()
    assert spread > 1e-2, "members agree: the mean would prove nothing"

    path = tmp_path / "committee.pt"
    deploy_model(committee, path)
    _, metadata = load_model(path)
    assert metadata["message_passing_layers"] == 3 and metadata["model_family"] == "nequip"
    assert [m["num_layers"] for m in metadata["hyperparameters"]["members"]] == [3, 2, 2]
    redeployed = tmp_path / "again.pt"
    from mlip.cli import main

    assert main(["deploy", str(path), "-o", str(redeployed)]) == 0
    whole = MLIPCalculator(str(redeployed), domain_threshold=None)
    by_domains = MLIPCalculator(str(path), domain_threshold=4, domain_atoms=5)
    assert len(domains.split_into_domains(atoms.positions, atoms.cell.array, atoms.pbc, 5)) >= 4
    results = []
    member_energies = [e["energy"][0] for e in each]
    member_forces = np.stack([e["forces"] for e in each], axis=2)  # (N, 3, M)
    deviation = member_forces - member_forces.mean(axis=2, keepdims=True)
    force_spread = np.sqrt((deviation ** 2).sum(axis=1).mean(axis=1))  # (N,) per atom
    for calc in (whole, by_domains):
        atoms.calc = calc
        results.append([atoms.get_potential_energy(), atoms.get_potential_energies(), atoms.get_forces()]
                       + ([atoms.get_stress(voigt=False)] if head == "gradient" else []))
        # Each model's own energy and forces come out too, and their spreads are the uncertainties.
        assert_close(calc.get_property("committee_energies", atoms), member_energies, 1e-9, "member energies")
        assert_close(calc.get_property("energy_uncertainty", atoms), np.std(member_energies), 1e-9, "spread")
        assert_close(calc.get_property("force_uncertainty", atoms), force_spread, 1e-9, "force spread")
    assert np.std(member_energies) > 1e-3 and force_spread.min() > 1e-3
    single = MLIPCalculator(members[0])
    atoms.calc = single
    atoms.get_potential_energy()
    for name in ("energy_uncertainty", "force_uncertainty"):
        assert name not in single.results and name not in single.implemented_properties
    expected = [got["energy"][0], got["atomic_energies"], got["forces"]]
    expected += [got["stress"][0]] if head == "gradient" else []
    for values in results:
        for value, want, what in zip(values, expected, ["energy", "atomic energies", "forces", "stress"]):
            assert_close(value, want, 1e-9, what)


def test_committee_refuses_mismatched_members():
    from mlip.models import build_committee

    nequip = tiny_model("nequip")
    with pytest.raises(ValueError, match="at least 2"):
        build_committee([nequip])
    with pytest.raises(ValueError, match="force head"):
        build_committee([nequip, tiny_model("allegro", "direct")])
    with pytest.raises(ValueError, match="r_max"):
        build_committee([nequip, tiny_model("allegro", r_max=3.0)])
    with pytest.raises(ValueError, match="dtype"):
        build_committee([nequip, tiny_model("allegro", dtype=torch.float32)])
    other_data = tiny_model("allegro")
    other_data.statistics.force_rms = 2.0
    with pytest.raises(ValueError, match="training statistics"):
        build_committee([nequip, other_data])


def test_committee_members_come_out_and_join_again(tmp_path, capsys):
    """`mlip deploy FILE --member K` writes member K of a committee file alone (its own energies and
    forces, its own architecture), and a committee file listed among other models counts as its
    members: a committee of two plus a third model is the mean of all three."""
    from mlip.cli import main
    from mlip.models import build_committee

    members = [tiny_model("nequip", seed=0), tiny_model("allegro", seed=1),
               tiny_model("nequip", seed=2, l_max=2, correlation=3)]
    pair, third = tmp_path / "pair.pt", tmp_path / "third.pt"
    deploy_model(build_committee(members[:2]), pair)
    deploy_model(members[2], third)
    atoms = triclinic_alloy()
    each = [predict(member, [atoms]) for member in members]

    def file_prediction(path):
        atoms.calc = MLIPCalculator(str(path))
        return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}

    second = tmp_path / "second.pt"
    assert main(["deploy", str(pair), "--member", "2", "-o", str(second)]) == 0
    _, metadata = load_model(second)
    assert metadata["model_family"] == "allegro" and "members" not in metadata["hyperparameters"]
    got = file_prediction(second)
    assert_close(got["energy"], each[1]["energy"][0], 1e-12, "member 2's energy")
    assert_close(got["forces"], each[1]["forces"], 1e-12, "member 2's forces")
    assert np.abs(each[0]["forces"] - each[1]["forces"]).max() > 1e-2, "members agree: no proof of which came out"

    joined = tmp_path / "three.pt"
    assert main(["deploy", str(pair), str(third), "-o", str(joined)]) == 0
    _, metadata = load_model(joined)
    assert [m["family"] for m in metadata["hyperparameters"]["members"]] == ["nequip", "allegro", "nequip"]
    got = file_prediction(joined)
    assert_close(got["energy"], np.mean([e["energy"][0] for e in each]), 1e-12, "mean energy")
    assert_close(got["forces"], np.mean([e["forces"] for e in each], axis=0), 1e-12, "mean forces")

    for inputs, member, message in (([pair], "3", "has members 1 to 2"), ([third], "1", "not a committee"),
                                     ([pair, third], "1", "takes one committee file")):
        assert main(["deploy", *map(str, inputs), "--member", member, "-o", str(tmp_path / "x.pt")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
