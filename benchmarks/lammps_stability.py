"""Stability campaign in LAMMPS: every shipped potential, NVT at its check temperature, then NVE.

    python benchmarks/lammps_stability.py [--nvt-ps 20] [--nve-ps 20] [--ranks 1] [--only si|ge|...]
                                          [--data ../shared/data] [--out stability.json] [--keep DIR]
                                          [--model CANDIDATE.pt] [--segment-ps 10]

Long runs (a nanosecond is hours to days on a CPU) survive interruption: with ``--segment-ps P
--keep DIR`` each phase runs as LAMMPS invocations of about P ps that each end in a restart file
(the thermostat's state included), and the same command again continues from the last finished
one (a folder holding a run with other settings is refused). Cut and uncut runs are the same
trajectory (float64: to the last digits; float32 models: to float32 rounding at the cuts).

The structures and temperatures are those of benchmarks/potential_checks.py (which runs ASE MD):
crystals (Si, Ge, Mo, Li supercells), the 3BPA and aspirin molecules (first training frame, in a
periodic box with 15 Å of vacuum) and the LiPS cell. Each system runs `pair_style mlip` in LAMMPS
(the plugin must be built: `mlip build-lammps-plugin`): Nose-Hoover NVT at T (tdamp 0.1 ps), then
NVE from there. Reported per potential: the mean temperature of the NVT run's second half, the
NVE total-energy drift (slope of a straight line through E_tot(t), meV/atom/ps) and its rms
fluctuation (meV/atom), and whether LAMMPS stopped (overlapping atoms, lost atoms, non-numeric
values). Frames dumped every (NVT + NVE steps) / 100 steps give the structure's fate:
- the shortest interatomic distance over the dumped frames (Å; sampled, not every step: the plugin's
  own min_distance check stops any step closer than 0.3 Å), the pair that reached it (elements, LAMMPS
  atom ids, frame, time in ps) and the shortest distance per element pair; the same per-pair minima of
  the potential's training data (every structure its train.yaml's data.train names) and the pairs
  whose MD minimum falls more than 0.1 Å below them ("outside the training data", flagged (!));
- crystals: the mean coordination within the shell of potential_checks.CRYSTALS (between first and
  second neighbours) of every frame within 10 % of the first frame's ("coordination kept");
- molecules: the covalent bond graph (potential_checks.covalent_bonds) stays the first frame's, a
  change counting when it lasts 3 dumped frames (a bond stretched past its cutoff for one frame at
  the top of a vibration is reported as a transient stretch); LiPS: the same for its P-S framework
  (its lithium ions move): "bonds kept".
Exit status 1 if a run stopped or its bonds / coordination were not kept.

Not run as part of the test suite (minutes to hours per potential on one core).
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Optional

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
PERSISTENT_FRAMES = 3  # a bond change must last this many dumped frames (0.3 ps at 10 ps / 100 frames) to count
TRAINING_MARGIN = 0.1  # Å: an MD pair this much closer than any training pair of its elements is outside the data
DEFAULT_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))  # what the training configs' paths name


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


def lammps_input(start: str, model: str, elements, temperature: float, timestep_fs: float, seed: int,
                 runs, dump_file: str, dump_every: int, restart_file: str) -> str:
    """One LAMMPS invocation: from a data file (``start`` ending in .data: velocities drawn at
    ``temperature`` with ``seed``) or a restart file, the ``runs`` [(phase "nvt"|"nve", steps, thermo
    interval)] in order, frames dumped every ``dump_every`` steps (of the whole trajectory: the step
    counter goes on across restarts), then the state written to ``restart_file`` (the thermostat's
    chain variables included: fix nvt keeps them in restart files under its ID)."""
    if start.endswith(".data"):
        head = f"""units metal
atom_style atomic
boundary p p p
read_data {start}
"""
        velocities = f"velocity all create {temperature} {seed} mom yes rot yes dist gaussian loop geom\n"
    else:
        head, velocities = f"read_restart {start}\n", ""  # mlip writes no pair info into restart files: given again
    text = head + f"""pair_style mlip
pair_coeff * * {model} {' '.join(elements)}
timestep {timestep_fs / 1000}
{velocities}dump frames all custom {dump_every} {dump_file} id type x y z
dump_modify frames sort id format float %.10g
thermo_style custom step time temp pe etotal
thermo_modify format float %.15g
"""
    previous = None
    for phase, steps, thermo_every in runs:
        if previous is not None and previous != phase:
            text += f"unfix {previous}\n"
        if previous != phase:
            text += (f"fix nvt all nvt temp {temperature} {temperature} 0.1\n" if phase == "nvt" else "fix nve all nve\n")
        text += f"thermo {thermo_every}\nrun {steps}\n"
        previous = phase
    # the last fix stays defined: its state (the thermostat's) goes into the restart file
    return text + f"write_restart {restart_file}\n"


def segment_plan(nvt_steps: int, nve_steps: int, segment_ps: Optional[float], timestep_fs: float) -> dict:
    """How a run is cut into LAMMPS invocations: "segments", a list of invocations each a list of
    (phase, steps, thermo interval). Without ``segment_ps`` one invocation runs NVT then NVE; with
    it, each phase is cut into pieces of about ``segment_ps`` (a multiple of the thermo and dump
    intervals, so the rows and frames of the pieces are those of the uncut run). The intervals come
    from the whole phases' lengths: 200 thermo rows per phase, FRAMES frames over both."""
    thermo = {"nvt": max(nvt_steps // 200, 1), "nve": max(nve_steps // 200, 1)}
    dump_every = max((nvt_steps + nve_steps) // FRAMES, 1)
    phases = [("nvt", nvt_steps), ("nve", nve_steps)]
    if not segment_ps:
        segments = [[(phase, steps, thermo[phase]) for phase, steps in phases]]
    else:
        segments = []
        for phase, total in phases:
            unit = math.lcm(thermo[phase], dump_every)
            piece = max(math.ceil(segment_ps * 1000 / timestep_fs / unit), 1) * unit
            # a phase of 0 steps is still one `run 0` (its thermo row is the phase's)
            segments += [[(phase, min(piece, total - first), thermo[phase])] for first in range(0, total, piece) or [0]]
    return {"nvt_steps": nvt_steps, "nve_steps": nve_steps, "dump_every": dump_every, "segments": segments}


def merged_phase(blocks, phases, phase: str) -> np.ndarray:
    """The thermo rows of one phase over all its runs (``blocks`` and their ``phases`` in run order),
    a row repeated at the start of the next run (same step) kept once."""
    rows = [block for block, p in zip(blocks, phases) if p == phase]
    merged = rows[0]
    for block in rows[1:]:
        merged = np.concatenate([merged, block[block[:, 0] > merged[-1, 0]]])
    return merged


def unique_frames(frames):
    """Dumped frames in step order, a step written at the end of one invocation and the start of the
    next kept once (LAMMPS dumps the first step of every run that falls on the interval)."""
    seen, kept = set(), []
    for atoms in frames:
        step = atoms.info.get("timestep")
        if step in seen:
            continue
        seen.add(step)
        kept.append(atoms)
    return kept


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


def closest_pairs(frames, cutoff: float = 4.0) -> dict:
    """Per element pair ("Li-S": symbols in alphabetical order), its shortest distance over the frames
    (periodic images included) and where: {"distance_A", "frame": index in ``frames``, "ids": the two
    atoms' ids (ASE index + 1: LAMMPS's ids of a data file written from the same atoms)}. Pairs never
    closer than ``cutoff`` Å are absent."""
    best = {}
    for k, atoms in enumerate(frames):
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        symbols = np.array(atoms.get_chemical_symbols())
        a, b = symbols[i], symbols[j]
        first, second = np.where(a <= b, a, b), np.where(a <= b, b, a)
        labels = np.char.add(np.char.add(first, "-"), second)
        for label in np.unique(labels):
            n = np.flatnonzero(labels == label)[d[labels == label].argmin()]
            if label not in best or d[n] < best[label]["distance_A"]:
                best[str(label)] = {"distance_A": float(d[n]), "frame": k, "ids": sorted([int(i[n]) + 1, int(j[n]) + 1])}
    return best


def shortest_distance(frames, cutoff: float = 4.0) -> float:
    """The shortest interatomic distance (Å) in any of the frames, periodic images included; inf if
    no two atoms come within ``cutoff``."""
    return min((pair["distance_A"] for pair in closest_pairs(frames, cutoff).values()), default=np.inf)


def below_training(md: dict, training: dict, cutoff: float = 4.0, margin: float = TRAINING_MARGIN) -> dict:
    """The element pairs whose shortest MD distance ``md`` (Å, per pair) falls more than ``margin`` Å
    below the training data's ``training`` (a pair absent from the training minima was never closer
    than the ``cutoff`` they were computed with): {"Li-Li": {"md_A": .., "training_A": ..}}."""
    return {label: {"md_A": distance, "training_A": training.get(label, np.inf)} for label, distance in md.items()
            if distance < min(training.get(label, np.inf), cutoff) - margin}


def training_config(name: str) -> str:
    """The training config of the shipped potential ``name``: its train.yaml, or a committee's first
    config (3bpa-nequip/member1.yaml: all its members train on the same file)."""
    config = os.path.join(ROOT, "potentials", name, "train.yaml")
    configs = sorted(glob.glob(os.path.join(ROOT, "potentials", name, "*.yaml")))
    if not os.path.exists(config) and not configs:
        raise FileNotFoundError(f"no training config (*.yaml) in {os.path.join(ROOT, 'potentials', name)}")
    return config if os.path.exists(config) else configs[0]


def training_minima(config: str, data: str, named_data: str = DEFAULT_DATA) -> dict:
    """The shortest distance per element pair (Å, :func:`closest_pairs`) in the training data: every
    structure of the ``data.train`` entries of ``config`` (selections such as ``@0:900`` included), whose
    paths name files under ``named_data`` (the ../shared/data beside the repository), read from ``data``."""
    from mlip.data.dataset import iter_structures
    from mlip.train.config import load_config

    files = [os.path.join(data, os.path.relpath(path, named_data)) for path in load_config(config).data.train]
    frames = list(iter_structures(files))
    return {"files": [os.path.relpath(f, data) for f in files], "frames": len(frames),
            "min_distance_by_pair_A": {label: pair["distance_A"] for label, pair in closest_pairs(frames).items()}}


def bonds_kept(frames, elements=None, persist: int = PERSISTENT_FRAMES) -> dict:
    """Whether the covalent bond graph (among ``elements`` only, if given) stays the first frame's.

    A bond counts as broken (or a new one as formed) when the change lasts ``persist`` consecutive
    frames or to the end of the trajectory; a shorter excursion (a bond stretched past its cutoff at
    the top of a vibration, back in the next frame) is counted as transient, with the frame and the
    pair of the first one. Where the graph changed: the first frame of a lasting change and up to
    five bonds broken and formed there."""
    reference = covalent_bonds(frames[0], elements)
    changed = [covalent_bonds(atoms, elements) ^ reference for atoms in frames]
    transient = []
    for k in range(1, len(frames)):
        lasting = set(changed[k])
        for later in changed[k + 1:k + persist]:
            lasting &= later
        if lasting:
            return {"bonds": len(reference), "kept": False, "first_changed_frame": k,
                    "broken": sorted(lasting & reference)[:5], "formed": sorted(lasting - reference)[:5],
                    "transient": len(transient)}
        transient.extend((k, pair) for pair in sorted(changed[k] - changed[k - 1]))
    report = {"bonds": len(reference), "kept": True, "transient": len(transient)}
    if transient:
        report["first_transient"] = {"frame": transient[0][0], "pair": transient[0][1]}
    return report


def coordination_kept(frames, shell: float, tolerance: float = COORDINATION_TOLERANCE) -> dict:
    """Whether the mean number of neighbours within ``shell`` Å (between first and second neighbours)
    of every frame stays within ``tolerance`` (relative) of the first frame's."""
    means = np.array([np.bincount(neighbor_list("i", atoms, shell), minlength=len(atoms)).mean()
                      for atoms in frames])
    deviation = float(np.abs(means - means[0]).max() / means[0])
    return {"shell_A": shell, "first": float(means[0]), "last": float(means[-1]),
            "max_relative_deviation": deviation, "kept": deviation <= tolerance}


def structure_report(frames, check: dict, timestep_fs: float = None, training: dict = None) -> dict:
    """min_distance_A, the pair that reached it (closest_pair: elements, LAMMPS ids, frame, and its time in ps
    where the frames carry LAMMPS's step, atoms.info["timestep"], and ``timestep_fs`` is given), the shortest
    distance per element pair, bonds / coordination (see systems) of a trajectory's frames; with
    ``training`` (per-pair minima, :func:`training_minima`), the pairs that came closer than the training
    data allows (:func:`below_training`)."""
    kept = coordination_kept(frames, check["shell"]) if "shell" in check else bonds_kept(frames, check["elements"])
    pairs = closest_pairs(frames)
    report = {"frames": len(frames), "min_distance_A": shortest_distance(frames),
              "min_distance_by_pair_A": {label: pair["distance_A"] for label, pair in sorted(pairs.items())},
              "coordination" if "shell" in check else "bonds": kept}
    if pairs:
        label = min(pairs, key=lambda p: pairs[p]["distance_A"])
        closest = {"elements": label, **pairs[label]}
        step = frames[closest["frame"]].info.get("timestep")
        if step is not None and timestep_fs is not None:
            closest["time_ps"] = step * timestep_fs / 1000
        report["closest_pair"] = closest
    if training is not None:
        report["below_training_data"] = below_training(report["min_distance_by_pair_A"], training)
    return report


def run_one(key, name, atoms, temperature, timestep_fs, check, args, workdir):
    """Run (or, in a --keep folder that holds finished invocations of the same run, continue) one
    potential's NVT + NVE and report it. Each invocation ends by writing a restart file; one that
    did not finish is run again from the restart before it."""
    from ase.io.lammpsdata import write_lammps_data

    model = os.path.abspath(args.model) if args.model else os.path.join(ROOT, "potentials", name, "model.pt")
    if not os.path.exists(model):
        return {"error": f"no model file {model}"}
    training = training_minima(training_config(name), args.data)  # before the run: a missing training file stops it at once
    elements = sorted(set(atoms.get_chemical_symbols()))
    nvt_steps = int(round(args.nvt_ps * 1000 / timestep_fs))
    nve_steps = int(round(args.nve_ps * 1000 / timestep_fs))
    plan = segment_plan(nvt_steps, nve_steps, args.segment_ps, timestep_fs)
    with open(model, "rb") as f:
        model_sha256 = hashlib.sha256(f.read()).hexdigest()
    plan.update(model=model, model_sha256=model_sha256, temperature=temperature, timestep_fs=timestep_fs,
                seed=args.seed, atoms=len(atoms))
    plan = json.loads(json.dumps(plan))  # tuples as lists: comparable with the saved plan
    plan_file = os.path.join(workdir, f"{key}.plan.json")
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            saved = json.load(f)
        changed = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
        if changed:
            raise SystemExit(f"{plan_file} is a run of {key} with other settings ({', '.join(changed)} differ): "
                             "continue it with the same command, or use another --keep folder")
    else:
        with open(plan_file, "w") as f:
            json.dump(plan, f, indent=1)
    data_file = os.path.join(workdir, f"{key}.data")
    write_lammps_data(data_file, atoms, specorder=elements, masses=True, units="metal", atom_style="atomic")

    outputs, phases, dumps = [], [], []
    start, failure, finished = data_file, None, 0
    for k, runs in enumerate(plan["segments"]):
        stem = os.path.join(workdir, f"{key}.{k:03d}")
        restart, out_file = stem + ".restart", stem + ".out"
        if not (os.path.exists(restart) and os.path.exists(out_file)):  # not finished before: run it
            if args.so_far:  # report the finished invocations only (one may be running)
                break
            script = stem + ".in"
            with open(script, "w") as f:
                f.write(lammps_input(start, model, elements, temperature, timestep_fs, args.seed, runs,
                                     stem + ".dump", plan["dump_every"], restart + ".part"))
            command = ["lmp", "-nocite", "-log", "none", "-in", script]
            if args.ranks > 1:
                command = ["mpirun", "-np", str(args.ranks)] + command
            with open(out_file + ".part", "w") as f:  # written as it runs: `tail -f` shows the progress
                result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=workdir)
            with open(out_file + ".part") as f:
                output = f.read()
            if result.returncode != 0 or len(thermo_blocks(output)) != len(runs) or not os.path.exists(restart + ".part"):
                errors = [line for line in output.splitlines() if "ERROR" in line]
                failure = errors[-1] if errors else f"lmp exited with {result.returncode}"
                outputs.append(output)
                dumps.append(stem + ".dump")
                phases.extend(phase for phase, _, _ in runs)
                break
            os.replace(out_file + ".part", out_file)
            os.replace(restart + ".part", restart)  # only now is the invocation finished
        with open(out_file) as f:
            outputs.append(f.read())
        dumps.append(stem + ".dump")
        phases.extend(phase for phase, _, _ in runs)
        start, finished = restart, finished + 1
    blocks = [block for output in outputs for block in thermo_blocks(output)]
    # The frames up to a failure still tell how the structure went.
    frames = unique_frames([atoms for dump in dumps if os.path.exists(dump) and os.path.getsize(dump)
                            for atoms in ase.io.read(dump, ":", format="lammps-dump-text", specorder=elements)])
    structure = {"training_data": training,
                 **structure_report(frames, check, timestep_fs, training["min_distance_by_pair_A"])} if frames else {}
    if failure is not None:
        return {"error": failure, **structure}
    report = {"atoms": len(atoms), "temperature_K": temperature, "timestep_fs": timestep_fs,
              "invocations": len(plan["segments"])}
    if finished < len(plan["segments"]):  # --so-far: what the finished invocations show
        report.update(finished_invocations=finished, so_far=True)
        if not finished:
            return report
    simulated = {phase: sum(steps for k in range(finished) for p, steps, _ in plan["segments"][k] if p == phase)
                 * timestep_fs / 1000.0 for phase in ("nvt", "nve")}
    report.update(nvt_ps=simulated["nvt"], nve_ps=simulated["nve"])
    nvt = merged_phase(blocks, phases, "nvt")
    report["nvt_mean_temperature_second_half_K"] = float(nvt[len(nvt) // 2:, 2].mean())
    if "nve" in phases:
        nve = merged_phase(blocks, phases, "nve")
        time_ps, etotal = nve[:, 1] - nve[0, 1], nve[:, 4] / len(atoms) * 1000  # ps, meV/atom
        report.update(nve_mean_temperature_K=float(nve[:, 2].mean()),
                      nve_drift_meV_per_atom_per_ps=float(np.polyfit(time_ps, etotal, 1)[0]) if len(time_ps) > 1
                      else float("nan"), nve_fluctuation_rms_meV_per_atom=float(np.std(etotal)))
    return {**report, **structure}


def structure_kept(result: dict) -> bool:
    """Whether a run's bonds or coordination (whichever it measured) were kept."""
    return result.get("bonds", result.get("coordination", {})).get("kept", False)


def table_row(name: str, result: dict, args) -> str:
    """The row of potentials/README.md's stability table for one run (measured columns only)."""
    if "error" in result:
        return f"| {name} |" + " |" * 7 + f" stopped: {result['error']} |"
    if result.get("so_far") and not result["finished_invocations"]:
        return f"| {name} |" + " |" * 7 + f" no invocation finished yet (of {result['invocations']}) |"
    structure = result.get("bonds") or result.get("coordination")
    if "bonds" in result:
        kept = f"{structure['bonds']} bonds: " + ("kept" if structure["kept"] else
                                                 f"changed at frame {structure['first_changed_frame']}")
        if structure.get("transient"):
            kept += f" ({structure['transient']} transient stretches)"
    else:
        kept = (f"{'kept' if structure['kept'] else 'changed'}: {structure['first']:.2f} -> {structure['last']:.2f} "
                f"within {structure['shell_A']} Å (max {100 * structure['max_relative_deviation']:.1f} %)")
    return (f"| {name} | {result['temperature_K']} K, {result['atoms']} atoms, {result['timestep_fs']} fs "
            f"| {result['nvt_ps']:g} ps NVT + {result['nve_ps']:g} ps NVE "
            f"| {result['nvt_mean_temperature_second_half_K']:.0f} K "
            + (f"| {1000 * result['nve_drift_meV_per_atom_per_ps']:+.2f} "
               f"| {result['nve_fluctuation_rms_meV_per_atom']:.4f} " if "nve_drift_meV_per_atom_per_ps" in result
               else "| - | - ")
            + f"| {min_distance_cell(result)} | {kept} | "
            + (f"so far ({result['finished_invocations']} of {result['invocations']} invocations) |"
               if result.get("so_far") else "completed |"))


def min_distance_cell(result: dict) -> str:
    """The shortest distance, its pair and time, and the pairs that came closer than the training data
    allows (flagged "(!)"), e.g. "1.43 (Li-Li, 7.3 ps) (!) outside the training data: Li-Li 1.43 < 2.31"."""
    closest = result["closest_pair"]
    cell = f"{result['min_distance_A']:.2f} ({closest['elements']}, {closest['time_ps']:.1f} ps)"
    outside = result.get("below_training_data")
    if outside:
        cell += " (!) outside the training data: " + ", ".join(
            f"{label} {pair['md_A']:.2f} < {pair['training_A']:.2f}" for label, pair in outside.items())
    return cell


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--nvt-ps", type=float, default=20.0)
    parser.add_argument("--nve-ps", type=float, default=20.0)
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks per run")
    parser.add_argument("--seed", type=int, default=4928459)
    parser.add_argument("--only", choices=list(CRYSTAL_KEYS) + list(MOLECULES) + ["lips"])
    parser.add_argument("--model", help="model file to run instead of the shipped one (needs --only): a candidate "
                        "before it replaces potentials/NAME/model.pt")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--keep", metavar="DIR", help="keep each run's LAMMPS inputs, outputs, dumps and restart files "
                        "(KEY.NNN.*, one set per invocation) in DIR (created if missing) instead of a temporary "
                        "folder; the same command again continues an interrupted run from its last restart")
    parser.add_argument("--segment-ps", type=float, help="cut each phase into LAMMPS invocations of about this many "
                        "ps, each ending in a restart file: with --keep, a long run killed midway loses at most one")
    parser.add_argument("--so-far", action="store_true", help="with --keep: report what the run's finished "
                        "invocations show, running none (the progress of a long run, also while it runs)")
    args = parser.parse_args(argv)
    if args.model and not args.only:
        parser.error("--model needs --only (which potential's system to run it on)")
    if args.segment_ps is not None and args.segment_ps <= 0:
        parser.error("--segment-ps must be > 0")
    if args.so_far and not args.keep:
        parser.error("--so-far reads a --keep folder")
    results, failed = {}, False
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with tempfile.TemporaryDirectory() if not args.keep else contextlib.nullcontext(args.keep) as workdir:
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
