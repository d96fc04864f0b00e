"""Errors of a deployed model on labelled structure files: per file and per config type.

The model file is evaluated through its contract (see mlip.deploy.model_file), several structures
per call: a batch is one disconnected graph, so per-atom energies and forces come out per
structure. The virial of a call is one total, so structures whose stress is compared are
evaluated one at a time. For a committee file, the report also says how well the members' energy
spread (the uncertainty the ASE calculator gives) ranks the structures by their energy error, and
how well their force spread on each atom ranks the atoms by their force error; and each member's own
errors and how much they correlate, which says what a further member could gain (``_member_errors``).
A property model's file (metadata "task": "property") is scored on its target instead: MAE, RMSE and
R² per file and per config type, in the target's unit (``evaluate_property``).
"""

import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import GraphDataset, LabelKeys, collate, keys
from ..deploy.model_file import DTYPES, accepts_paired_edges, load_model
from ..models.committee import force_uncertainty
from .metrics import ALL, ErrorMetrics, scores

# Structures per model call are added until this many atoms: large enough to amortize the call,
# small enough that activations of a 16 GB machine are not at risk.
BATCH_ATOMS = 2000


def evaluate(
    model_path: str,
    files: Sequence[str],
    label_keys: LabelKeys = LabelKeys(),
    device: str = "cpu",
    plots_dir: Optional[str] = None,
    batch_atoms: int = BATCH_ATOMS,
) -> Dict:
    """MAE/RMSE of energy, energy per atom, forces and stress for each file (and its config types).

    Returns {"model", "files": {path: {"all": metrics, "config_types": {name: metrics},
    "num_structures", "num_atoms", "seconds"[, "committee"]}}, "all": metrics over every file}.
    "committee" (committee files): mean energy uncertainty (eV) and the rank correlation
    (Spearman) between each structure's uncertainty and its absolute energy error; the same for
    each atom's force uncertainty (eV/Å) and the length of its force error vector; each member's
    energy and force RMSE ("energy_member_rmse", "force_member_rmse") and the mean correlation of
    the members' errors ("energy_error_correlation", "force_error_correlation", see ``_member_errors``).
    Units: eV, eV/atom, eV/Å (per component), eV/Å^3 (per component).
    A property model's file: see ``evaluate_property``.
    """
    device = torch.device(device)
    model, metadata = load_model(model_path, device=device)
    if metadata.get("task") == "property":
        return evaluate_property(model, metadata, model_path, files, label_keys, device, plots_dir, batch_atoms)
    dtype = DTYPES[metadata["dtype"]]
    gradient_head = metadata["force_head"] == "gradient"
    paired = accepts_paired_edges(model)
    overall = ErrorMetrics()
    report = {"model": os.fspath(model_path), "force_head": metadata["force_head"], "files": {}}
    for path in files:
        start = time.perf_counter()
        dataset = GraphDataset.from_atoms(path, metadata["r_max"], metadata["type_names"], label_keys,
                                          require=(keys.ENERGY,))
        metrics = ErrorMetrics()
        parity: Dict[str, List[List[np.ndarray]]] = {"energy (eV/atom)": [[], []], "forces (eV/Å)": [[], []],
                                                     "stress (eV/Å³)": [[], []]}
        # Committees only, per batch: the spreads (B,) eV and (N,) eV/Å, and the members' own errors
        # (B, M) eV and (N, 3, M) eV/Å (their mean is the committee's error).
        uncertainties: Dict[str, List[np.ndarray]] = {"energy": [], "force": [], "member_energy_error": [],
                                                      "member_force_error": []}
        for indices in _batches(dataset, gradient_head, batch_atoms):
            graphs = dataset.get_batch(indices)
            batch = collate(graphs, dtype=dtype, device=device, paired=paired)
            prediction = predict(model, batch, gradient_head)
            groups = [str(c) for c in dataset.config_types[indices]]
            metrics.update(prediction, batch, groups)
            overall.update(prediction, batch)
            _collect(parity, prediction, batch)
            if keys.ENERGY_UNCERTAINTY in prediction:
                uncertainties["energy"].append(prediction[keys.ENERGY_UNCERTAINTY].cpu().numpy())
                member_error = prediction[keys.MEMBER_ENERGIES] - batch[keys.ENERGY].to(torch.float64).unsqueeze(1)
                uncertainties["member_energy_error"].append(member_error.cpu().numpy())
            if keys.FORCE_UNCERTAINTY in prediction and keys.FORCES in batch:
                has = batch[keys.HAS_FORCES]  # atoms of structures with force labels only
                uncertainties["force"].append(prediction[keys.FORCE_UNCERTAINTY][has].cpu().numpy())
                member_error = prediction[keys.MEMBER_FORCES] - batch[keys.FORCES].to(torch.float64).unsqueeze(2)
                uncertainties["member_force_error"].append(member_error[has].cpu().numpy())
        seconds = time.perf_counter() - start
        report["files"][os.fspath(path)] = {
            "num_structures": len(dataset),
            "num_atoms": int(dataset.num_atoms.sum()),
            "seconds": round(seconds, 3),
            ALL: metrics.summary(),
            # Files without config types would get one "(none)" group: a copy of "all".
            "config_types": {g: metrics.summary(g) for g in metrics.groups()} if metrics.groups() != ["(none)"] else {},
        }
        if uncertainties["energy"]:
            report["files"][os.fspath(path)]["committee"] = _uncertainty_report(
                {what: np.concatenate(values) for what, values in uncertainties.items() if values})
        if plots_dir:
            name = _file_stem(path)
            from .plots import plot_parity

            pairs = {label: (np.concatenate(r) if r else np.zeros(0), np.concatenate(p) if p else np.zeros(0))
                     for label, (r, p) in parity.items()}
            plot_parity(pairs, os.path.join(plots_dir, f"parity_{name}.png"), title=os.path.basename(path))
    report[ALL] = overall.summary()
    return report


def evaluate_property(model, metadata: Dict, model_path: str, files: Sequence[str], label_keys: LabelKeys,
                      device, plots_dir: Optional[str], batch_atoms: int) -> Dict:
    """A property model file (``load_model``'s result) scored on labelled structure files: every
    structure must carry the target, under the info key the model was trained on (``label_keys.property``
    to read another). Returns {"model", "task": "property", "property" (the info key), "unit",
    "files": {path: {"all": scores, "config_types": {name: scores}, "num_structures", "num_atoms",
    "seconds"}}, "all": scores over every file}; scores are MAE, RMSE, R² and count (metrics.scores), in the unit."""

    name, unit = label_keys.property or metadata["property"]["name"], metadata["property"].get("unit", "")
    report = {"model": os.fspath(model_path), "task": "property", "property": name, "unit": unit, "files": {}}
    everything: List[List[np.ndarray]] = [[], []]
    for path in files:
        start = time.perf_counter()
        dataset = GraphDataset.from_atoms(path, metadata["r_max"], metadata["type_names"], LabelKeys(property=name),
                                          require=(keys.PROPERTY,))
        predicted = predict_properties(model, dataset, DTYPES[metadata["dtype"]], device, batch_atoms)
        reference = np.array([float(dataset[k][keys.PROPERTY]) for k in range(len(dataset))])
        groups = np.array([str(c) for c in dataset.config_types])
        report["files"][os.fspath(path)] = {
            "num_structures": len(dataset),
            "num_atoms": int(dataset.num_atoms.sum()),
            "seconds": round(time.perf_counter() - start, 3),
            ALL: scores(reference, predicted),
            "config_types": {g: scores(reference[groups == g], predicted[groups == g])
                             for g in sorted(set(groups))} if set(groups) != {""} else {},
        }
        everything[0].append(reference)
        everything[1].append(predicted)
        if plots_dir:
            from .plots import plot_parity

            label = f"{name} ({unit})" if unit else name
            plot_parity({label: (reference, predicted)}, os.path.join(plots_dir, f"parity_{_file_stem(path)}.png"),
                        title=os.path.basename(path))
    report[ALL] = scores(np.concatenate(everything[0]), np.concatenate(everything[1]))
    return report


def _file_stem(path) -> str:
    """'data/test.extxyz' -> 'test' (names of the parity plots)."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0].replace(".extxyz", "").replace(".xyz", "")


def predict(model, batch: Dict[str, torch.Tensor], gradient_head: bool) -> Dict[str, torch.Tensor]:
    """Energies (B,), forces (N, 3) and, for a single periodic structure, stress (1, 3, 3); for a
    committee also each member's energies (B, M) and forces (N, 3, M) and their spreads."""
    num_graphs = batch[keys.NUM_ATOMS].shape[0]
    structure = batch[keys.BATCH]
    positions = batch[keys.POSITIONS]
    inputs = (positions, batch[keys.ATOM_TYPES], batch[keys.EDGE_INDEX], batch[keys.EDGE_SHIFTS], positions.shape[0])
    paired = keys.EDGES_PAIRED in batch and bool(batch[keys.EDGES_PAIRED])
    out = model(*inputs, True) if paired else model(*inputs)
    energy = torch.zeros(num_graphs, dtype=torch.float64, device=positions.device)
    energy = energy.index_add(0, structure, out[keys.ATOMIC_ENERGIES].to(torch.float64))
    forces = out[keys.FORCES]
    if not gradient_head:  # the file leaves net-force removal to the caller (per structure)
        forces = _without_net_force(forces, batch)
    prediction = {keys.ENERGY: energy, keys.FORCES: forces}
    if keys.MEMBER_ATOMIC_ENERGIES in out:  # a committee: each member's energy per structure (B, M)
        members = out[keys.MEMBER_ATOMIC_ENERGIES]
        member_energies = torch.zeros(num_graphs, members.shape[1], dtype=torch.float64, device=positions.device)
        member_energies = member_energies.index_add(0, structure, members)
        prediction[keys.ENERGY_UNCERTAINTY] = member_energies.std(dim=1, unbiased=False)
        prediction[keys.MEMBER_ENERGIES] = member_energies
    if keys.MEMBER_FORCES in out:  # (N, 3, M)
        member_forces = out[keys.MEMBER_FORCES].to(torch.float64)
        if not gradient_head:
            member_forces = _without_net_force(member_forces, batch)
        prediction[keys.FORCE_UNCERTAINTY] = force_uncertainty(member_forces)
        prediction[keys.MEMBER_FORCES] = member_forces
    if keys.VIRIAL in out and num_graphs == 1 and bool(batch[keys.PBC].all()):
        volume = torch.linalg.det(batch[keys.CELL][0]).abs()
        prediction[keys.STRESS] = (-out[keys.VIRIAL].transpose(0, 1) / volume).unsqueeze(0)
    return prediction


def _without_net_force(forces: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Forces (N, 3) or (N, 3, M) minus each structure's mean force (direct heads)."""
    structure, num_atoms = batch[keys.BATCH], batch[keys.NUM_ATOMS]
    net = forces.new_zeros((num_atoms.shape[0],) + forces.shape[1:]).index_add(0, structure, forces)
    count = num_atoms.to(forces.dtype).view((-1,) + (1,) * (forces.dim() - 1))
    return forces - (net / count)[structure]


def _uncertainty_report(values: Dict[str, np.ndarray]) -> Dict[str, object]:
    """How well a committee's energy spread (B,) ranks structures by their absolute energy error (B,),
    and its force spread (N,) the atoms by the length of their force error (N,); the members' own
    errors (B, M) and (N, 3, M), whose mean over members is the committee's error, summarized by
    ``_member_errors``."""
    from scipy.stats import spearmanr  # scipy comes with ase and e3nn

    report = {}
    for what in ("energy", "force"):
        if what not in values:
            continue
        uncertainty, member_errors = values[what], values[f"member_{what}_error"]
        committee_error = member_errors.mean(axis=-1)  # (B,) or (N, 3)
        error = np.abs(committee_error) if what == "energy" else np.linalg.norm(committee_error, axis=1)
        report[f"{what}_uncertainty_mean"] = float(uncertainty.mean())
        report[f"{what}_uncertainty_error_spearman"] = (
            float(spearmanr(uncertainty, error)[0]) if len(error) > 2 else float("nan"))
        report[f"{what}_member_rmse"], report[f"{what}_error_correlation"] = _member_errors(
            member_errors.reshape(-1, member_errors.shape[-1]))
    return report


def _member_errors(errors: np.ndarray) -> Tuple[List[float], float]:
    """errors (samples, M) of M members -> each member's RMSE s_m, and the mean over member pairs of
    r_mn = mean(e_m e_n) / (s_m s_n).

    The committee's error is the mean of the members' errors, so its mean square is exactly
    sum_mn r_mn s_m s_n / M^2: with similar members (RMSE s, correlation r) the mean of M of them has
    RMSE s sqrt((1 + (M - 1) r) / M), which falls no lower than s sqrt(r) however many are added.
    """
    rmse = np.sqrt((errors ** 2).mean(axis=0))
    overlap = errors.T @ errors / errors.shape[0] / np.outer(rmse, rmse)  # (M, M), r_mn
    pairs = np.triu_indices(errors.shape[1], 1)
    return rmse.tolist(), float(overlap[pairs].mean())


def predict_properties(model: torch.nn.Module, dataset: GraphDataset, dtype: torch.dtype, device="cpu",
                       batch_atoms: int = BATCH_ATOMS, progress=None) -> np.ndarray:
    """(B,) float64 predictions of a property model for every structure of ``dataset``, in order
    (``property_outputs``'s keys.PROPERTY)."""
    return property_outputs(model, dataset, dtype, device, batch_atoms, progress)[keys.PROPERTY]


def property_outputs(model: torch.nn.Module, dataset: GraphDataset, dtype: torch.dtype, device="cpu",
                     batch_atoms: int = BATCH_ATOMS, progress=None) -> Dict[str, np.ndarray]:
    """What a property model gives for every structure of ``dataset``, in order: {keys.PROPERTY: (B,)
    float64, and for a committee keys.PROPERTY_UNCERTAINTY: (B,) their spread}.

    ``model``: an eager PropertyModel or PropertyCommittee, or a property model file's module
    (``load_model``), which takes the flat inputs of DeployedProperty. Structures are packed into calls
    of about ``batch_atoms`` atoms; ``progress`` (e.g. a tqdm bar) is advanced by the structures of each call.
    """
    from ..models.property import DeployedProperty, is_property_model

    if is_property_model(model):
        model = DeployedProperty(model)
    out: Dict[str, List[np.ndarray]] = {}
    with torch.no_grad():
        for indices in _batches(dataset, False, batch_atoms):
            batch = collate(dataset.get_batch(indices), dtype=dtype, device=device, paired=False)
            result = model(batch[keys.POSITIONS], batch[keys.ATOM_TYPES], batch[keys.EDGE_INDEX],
                           batch[keys.EDGE_SHIFTS], batch[keys.BATCH], batch[keys.NUM_ATOMS])
            for key, value in result.items():
                out.setdefault(key, []).append(value.to("cpu", torch.float64).numpy())
            if progress is not None:
                progress.update(len(indices))
    if not out:  # no structures
        return {keys.PROPERTY: np.zeros(0)}
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _batches(dataset: GraphDataset, gradient_head: bool, batch_atoms: int):
    """Index lists: stress-labelled periodic structures alone, the others packed to ``batch_atoms``."""
    alone = dataset.has_label(keys.STRESS) if gradient_head else np.zeros(len(dataset), dtype=bool)
    current, atoms = [], 0
    for i in range(len(dataset)):
        if alone[i]:
            yield [i]
            continue
        if current and atoms + dataset.num_atoms[i] > batch_atoms:
            yield current
            current, atoms = [], 0
        current.append(i)
        atoms += int(dataset.num_atoms[i])
    if current:
        yield current


def _collect(parity, prediction, batch) -> None:
    def numpy(t):
        return t.detach().to("cpu", torch.float64).numpy()

    if keys.ENERGY in batch:
        has = numpy(batch[keys.HAS_ENERGY]).astype(bool)
        n = numpy(batch[keys.NUM_ATOMS])[has]
        parity["energy (eV/atom)"][0].append(numpy(batch[keys.ENERGY])[has] / n)
        parity["energy (eV/atom)"][1].append(numpy(prediction[keys.ENERGY])[has] / n)
    if keys.FORCES in batch:
        has = numpy(batch[keys.HAS_FORCES]).astype(bool)
        parity["forces (eV/Å)"][0].append(numpy(batch[keys.FORCES])[has].ravel())
        parity["forces (eV/Å)"][1].append(numpy(prediction[keys.FORCES])[has].ravel())
    if keys.STRESS in batch and keys.STRESS in prediction:
        has = numpy(batch[keys.HAS_STRESS]).astype(bool)
        parity["stress (eV/Å³)"][0].append(numpy(batch[keys.STRESS])[has].ravel())
        parity["stress (eV/Å³)"][1].append(numpy(prediction[keys.STRESS])[has].ravel())


def format_table(report: Dict) -> str:
    """A fixed-width table in meV units: one row per file and per config type (a property model's:
    MAE, RMSE and R² in the target's unit)."""
    if report.get("task") == "property":
        return _property_table(report)
    columns = [("energy", "E meV"), ("energy_per_atom", "E/atom meV"), ("forces", "F meV/Å"),
               ("stress", "S meV/Å³")]
    header = f"{'data':<34} {'N':>6} " + " ".join(f"{label + ' MAE':>15} {'RMSE':>9}" for _, label in columns)
    lines = [header, "-" * len(header)]

    def row(name, summary, n):
        cells = []
        for quantity, _ in columns:
            if f"{quantity}_mae" in summary:
                cells.append(f"{1000 * summary[quantity + '_mae']:>15.4g} {1000 * summary[quantity + '_rmse']:>9.4g}")
            else:
                cells.append(f"{'-':>15} {'-':>9}")
        return f"{name[-34:]:<34} {n:>6} " + " ".join(cells)

    for path, result in report["files"].items():
        lines.append(row(os.path.basename(path), result[ALL], result["num_structures"]))
        for group, summary in result["config_types"].items():
            lines.append(row(f"  {group}", summary, summary.get("energy_count", 0)))
        if "committee" in result:
            c = result["committee"]
            lines.append(f"  committee: mean energy uncertainty {1000 * c['energy_uncertainty_mean']:.4g} meV; rank "
                         f"correlation of uncertainty with |energy error| {c['energy_uncertainty_error_spearman']:.2f}")
            if "force_uncertainty_mean" in c:
                lines.append(f"  committee: mean force uncertainty {1000 * c['force_uncertainty_mean']:.4g} meV/Å per "
                             f"atom; rank correlation with |force error| {c['force_uncertainty_error_spearman']:.2f}")
            for what, unit in (("energy", "meV"), ("force", "meV/Å")):
                if f"{what}_member_rmse" in c:
                    rmse = " / ".join(f"{1000 * s:.4g}" for s in c[f"{what}_member_rmse"])
                    lines.append(f"  committee: {what} RMSE of each member {rmse} {unit}; mean correlation of "
                                 f"their errors {c[f'{what}_error_correlation']:.2f}")
    if len(report["files"]) > 1:
        total = sum(r["num_structures"] for r in report["files"].values())
        lines.append(row("all files", report[ALL], total))
    return "\n".join(lines)


def _property_table(report: Dict) -> str:
    unit = f" {report['unit']}" if report["unit"] else ""
    header = f"{'data':<34} {'N':>6} {'MAE' + unit:>15} {'RMSE' + unit:>15} {'R²':>8}"
    lines = [f"property {report['property']!r}", header, "-" * len(header)]

    def row(name, summary):
        return (f"{name[-34:]:<34} {summary['count']:>6} {summary['mae']:>15.4g} {summary['rmse']:>15.4g} "
                f"{summary['r2']:>8.4f}")

    for path, result in report["files"].items():
        lines.append(row(os.path.basename(path), result[ALL]))
        for group, summary in result["config_types"].items():
            lines.append(row(f"  {group or '(none)'}", summary))
    if len(report["files"]) > 1:
        lines.append(row("all files", report[ALL]))
    return "\n".join(lines)
