"""Stability campaign in LAMMPS: every shipped potential, NVT at its check temperature, then NVE.

    python benchmarks/lammps_stability.py [--nvt-ps 20] [--nve-ps 20] [--ranks 1] [--only si|ge|...]
                                          [--data ../shared/data] [--out stability.json]

The structures and temperatures are those of benchmarks/potential_checks.py (which runs ASE MD):
crystals (Si, Ge, Mo, Li supercells), the 3BPA and aspirin molecules (first training frame, in a
periodic box with 15 Å of vacuum) and the LiPS cell. Each system runs `pair_style mlip` in LAMMPS
(the plugin must be built: `mlip build-lammps-plugin`): Nose-Hoover NVT at T (tdamp 0.1 ps), then
NVE from there. Reported per potential: the mean temperature of the NVT run's second half, the
NVE total-energy drift (slope of a straight line through E_tot(t), meV/atom/ps) and its rms
fluctuation (meV/atom), and whether LAMMPS stopped (overlapping atoms, lost atoms, non-numeric
values). Exit status 1 if a run stopped.

Not run as part of the test suite (minutes to hours per potential on one core).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from potential_checks import CRYSTALS  # noqa: E402  (same structures and temperatures as the ASE checks)

MOLECULES = {"3bpa": ("3bpa-nequip", "3bpa/train_300K.xyz", 600),
             "aspirin": ("rmd17-aspirin-nequip", "rmd17/rmd17_aspirin_train_01.extxyz.gz", 500)}
CRYSTAL_KEYS = {"si": "Si", "ge": "Ge", "mo": "Mo", "li": "Li"}
TIMESTEP_FS = {"crystal": 1.0, "molecule": 0.5, "lips": 1.0}


def systems(data: str):
    """key -> (potential name, ASE atoms, temperature K, timestep fs); built lazily."""
    from ase.build import bulk
    import ase.io

    for key, element in CRYSTAL_KEYS.items():
        structure, a0, size, temperature = CRYSTALS[element][:4]
        yield key, (f"{key}-allegro", lambda s=structure, e=element, a=a0, n=size:
                    bulk(e, s, a=a, cubic=True).repeat((n, n, n)), temperature, TIMESTEP_FS["crystal"])
    for key, (name, path, temperature) in MOLECULES.items():
        def molecule(path=path):
            atoms = ase.io.read(os.path.join(data, path), 0)
            atoms.center(vacuum=15.0)
            atoms.pbc = True
            return atoms
        yield key, (name, molecule, temperature, TIMESTEP_FS["molecule"])
    yield "lips", ("lips-nequip", lambda: ase.io.read(os.path.join(data, "lips_nequip", "lips_val_1000.extxyz.gz"), 0),
                   600, TIMESTEP_FS["lips"])


def lammps_input(data_file: str, model: str, elements, temperature: float, timestep_fs: float,
                 nvt_steps: int, nve_steps: int, seed: int) -> str:
    every = max(nve_steps // 200, 1)
    return f"""units metal
atom_style atomic
boundary p p p
read_data {data_file}
pair_style mlip
pair_coeff * * {model} {' '.join(elements)}
timestep {timestep_fs / 1000}
velocity all create {temperature} {seed} mom yes rot yes dist gaussian loop geom
fix nvt all nvt temp {temperature} {temperature} 0.1
thermo_style custom step time temp pe etotal
thermo_modify format float %.15g
thermo {max(nvt_steps // 200, 1)}
run {nvt_steps}
unfix nvt
fix nve all nve
thermo {every}
run {nve_steps}
"""


def thermo_blocks(output: str):
    """The thermo tables of the runs in a LAMMPS screen output (rows of numbers)."""
    blocks, rows = [], None
    for line in output.splitlines():
        words = line.split()
        if words[:2] == ["Step", "Time"]:
            rows = []
        elif rows is not None and line.startswith("Loop time"):
            blocks.append(np.array(rows))
            rows = None
        elif rows is not None:
            try:
                rows.append([float(w) for w in words])
            except ValueError:
                pass  # warnings between thermo lines
    return blocks


def run_one(key, name, atoms, temperature, timestep_fs, args, workdir):
    from ase.io.lammpsdata import write_lammps_data

    model = os.path.join(ROOT, "potentials", name, "model.pt")
    if not os.path.exists(model):
        return {"error": f"no model file {model}"}
    elements = sorted(set(atoms.get_chemical_symbols()))
    data_file = os.path.join(workdir, f"{key}.data")
    write_lammps_data(data_file, atoms, specorder=elements, masses=True, units="metal", atom_style="atomic")
    nvt_steps = int(round(args.nvt_ps * 1000 / timestep_fs))
    nve_steps = int(round(args.nve_ps * 1000 / timestep_fs))
    script = os.path.join(workdir, f"in.{key}")
    with open(script, "w") as f:
        f.write(lammps_input(data_file, model, elements, temperature, timestep_fs, nvt_steps, nve_steps, args.seed))
    command = ["lmp", "-nocite", "-log", "none", "-in", script]
    if args.ranks > 1:
        command = ["mpirun", "-np", str(args.ranks)] + command
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    output = result.stdout + result.stderr
    blocks = thermo_blocks(output)
    if result.returncode != 0 or len(blocks) != 2:
        errors = [line for line in output.splitlines() if "ERROR" in line]
        return {"error": errors[-1] if errors else f"lmp exited with {result.returncode}"}
    nvt, nve = blocks
    time_ps, etotal = nve[:, 1] - nve[0, 1], nve[:, 4] / len(atoms) * 1000  # ps, meV/atom
    slope = float(np.polyfit(time_ps, etotal, 1)[0]) if len(time_ps) > 1 else float("nan")
    return {"atoms": len(atoms), "temperature_K": temperature, "timestep_fs": timestep_fs,
            "nvt_mean_temperature_second_half_K": float(nvt[len(nvt) // 2:, 2].mean()),
            "nve_mean_temperature_K": float(nve[:, 2].mean()),
            "nve_drift_meV_per_atom_per_ps": slope,
            "nve_fluctuation_rms_meV_per_atom": float(np.std(etotal))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--nvt-ps", type=float, default=20.0)
    parser.add_argument("--nve-ps", type=float, default=20.0)
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks per run")
    parser.add_argument("--seed", type=int, default=4928459)
    parser.add_argument("--only", choices=list(CRYSTAL_KEYS) + list(MOLECULES) + ["lips"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results, failed = {}, False
    with tempfile.TemporaryDirectory() as workdir:
        for key, (name, build, temperature, timestep_fs) in systems(args.data):
            if args.only and key != args.only:
                continue
            results[name] = run_one(key, name, build(), temperature, timestep_fs, args, workdir)
            print(f"{name}: {results[name]}", flush=True)
            failed |= "error" in results[name]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
