"""The training configuration: one YAML file -> nested dataclasses.

Every section is a dataclass whose fields are the allowed keys; an unknown key anywhere is an
error that names it, where it is, and what is allowed (a typo must not silently train the
default). See ``md_examples/configs/train_allegro_small.yaml`` for a commented example.
"""

import dataclasses
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import yaml

from ..data import TypeMapper
from ..models import ModelConfig
from ..models.presets import hyperparameters
from ..models.property import POOLINGS


@dataclass
class DataConfig:
    # extxyz (anything ase.io reads; ASE's file@selection picks structures, e.g. data.extxyz@0:900) or .h5 graph files
    train: List[str] = field(default_factory=list)
    validation: List[str] = field(default_factory=list)  # separate validation files; empty: split train
    val_fraction: float = 0.1  # share of `train` held out when no validation file is given
    # Seed of that split; None: the run's seed. Runs that differ only in their seed (committee members)
    # set it so they hold out the same structures and their validation errors stay comparable.
    split_seed: Optional[int] = None
    keys: Dict[str, str] = field(default_factory=dict)  # label names: {energy: REF_energy, forces: ..., stress: ...}
    type_names: Optional[List[str]] = None  # chemical symbols in model order; None: the elements found
    isolated_atom_energies: Optional[Dict[str, float]] = None  # eV; None: least-squares reference energies
    # or a file of one-atom frames with their energies (e.g. 3BPA's iso_atoms.xyz), read into the line above
    isolated_atoms: Optional[str] = None
    # With isolated-atom energies: add the training set's mean energy per atom beyond them (its binding energy
    # per atom, e.g. -4.87 eV for 3BPA) to every element's reference, so that the network starts at the data's
    # mean instead of learning that offset (MACE's E0s + mean shift); the differences between elements stay
    # the isolated atoms'.
    mean_binding_energy: bool = False


@dataclass
class LossConfig:
    # Weights of mean squared errors in eV^2 per atom^2, (eV/Å)^2 per component, (eV/Å^3)^2 per component.
    energy_per_atom: float = 1.0
    forces: float = 1.0
    stress: float = 0.0  # stress is ~0.01 eV/Å^3: weights of 10-1000 make it count
    # task: property: the weight of the property term (the others must be 0), and its error: l1 (mean
    # absolute, Matbench's metric) or mse, in the target's unit
    property: float = 0.0
    property_loss: str = "l1"


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | adamw
    lr: float = 0.005
    weight_decay: float = 0.0
    # AMSGrad never lets Adam's second-moment estimate shrink: the usual remedy for loss spikes like
    # those of two 3BPA runs here at lr 0.01 and 0.005 (NequIP and MACE default to it)
    amsgrad: bool = False
    clip_grad_norm: Optional[float] = None  # max global gradient norm; None: no clipping
    ema_decay: Optional[float] = 0.99  # exponential moving average of weights; None: off


@dataclass
class ScheduleConfig:
    name: str = "plateau"  # plateau | cosine | constant
    factor: float = 0.5  # plateau: lr multiplied by this ...
    patience: int = 10  # ... after this many epochs without validation improvement
    warmup_epochs: float = 0.0  # cosine: linear warm-up from 0 (fractions of an epoch allowed)
    cosine_epochs: Optional[int] = None  # cosine: length of the decay; None: stop.max_epochs at the start
    min_lr: float = 1e-6  # floor of both schedules


@dataclass
class StopConfig:
    max_epochs: int = 100
    max_minutes: Optional[float] = None  # wall-clock budget of the whole run (resumes included)
    patience: Optional[int] = None  # early stopping: epochs without validation improvement
    monitor: str = "loss"  # validation metric that picks best.pt and drives plateau/patience


@dataclass
class PropertyConfig:
    """task: property. The target is read from atoms.info[data.keys.property]."""

    unit: str = ""  # the target's unit, for files, tables and plots (e.g. cm^-1, eV)
    # intensive: MLP of the mean over atoms of the features (a supercell gives the same) | extensive: sum over
    # atoms of an MLP of each | max: max over atoms of an MLP of each (intensive) | meanmax: MLP of the mean
    # and the element-wise max of the features (intensive); mlip.models.property
    pooling: str = "intensive"
    hidden: List[int] = field(default_factory=lambda: [64, 64])  # hidden widths of the readout MLP
    # join each atom's element descriptors (1/sqrt(mass), covalent radius, Z, period, group) to its
    # learnt features before the readout: they hold across elements, rare ones included
    element_features: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "run"
    # potential: energies, forces, stress | property: one number per structure (see `property`)
    task: str = "potential"
    property: PropertyConfig = field(default_factory=PropertyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    # Structures per optimisation step: the global batch, shared among the processes of a distributed
    # run (torchrun; mlip.train.distributed), so N processes take the same steps as one.
    batch_size: int = 5
    # Also end a batch before it would exceed this many atoms (a larger structure forms a batch alone):
    # for data that mix 10- and 1000-atom cells. None: batch_size alone.
    batch_atoms: Optional[int] = None
    prefetch: bool = True  # collate the next batch in a background thread while a step runs
    # torch.compile the training step's forward and backward (mlip.train.compiled): minutes of
    # compilation at the start (and for a batch of one structure), then faster steps; see README.
    compile: bool = False
    dtype: str = "float32"  # float32 | float64 (energies are always summed in float64)
    # cpu | cuda | cuda:K; under torchrun `cuda` is the GPU of each process's local rank.
    # float32 matmuls stay full float32 (torch's default, TF32 off): see README, "Training on GPUs".
    device: str = "cpu"
    distributed_backend: Optional[str] = None  # under torchrun: gloo | nccl; None: nccl on CUDA, gloo on the CPU
    threads: Optional[int] = 2  # torch intra-op threads; None: leave torch's setting
    seed: int = 0  # model initialisation, batch order of every epoch, train/validation split (data.split_seed)
    init_from: Optional[str] = None  # fine-tune: start from this checkpoint, run directory or deployed model file
    checkpoint_every_steps: int = 0  # also save last.pt inside an epoch every N steps (0: epoch ends only)
    progress: bool = True  # tqdm progress bar


MONITORS = (
    "loss", "energy_per_atom_mae", "energy_per_atom_rmse", "forces_mae", "forces_rmse", "stress_mae", "stress_rmse",
    "property_mae", "property_rmse",
)
CHOICES = {
    ("optimizer", "name"): ("adam", "adamw"),
    ("schedule", "name"): ("plateau", "cosine", "constant"),
    ("stop", "monitor"): MONITORS,
    ("dtype",): ("float32", "float64"),
    ("model", "head"): ("gradient", "direct"),
    ("model", "family"): ("allegro", "nequip"),
    ("distributed_backend",): (None, "gloo", "nccl"),
    ("task",): ("potential", "property"),
    ("property", "pooling"): POOLINGS,
    ("loss", "property_loss"): ("l1", "mse"),
}
POTENTIAL_TERMS = ("energy_per_atom", "forces", "stress")


class ConfigError(ValueError):
    """A configuration that cannot be used as written."""


def config_from_dict(raw: Dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, raw, ())
    if config.data.isolated_atoms is not None and config.data.isolated_atom_energies is None:
        config.data.isolated_atom_energies = _isolated_atom_energies(config.data.isolated_atoms,
                                                                     config.data.keys.get("energy", "energy"))
    if config.data.mean_binding_energy and config.data.isolated_atom_energies is None:
        raise ConfigError("data.mean_binding_energy: shifts isolated-atom reference energies; give "
                          "data.isolated_atoms or data.isolated_atom_energies")
    if config.task == "property":
        _property_task(config, raw)
    for path, allowed in CHOICES.items():
        value = config
        for name in path:
            value = getattr(value, name)
        if value not in allowed:
            raise ConfigError(f"{'.'.join(path)}: {value!r} is not one of {list(allowed)}")
    unknown_labels = sorted(set(config.data.keys) - {"energy", "forces", "stress", "property"})
    if unknown_labels:
        raise ConfigError(f"data.keys: unknown label(s) {unknown_labels}; allowed: "
                          "['energy', 'forces', 'stress', 'property']")
    if config.task == "potential" and ("property" in config.data.keys or config.loss.property > 0):
        raise ConfigError("data.keys.property / loss.property: a property target needs task: property")
    if config.task == "potential" and config.stop.monitor.startswith("property"):
        raise ConfigError(f"stop.monitor: {config.stop.monitor!r} needs task: property")
    if not config.data.train:
        raise ConfigError("data.train: give at least one training file")
    _check_ranges(config)
    if config.model.head == "direct" and config.loss.stress > 0:
        raise ConfigError("loss.stress > 0 needs model.head: gradient (a direct-force head predicts no stress)")
    if config.model.head == "direct" and config.stop.monitor.startswith("stress"):
        raise ConfigError(f"stop.monitor: {config.stop.monitor!r} needs model.head: gradient (a direct-force head "
                          "predicts no stress)")
    if config.data.type_names is not None:
        try:
            TypeMapper(config.data.type_names)
        except ValueError as error:
            raise ConfigError(f"data.type_names: {error}") from None
    return config


def _isolated_atom_energies(path: str, energy_key: str) -> Dict[str, float]:
    """symbol -> eV from a file of one-atom frames (data.isolated_atoms)."""
    from ase.io import read

    from ..data import LabelKeys, keys
    from ..data.atoms import read_labels

    if not os.path.isfile(path):
        raise ConfigError(f"data.isolated_atoms: no such file {path!r}")
    energies: Dict[str, float] = {}
    for k, atoms in enumerate(read(path, ":")):
        if len(atoms) != 1:
            raise ConfigError(f"data.isolated_atoms: {path} frame {k} has {len(atoms)} atoms; each frame must be one "
                              "isolated atom")
        try:
            energy = float(read_labels(atoms, LabelKeys(energy=energy_key), require=(keys.ENERGY,))[keys.ENERGY])
        except (KeyError, ValueError) as error:
            raise ConfigError(f"data.isolated_atoms: {path} frame {k}: {error.args[0]}") from None
        symbol = atoms.get_chemical_symbols()[0]
        if symbol in energies and abs(energies[symbol] - energy) > 1e-9:
            raise ConfigError(f"data.isolated_atoms: {path} gives {symbol} two energies, {energies[symbol]} and "
                              f"{energy} eV")
        energies[symbol] = energy
    if not energies:
        raise ConfigError(f"data.isolated_atoms: {path} holds no frames")
    return energies


def _property_task(config: TrainConfig, raw: Dict[str, Any]) -> None:
    """task: property: the model gets a property head, the loss one term (the property's)."""
    if not config.data.keys.get("property"):
        raise ConfigError("data.keys.property: task: property needs the info key of the target "
                          "(e.g. data: {keys: {property: band_gap}})")
    set_terms = [t for t in POTENTIAL_TERMS if (raw.get("loss") or {}).get(t)]
    if set_terms:
        raise ConfigError(f"loss.{set_terms[0]}: a property model predicts no energy, forces or stress; "
                          "its loss is loss.property alone")
    for term in POTENTIAL_TERMS:
        setattr(config.loss, term, 0.0)
    if "property" not in (raw.get("loss") or {}):
        config.loss.property = 1.0
    if config.stop.monitor not in ("loss", "property_mae", "property_rmse"):
        raise ConfigError(f"stop.monitor: {config.stop.monitor!r} is not measured by a property model; "
                          "use loss, property_mae or property_rmse")
    head = {"name": config.data.keys["property"], "unit": config.property.unit,
            "pooling": config.property.pooling, "hidden": list(config.property.hidden),
            "element_features": config.property.element_features}
    if config.model.property not in (None, head):  # a saved config holds the head it was given
        raise ConfigError("model.property: set by task: property from the property section and data.keys.property")
    config.model.property = head


def _finite(low, high=math.inf, low_open=False, high_open=True):
    """A test and its wording for a number in an interval (NaN and infinities always fail)."""
    def ok(v):
        return math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return ok, (f"a finite number {'>' if low_open else '>='} {low}" if high == math.inf
                else f"in {left}{low}, {high}{right}")


def _at_least(low):
    return (lambda v: v >= low), f"an integer >= {low}"


# Values out of these ranges would train silently wrong (a negative weight acted as zero, a NaN
# learning rate gives NaN weights) or fail much later: refused up front, by their dotted key.
# None (where allowed) means "off" and is not checked.
RANGES = {
    ("loss", "energy_per_atom"): _finite(0.0),
    ("loss", "forces"): _finite(0.0),
    ("loss", "stress"): _finite(0.0),
    ("loss", "property"): _finite(0.0),
    ("optimizer", "lr"): _finite(0.0, low_open=True),
    ("optimizer", "weight_decay"): _finite(0.0),
    ("optimizer", "clip_grad_norm"): _finite(0.0, low_open=True),
    ("optimizer", "ema_decay"): _finite(0.0, 1.0, low_open=True),
    ("data", "val_fraction"): _finite(0.0, 1.0),
    ("data", "split_seed"): _at_least(0),
    ("schedule", "factor"): _finite(0.0, 1.0, low_open=True),
    ("schedule", "patience"): _at_least(0),
    ("schedule", "warmup_epochs"): _finite(0.0),
    ("schedule", "cosine_epochs"): _at_least(1),
    ("schedule", "min_lr"): _finite(0.0),
    ("stop", "max_epochs"): _at_least(0),
    ("stop", "max_minutes"): _finite(0.0, low_open=True),
    ("stop", "patience"): _at_least(1),
    ("model", "r_max"): _finite(0.0, low_open=True),
    ("batch_size",): _at_least(1),
    ("batch_atoms",): _at_least(1),
    ("threads",): _at_least(1),
    ("seed",): _at_least(0),
    ("checkpoint_every_steps",): _at_least(0),
}


def _check_ranges(config: TrainConfig) -> None:
    for path, (ok, rule) in RANGES.items():
        value = config
        for name in path:
            value = getattr(value, name)
        if value is not None and not ok(value):
            raise ConfigError(f"{'.'.join(path)}: {value!r} is not {rule}")
    if not any(getattr(config.loss, term) > 0 for term in POTENTIAL_TERMS + ("property",)):
        raise ConfigError("loss: every weight is 0, so nothing would be fitted")
    if config.schedule.min_lr > config.optimizer.lr:
        raise ConfigError(f"schedule.min_lr: {config.schedule.min_lr} is above optimizer.lr {config.optimizer.lr}")
    for symbol, energy in (config.data.isolated_atom_energies or {}).items():
        if not math.isfinite(energy):
            raise ConfigError(f"data.isolated_atom_energies.{symbol}: {energy!r} is not a finite energy")
    try:
        torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {config.device!r} is not a torch device such as 'cpu', 'cuda', 'cuda:1'") from None
    try:
        hyperparameters(config.model.family, config.model.preset, config.model.overrides)  # as written
        config.model.hyperparameters()  # with model.r_max
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None


def check_device(name: str) -> torch.device:
    """The torch device ``name`` (the config's ``device``), if this machine has it; else a
    ConfigError saying what it has. Checked when a run starts, not when a config is read: a
    checkpoint trained on a GPU must still load on a machine without one."""
    from ..deploy.model_file import usable_device

    try:
        return usable_device(name)
    except ValueError as error:
        raise ConfigError(f"device: {name!r} is not available on this machine ({error})") from None


# What a later stage may change: the training recipe, not the data, the model or where the run lives.
STAGE_SECTIONS = ("loss", "optimizer", "schedule", "stop", "batch_size", "batch_atoms", "seed", "threads")


def load_config(path: Union[str, os.PathLike]) -> TrainConfig:
    """The config of a YAML file; for a file with ``stages:`` its first stage (``load_stages``)."""
    return load_stages(path)[0]


def load_stages(path: Union[str, os.PathLike], run_dir: Optional[str] = None) -> List[TrainConfig]:
    """The stages of a training run: the file's config, then one per entry of its ``stages:`` list
    (none: a list of one). Stage K+1 starts from stage K's best weights (``init_from``) with a fresh
    optimizer and schedule; its entry names the sections it changes (STAGE_SECTIONS): a mapping is
    merged key by key into stage K's section, a number replaces it. With several stages, stage K
    trains in RUN_DIR/stage_K and the last in RUN_DIR itself (what deploy, evaluate and fine-tuning
    read). ``run_dir``: overrides the file's (absolute)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    later = raw.pop("stages", None) or []
    if not isinstance(later, list) or not all(isinstance(stage, dict) for stage in later):
        raise ConfigError(f"{path}: stages: expected a list of mappings (the sections each later stage changes)")
    first = _load_single(path, raw)
    if run_dir is not None:
        first.run_dir = run_dir
    root, configs = first.run_dir, [first]
    for k, stage in enumerate(later, start=2):
        unknown = sorted(set(stage) - set(STAGE_SECTIONS))
        if unknown:
            raise ConfigError(f"{path}: stages[{k - 2}] (stage {k}): {unknown} cannot change between stages; "
                              f"a stage may change {list(STAGE_SECTIONS)}")
        values = config_to_dict(configs[-1])
        for key, value in stage.items():
            values[key] = {**values[key], **value} if isinstance(value, dict) else value
        try:
            configs.append(config_from_dict(values))
        except ConfigError as error:
            raise ConfigError(f"{path}: stages[{k - 2}] (stage {k}): {error}") from None
    if len(configs) > 1:
        for k, config in enumerate(configs[:-1], start=1):
            config.run_dir = os.path.join(root, f"stage_{k}")
        for previous, config in zip(configs, configs[1:]):
            config.init_from = previous.run_dir
    return configs


def _load_single(path: Union[str, os.PathLike], raw: Dict[str, Any]) -> TrainConfig:
    base = os.path.dirname(os.path.abspath(path))
    isolated = (raw.get("data") or {}).get("isolated_atoms") if isinstance(raw.get("data"), dict) else None
    if isinstance(isolated, str):  # read (in config_from_dict) relative to the config file
        raw["data"]["isolated_atoms"] = os.path.join(base, isolated)
    try:
        config = config_from_dict(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    # Relative data paths are relative to the config file, not to where `mlip train` runs.
    config.data.train = [os.path.join(base, p) for p in config.data.train]
    config.data.validation = [os.path.join(base, p) for p in config.data.validation]
    if config.init_from:
        config.init_from = os.path.join(base, config.init_from)
    config.run_dir = os.path.join(base, config.run_dir)
    return config


def config_to_dict(config: TrainConfig) -> Dict[str, Any]:
    return asdict(config)


def _build(cls, raw: Any, where: tuple):
    """A dataclass from a mapping, recursively; unknown keys and wrong kinds raise ConfigError."""
    name = ".".join(where) or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        place = f"in {name}" if where else "at the top level"
        raise ConfigError(f"unknown key(s) {unknown} {place}; allowed: {sorted(fields)}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, where + (key,))
        else:
            values[key] = _coerce(value, hint, ".".join(where + (key,)))
    return cls(**values)


def _coerce(value: Any, hint, name: str):
    """Check a scalar/list/dict value against its annotation (YAML gives 1 for 1.0, a str for a list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if origin in (list, List):
        if isinstance(value, (str, os.PathLike)):
            value = [value]  # `train: a.xyz` means a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value] if args else value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        if args and args[1] is not Any:
            return {str(k): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Any or isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
