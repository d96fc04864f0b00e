"""PNG figures: learning curves of a run, parity plots of an evaluation (matplotlib, Agg backend)."""

import os
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display, in threads and on clusters
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(rows: List[Dict], path: str) -> None:
    """Loss and validation errors against epoch, log scale; written atomically."""
    rows = [r for r in rows if "epoch" in r]
    if not rows:
        return
    plt = _pyplot()
    epochs = np.array([r["epoch"] for r in rows])
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
        ("energy MAE (meV/atom)", [("val_energy_per_atom_mae", "validation")]),
        ("force MAE (meV/Å)", [("val_forces_mae", "validation")]),
        ("stress MAE (meV/Å³)", [("val_stress_mae", "validation")]),
        ("property MAE", [("val_property_mae", "validation")]),
    ]
    panels = [(t, c) for t, c in panels if any(r.get(k) is not None for k, _ in c for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for key, label in curves:
            values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
            if title not in ("loss", "property MAE"):  # eV -> meV
                values = values * 1000.0
            if np.isfinite(values).any():
                ax.plot(epochs, values, marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_validation_curves(curves: Dict[str, Sequence], path: str, ylabel: str) -> None:
    """Several runs' validation metric against epoch in one panel (log scale), e.g. the folds of a
    cross-validation. ``curves``: {label: [(epoch, value), ...]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, points in curves.items():
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, label=label, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_parity(pairs: Dict[str, Sequence[np.ndarray]], path: str, title: str = "") -> None:
    """One panel per quantity: prediction against reference, with the y = x line.

    ``pairs``: {label: (reference, predicted)}, e.g. {"energy (eV/atom)": (e_ref, e_pred)}.
    """
    pairs = {k: v for k, v in pairs.items() if len(v[0])}
    if not pairs:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.0 * len(pairs), 4.0), squeeze=False)
    for ax, (label, (reference, predicted)) in zip(axes[0], pairs.items()):
        reference, predicted = np.ravel(reference), np.ravel(predicted)
        low, high = min(reference.min(), predicted.min()), max(reference.max(), predicted.max())
        ax.plot([low, high], [low, high], color="0.6", lw=1)
        ax.scatter(reference, predicted, s=4, alpha=0.5, rasterized=True)
        mae = np.abs(predicted - reference).mean()
        ax.set_title(f"{label}\nMAE {mae:.3g}")
        ax.set_xlabel("reference")
        ax.set_ylabel("predicted")
        ax.set_aspect("equal", adjustable="datalim")
        ax.locator_params(nbins=4)  # long tick labels (e.g. -838.975 eV/atom) overlap otherwise
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
