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
values). Frames dumped every (NVT + NVE steps) / 100 steps give the structure's fate:
- the shortest interatomic distance over the dumped frames (Å; sampled, not every step: the plugin's
  own min_distance check stops any step closer than 0.3 Å);
- crystals: the mean coordination within the shell of potential_checks.CRYSTALS (between first and
  second neighbours) of every frame within 10 % of the first frame's ("coordination kept");
- molecules: the covalent bond graph (potential_checks.covalent_bonds) of every frame == the first
  frame's; LiPS: the same for its P-S framework (its lithium ions move): "bonds kept".
Exit status 1 if a run stopped or its bonds / coordination were not kept.

Not run as part of the test suite (minutes to hours per potential on one core).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import ase.io
import numpy as np
from ase.neighborlist import neighbor_list

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from potential_checks import CRYSTALS, covalent_bonds  # noqa: E402  (same structures and criteria as the ASE checks)

MOLECULES = {"3bpa": ("3bpa-nequip", "3bpa/train_300K.xyz", 600),
             "aspirin": ("rmd17-aspirin-nequip", "rmd17/rmd17_aspirin_train_01.extxyz.gz", 500)}
CRYSTAL_KEYS = {"si": "Si", "ge": "Ge", "mo": "Mo", "li": "Li"}
TIMESTEP_FS = {"crystal": 1.0, "molecule": 0.5, "lips": 1.0}
FRAMES = 100  # frames dumped over NVT + NVE for the structure checks
COORDINATION_TOLERANCE = 0.1  # relative change of the mean coordination that counts as a changed structure


def systems(data: str):
    """key -> (potential name, ASE atoms, temperature K, timestep fs, structure check); atoms built
    lazily. The check is {"shell": Å} (coordination kept) or {"elements": None or symbols} (bonds kept)."""
    from ase.build import bulk

    for key, element in CRYSTAL_KEYS.items():
        structure, a0, size, temperature, _, shell = CRYSTALS[element][:6]
        yield key, (f"{key}-allegro", lambda s=structure, e=element, a=a0, n=size:
                    bulk(e, s, a=a, cubic=True).repeat((n, n, n)), temperature, TIMESTEP_FS["crystal"],
                    {"shell": shell})
    for key, (name, path, temperature) in MOLECULES.items():
        def molecule(path=path):
            atoms = ase.io.read(os.path.join(data, path), 0)
            atoms.center(vacuum=15.0)
            atoms.pbc = True
            return atoms
        yield key, (name, molecule, temperature, TIMESTEP_FS["molecule"], {"elements": None})
    yield "lips", ("lips-nequip", lambda: ase.io.read(os.path.join(data, "lips_nequip", "lips_val_1000.extxyz.gz"), 0),
                   600, TIMESTEP_FS["lips"], {"elements": ("P", "S")})


def lammps_input(data_file: str, model: str, elements, temperature: float, timestep_fs: float,
                 nvt_steps: int, nve_steps: int, seed: int, dump_file: str) -> str:
    every = max(nve_steps // 200, 1)
    return f"""units metal
atom_style atomic
boundary p p p
read_data {data_file}
pair_style mlip
pair_coeff * * {model} {' '.join(elements)}
timestep {timestep_fs / 1000}
velocity all create {temperature} {seed} mom yes rot yes dist gaussian loop geom
dump frames all custom {max((nvt_steps + nve_steps) // FRAMES, 1)} {dump_file} id type x y z
dump_modify frames sort id format float %.10g
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


def shortest_distance(frames, cutoff: float = 4.0) -> float:
    """The shortest interatomic distance (Å) in any of the frames, periodic images included; inf if
    no two atoms come within ``cutoff``."""
    return min((float(neighbor_list("d", atoms, cutoff).min(initial=np.inf)) for atoms in frames), default=np.inf)


def bonds_kept(frames, elements=None) -> dict:
    """Whether the covalent bond graph of every frame (among ``elements`` only, if given) is the
    first frame's; where not, the first frame that differs and up to five broken and formed bonds."""
    reference = covalent_bonds(frames[0], elements)
    for k, atoms in enumerate(frames[1:], 1):
        now = covalent_bonds(atoms, elements)
        if now != reference:
            return {"bonds": len(reference), "kept": False, "first_changed_frame": k,
                    "broken": sorted(reference - now)[:5], "formed": sorted(now - reference)[:5]}
    return {"bonds": len(reference), "kept": True}


def coordination_kept(frames, shell: float, tolerance: float = COORDINATION_TOLERANCE) -> dict:
    """Whether the mean number of neighbours within ``shell`` Å (between first and second neighbours)
    of every frame stays within ``tolerance`` (relative) of the first frame's."""
    means = np.array([np.bincount(neighbor_list("i", atoms, shell), minlength=len(atoms)).mean()
                      for atoms in frames])
    deviation = float(np.abs(means - means[0]).max() / means[0])
    return {"shell_A": shell, "first": float(means[0]), "last": float(means[-1]),
            "max_relative_deviation": deviation, "kept": deviation <= tolerance}


def structure_report(frames, check: dict) -> dict:
    """min_distance_A and bonds / coordination (see systems) of a trajectory's frames."""
    kept = coordination_kept(frames, check["shell"]) if "shell" in check else bonds_kept(frames, check["elements"])
    return {"frames": len(frames), "min_distance_A": shortest_distance(frames),
            "coordination" if "shell" in check else "bonds": kept}


def run_one(key, name, atoms, temperature, timestep_fs, check, args, workdir):
    from ase.io.lammpsdata import write_lammps_data

    model = os.path.join(ROOT, "potentials", name, "model.pt")
    if not os.path.exists(model):
        return {"error": f"no model file {model}"}
    elements = sorted(set(atoms.get_chemical_symbols()))
    data_file = os.path.join(workdir, f"{key}.data")
    write_lammps_data(data_file, atoms, specorder=elements, masses=True, units="metal", atom_style="atomic")
    nvt_steps = int(round(args.nvt_ps * 1000 / timestep_fs))
    nve_steps = int(round(args.nve_ps * 1000 / timestep_fs))
    script, dump_file = os.path.join(workdir, f"in.{key}"), os.path.join(workdir, f"{key}.dump")
    with open(script, "w") as f:
        f.write(lammps_input(data_file, model, elements, temperature, timestep_fs, nvt_steps, nve_steps, args.seed,
                             dump_file))
    command = ["lmp", "-nocite", "-log", "none", "-in", script]
    if args.ranks > 1:
        command = ["mpirun", "-np", str(args.ranks)] + command
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    output = result.stdout + result.stderr
    blocks = thermo_blocks(output)
    # The frames up to a failure still tell how the structure went.
    frames = ase.io.read(dump_file, ":", format="lammps-dump-text", specorder=elements) \
        if os.path.exists(dump_file) and os.path.getsize(dump_file) else []
    structure = structure_report(frames, check) if frames else {}
    if result.returncode != 0 or len(blocks) != 2:
        errors = [line for line in output.splitlines() if "ERROR" in line]
        return {"error": errors[-1] if errors else f"lmp exited with {result.returncode}", **structure}
    nvt, nve = blocks
    time_ps, etotal = nve[:, 1] - nve[0, 1], nve[:, 4] / len(atoms) * 1000  # ps, meV/atom
    slope = float(np.polyfit(time_ps, etotal, 1)[0]) if len(time_ps) > 1 else float("nan")
    return {"atoms": len(atoms), "temperature_K": temperature, "timestep_fs": timestep_fs,
            "nvt_mean_temperature_second_half_K": float(nvt[len(nvt) // 2:, 2].mean()),
            "nve_mean_temperature_K": float(nve[:, 2].mean()),
            "nve_drift_meV_per_atom_per_ps": slope,
            "nve_fluctuation_rms_meV_per_atom": float(np.std(etotal)), **structure}


def structure_kept(result: dict) -> bool:
    """Whether a run's bonds or coordination (whichever it measured) were kept."""
    return result.get("bonds", result.get("coordination", {})).get("kept", False)


def table_row(name: str, result: dict, args) -> str:
    """The row of potentials/README.md's stability table for one run (measured columns only)."""
    if "error" in result:
        return f"| {name} |" + " |" * 7 + f" stopped: {result['error']} |"
    structure = result.get("bonds") or result.get("coordination")
    if "bonds" in result:
        kept = f"{structure['bonds']} bonds: " + ("kept" if structure["kept"] else
                                                 f"changed at frame {structure['first_changed_frame']}")
    else:
        kept = (f"{'kept' if structure['kept'] else 'changed'}: {structure['first']:.2f} -> {structure['last']:.2f} "
                f"within {structure['shell_A']} Å (max {100 * structure['max_relative_deviation']:.1f} %)")
    return (f"| {name} | {result['temperature_K']} K, {result['atoms']} atoms, {result['timestep_fs']} fs "
            f"| {args.nvt_ps:g} ps NVT + {args.nve_ps:g} ps NVE | {result['nvt_mean_temperature_second_half_K']:.0f} K "
            f"| {1000 * result['nve_drift_meV_per_atom_per_ps']:+.2f} | {result['nve_fluctuation_rms_meV_per_atom']:.4f} "
            f"| {result['min_distance_A']:.2f} | {kept} | completed |")


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
        for key, (name, build, temperature, timestep_fs, check) in systems(args.data):
            if args.only and key != args.only:
                continue
            results[name] = run_one(key, name, build(), temperature, timestep_fs, check, args, workdir)
            print(f"{name}: {results[name]}", flush=True)
            failed |= "error" in results[name] or not structure_kept(results[name])
    for name, result in results.items():
        print(table_row(name, result, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
