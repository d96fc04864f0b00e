"""`mlip deploy`, `mlip info`, `mlip evaluate` and `mlip predict`: checkpoints -> model files -> errors on
data, and a property model's predictions."""

import json


def register(commands) -> None:
    from ..cli import POSITIVE_INT, device

    p = commands.add_parser("deploy", help="compile a training checkpoint into a TorchScript model file",
                            description="Compile a checkpoint (or a run directory: its best.pt) into a model file "
                                        "for ASE and LAMMPS, with the EMA weights when the run kept them. "
                                        "Given a model file, re-compile it with this version of mlip (same weights "
                                        "and metadata; a model file keeps the code it was compiled with). "
                                        "Given several, write one committee file: the mean of their energies, "
                                        "forces and stress (a committee among them counts as its members). "
                                        "With --member K, write member K of a committee file alone.")
    p.add_argument("checkpoint", nargs="+",
                   help="checkpoint file (best.pt, last.pt), run directory, or model file; several: one committee "
                        "file whose energy is their mean (models trained on the same structures and split)")
    p.add_argument("-o", "--output", required=True,
                   help="model file to write, e.g. model.pt; an existing model file there is replaced (once the new "
                        "one is complete), anything else (a training checkpoint, one of the inputs) is refused")
    p.add_argument("--no-ema", action="store_true", help="deploy the raw weights instead of their moving average")
    p.add_argument("--no-check", action="store_true", help="skip the compiled-vs-eager numerical check")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="precision of the deployed weights and inputs (default: the model's own)")
    p.add_argument("--format", choices=("torchscript", "aoti"),
                   help="torchscript: one TorchScript file (.pt); aoti: an AOTInductor package (.pt2), compiled "
                        "ahead of time for this torch version (needs a C++ compiler; minutes). "
                        "Default: aoti if the output name ends in .pt2, else torchscript")
    p.add_argument("--member", type=POSITIVE_INT, metavar="K",
                   help="of one committee file, write only its member K (1, 2, ...; as `mlip info` lists them), "
                        "e.g. to fine-tune it")
    p.set_defaults(run=run_deploy)

    p = commands.add_parser("info", help="print the metadata of a model file")
    p.add_argument("model", help="model file written by `mlip deploy`")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(run=run_info)

    p = commands.add_parser("evaluate", help="energy/force/stress errors of a model file on labelled structures",
                            description="MAE and RMSE of energy (per structure and per atom), forces and stress, "
                                        "per file and per config_type, in meV units on screen, eV units in JSON. "
                                        "A property model: MAE, RMSE and R² of its target, in the target's unit.")
    p.add_argument("model", help="model file written by `mlip deploy`")
    p.add_argument("data", nargs="+", help="labelled structure files (extxyz, anything ase.io reads)")
    p.add_argument("--keys", default="",
                   help="label names, e.g. energy=REF_energy,forces=REF_forces,stress=REF_stress; property=NAME: the "
                        "info key of a property model's target (default: the one it was trained on)")
    p.add_argument("--plots", metavar="DIR", help="write parity plots (PNG) into DIR")
    p.add_argument("--json", metavar="FILE", help="write all numbers to FILE (JSON)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(run=run_evaluate)

    p = commands.add_parser("predict", help="a property model's prediction for every structure of a file",
                            description="Predict a property model's target for every structure of a file, in "
                                        "batches, with a progress bar: an extxyz copy of the structures with the "
                                        "prediction in atoms.info[KEY] (-o), and/or a CSV table (--csv) of index, "
                                        "prediction and, where structures carry it, the reference value. Without "
                                        "-o or --csv the table goes to stdout.")
    p.add_argument("models", nargs="+", metavar="model", help="property model file written by `mlip deploy`; "
                   "several (e.g. one per seed): the mean of their predictions, and their spread (the standard "
                   "deviation over the files) under KEY_std, as one committee file gives its members'")
    p.add_argument("data", help="structure file (extxyz, anything ase.io reads; file@selection)")
    p.add_argument("-o", "--output", help="extxyz file to write: the structures with their predictions")
    p.add_argument("--csv", help="CSV file to write: index, prediction[, reference]")
    p.add_argument("--key", help="atoms.info key and column of the prediction (default: the target's name + "
                                 "'_predicted')")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--batch-atoms", type=POSITIVE_INT, default=2000,
                   help="structures per model call are added up to this many atoms (default 2000)")
    p.set_defaults(run=run_predict)


def run_deploy(args) -> int:
    from . import deploy_model

    check_deploy_output(args.output, args.checkpoint)
    output_format = _output_format(args.output, args.format)
    sources = [_eager_model(path, args.no_ema) for path in args.checkpoint]
    if args.member is not None:
        model, data_hash, description = _committee_member(args.checkpoint, sources, args.member)
    elif len(sources) == 1:
        model, data_hash, description = sources[0]
    else:
        from ..models import build_committee

        model = build_committee([model for model, _, _ in sources])  # refuses members of another kind or shape
        hashes = [data_hash for _, data_hash, _ in sources]
        if len(set(hashes)) > 1:  # a model file may carry no hash (null): then the data cannot be confirmed
            listing = ", ".join(f"{path}: {(h or 'unknown')[:12]}" for path, h in zip(args.checkpoint, hashes))
            raise ValueError(f"committee members must share one training set, but their training data hashes "
                             f"differ ({listing})")
        data_hash = hashes[0]
        description = f"a committee (mean) of {len(sources)} models: " + "; ".join(d for _, _, d in sources)
    deploy_model(model, args.output, training_data_hash=data_hash, check=not args.no_check, dtype=args.dtype,
                 format=output_format)
    print(f"wrote {args.output}: {description}")
    return 0


def check_deploy_output(output: str, inputs) -> None:
    """Refuse, before any work, an output that is one of the inputs or an existing file that is not a
    model file (a training checkpoint, found by content, whatever its name): deploying must never
    destroy a run's weights. An existing model file may be replaced."""
    import os

    from ..files import check_output
    from ..train.checkpoint import is_model_file
    from ..train.trainer import prefer_best
    from .aoti import is_aoti_package

    check_output(output, "--output")
    target, seen = os.path.realpath(output), set()
    for path in inputs:
        resolved = os.path.realpath(prefer_best(path))
        if target in (resolved, os.path.realpath(path)):
            raise ValueError(f"--output {output!r} is one of the inputs ({path}): write the model elsewhere")
        if resolved in seen:  # a committee of a model with itself would report zero uncertainty
            raise ValueError(f"input {path!r} is given twice ({resolved})")
        seen.add(resolved)
    if os.path.exists(output) and not (is_model_file(output) or is_aoti_package(output)):
        import zipfile

        kind = "a training checkpoint or other torch file" if zipfile.is_zipfile(output) else "not a model file"
        raise ValueError(f"--output {output!r} exists and is {kind}: refusing to overwrite it "
                         "(only an existing model file may be replaced)")


def _output_format(output: str, requested):
    """--format, or the output's extension (.pt2: AOTInductor); a name that contradicts it is refused."""
    aoti_name = output.endswith(".pt2")
    if requested is None:
        return "aoti" if aoti_name else "torchscript"
    if aoti_name != (requested == "aoti"):
        raise ValueError(f"--format {requested} with output {output}: name AOTInductor packages *.pt2 and "
                         "TorchScript files anything else (e.g. model.pt)")
    return requested


def _committee_member(paths, sources, k: int):
    """(model, training data hash, description) of member k (1-based) of the one committee in ``sources``."""
    from ..models import committee_members

    if len(sources) != 1:
        raise ValueError(f"--member takes one committee file, got {len(sources)} inputs")
    model, data_hash, _ = sources[0]
    members = committee_members(model)
    if len(members) == 1:
        raise ValueError(f"{paths[0]} is a single model, not a committee: --member does not apply")
    if not 1 <= k <= len(members):
        raise ValueError(f"--member {k}: {paths[0]} has members 1 to {len(members)}")
    return members[k - 1], data_hash, f"member {k} of the committee {paths[0]}, alone"


def _eager_model(path: str, no_ema: bool):
    """(potential, training data hash, description) of a checkpoint, run directory or model file."""
    from ..train.checkpoint import is_model_file, load_checkpoint
    from ..train.trainer import model_from_checkpoint, model_from_model_file, prefer_best
    from .model_file import read_metadata

    path = prefer_best(path)
    _refuse_aoti_source(path)
    if is_model_file(path):
        if no_ema:
            raise ValueError(f"--no-ema needs a training checkpoint: {path} is a model file, which holds only "
                             "the weights it was deployed with")
        metadata = read_metadata(path)
        return (model_from_model_file(path), metadata.get("training_data_hash"),
                f"{path} (written by mlip {metadata.get('mlip_version')}) re-compiled, same weights")
    checkpoint = load_checkpoint(path)
    use_ema = not no_ema and checkpoint.get("ema") is not None
    model = model_from_checkpoint(checkpoint, use_ema=use_ema)
    head = model.config.head if model.config.property is None else f"property {model.config.property['name']!r}"
    return (model, checkpoint["training_data_hash"],
            f"{path} (epoch {checkpoint['position']['epoch']}, {'EMA' if use_ema else 'raw'} weights, "
            f"{model.config.family}/{head}, types {model.statistics.type_names})")


def _refuse_aoti_source(path: str) -> None:
    from .aoti import is_aoti_package

    if is_aoti_package(path):
        raise ValueError(f"{path} is an AOTInductor package: it holds compiled code, not weights that can be "
                         "deployed again; deploy from the checkpoint or TorchScript file it was made from")


def run_info(args) -> int:
    from ..files import check_input
    from .model_file import read_metadata

    check_input(args.model, "model file")
    metadata = read_metadata(args.model)
    if args.json:
        print(json.dumps(metadata, indent=1))
        return 0
    print(f"{args.model}")
    print(f"  {'task':<24} {metadata.get('task', 'potential')}")  # files before property models: potentials
    head = metadata.get("property")
    if metadata.get("task") == "property":
        descriptors = ", element descriptors" if head.get("element_features") else ""
        print(f"  {'property':<24} {head['name']!r} in {head.get('unit') or '(no unit)'}, {head.get('pooling')} "
              f"(readout hidden {head.get('hidden')}{descriptors})")
    for key in ("model_family", "force_head", "type_names", "r_max", "message_passing_layers", "dtype",
                "mlip_version", "format", "format_version", "torch_version", "device", "threads", "training_data_hash"):
        if key in metadata or key not in ("torch_version", "device", "threads"):  # AOTInductor packages only
            print(f"  {key:<24} {metadata.get(key)}")
    hyper = dict(metadata.get("hyperparameters", {}))
    members = hyper.pop("members", [])  # a committee: one line per member
    print(f"  {'hyperparameters':<24} " + ", ".join(f"{k}={v}" for k, v in hyper.items()))
    for k, member in enumerate(members, start=1):
        print(f"  {f'committee member {k}':<24} " + ", ".join(f"{name}={v}" for name, v in member.items()))
    statistics = metadata.get("statistics")
    if statistics and metadata.get("task") == "property":
        extra = statistics.get("extra", {})
        prefix = "property_per_atom_" if head.get("pooling") == "extensive" else "property_"
        if prefix + "mean" in extra:
            per = " per atom" if prefix == "property_per_atom_" else ""
            print(f"  {'target mean, std' + per:<24} {extra[prefix + 'mean']:.6g}, {extra[prefix + 'std']:.6g} "
                  f"{head.get('unit', '')}".rstrip())
    elif statistics:
        references = dict(zip(statistics["type_names"], statistics["reference_energies"]))
        print(f"  {'reference energies (eV)':<24} " + ", ".join(f"{k}: {v:.6g}" for k, v in references.items()))
        print(f"  {'force rms (eV/Å)':<24} {statistics['force_rms']:.4g}")
        print(f"  {'avg neighbors':<24} {statistics['avg_num_neighbors']:.4g}")
    return 0


def run_evaluate(args) -> int:
    import os

    import torch

    from ..files import atomic_output, check_input, check_output, check_structure_files
    from ..train.evaluate import evaluate, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    label_keys = parse_keys(args.keys)
    check_input(args.model, "model file")
    check_structure_files(args.data, "data file")
    if args.json:
        check_output(args.json, "--json")
    if args.plots:  # created now: a path that cannot be a directory fails before the evaluation
        if os.path.exists(args.plots) and not os.path.isdir(args.plots):
            raise NotADirectoryError(f"--plots {args.plots!r} exists and is not a directory")
        try:
            os.makedirs(args.plots, exist_ok=True)
        except OSError as error:
            raise OSError(error.errno, f"--plots directory cannot be created: {error.strerror}", args.plots) from None
    report = evaluate(args.model, args.data, label_keys, device=args.device, plots_dir=args.plots)
    print(format_table(report))
    if args.json:
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def run_predict(args) -> int:
    import csv
    import os
    import sys

    import numpy as np
    from ase.io import write
    from tqdm import tqdm

    from ..data import LabelKeys, TypeMapper, check_structure, keys
    from ..data.dataset import iter_graph_chunks, iter_sourced_structures, split_selection
    from ..files import atomic_output, check_input, check_output, check_structure_files
    from ..train.evaluate import property_outputs
    from .model_file import DTYPES, load_model

    for path in args.models:
        check_input(path, "model file")
    check_structure_files([args.data], "data file")
    for path, argument in ((args.output, "--output"), (args.csv, "--csv")):
        if path is not None:
            check_output(path, argument)
            if os.path.exists(path) and os.path.samefile(path, split_selection(args.data)[0]):
                raise ValueError(f"{argument} {path!r} is the input file: write the predictions elsewhere")
    models = [load_model(path, device=args.device) for path in args.models]
    for path, (_, metadata) in zip(args.models, models):
        if metadata.get("task", "potential") != "property":
            raise ValueError(f"{path} is a potential: use mlip evaluate / md / relax")
    first = models[0][1]["property"]
    for path, (_, metadata) in zip(args.models, models):
        if (metadata["property"]["name"], metadata["property"].get("unit")) != (first["name"], first.get("unit")):
            raise ValueError(f"{path} predicts {metadata['property']['name']!r} in {metadata['property'].get('unit')!r}, "
                             f"{args.models[0]} {first['name']!r} in {first.get('unit')!r}: give models of one target")
    name = models[0][1]["property"]["name"]
    key = args.key or f"{name}_predicted"
    sourced = list(iter_sourced_structures([args.data]))  # the structures; their graphs a chunk at a time
    for k, (where, atoms) in enumerate(sourced):  # the cheap checks before any work (overlaps come with the graphs)
        try:
            for _, metadata in models:
                TypeMapper(metadata["type_names"])(atoms.numbers)
            check_structure(atoms)
        except ValueError as error:
            raise ValueError(f"{where}: structure {k} ({atoms.get_chemical_formula()}): {error}") from None
    values, spreads, references = [], [], []  # per file: predictions (and a committee file's spreads)
    with tqdm(total=len(sourced) * len(models), desc="predict", unit="structure", file=sys.stderr) as bar:
        for model, metadata in models:
            values.append([])
            spreads.append([])
            for chunk in iter_graph_chunks(sourced, metadata["r_max"], metadata["type_names"],
                                           LabelKeys(property=name), max_atoms=args.batch_atoms):
                out = property_outputs(model, chunk, DTYPES[metadata["dtype"]], args.device, args.batch_atoms)
                values[-1].extend(out[keys.PROPERTY].tolist())
                spreads[-1].extend(out.get(keys.PROPERTY_UNCERTAINTY, []))
                if len(values) == 1:  # the target, where a structure carries it
                    references.extend(chunk[k].get(keys.PROPERTY) for k in range(len(chunk)))
                bar.update(len(chunk))
    values = np.asarray(values)  # (files, structures)
    # Several files: the spread of their predictions; one committee file: its members' spread.
    spread = values.std(axis=0) if len(models) > 1 else (np.asarray(spreads[0]) if spreads[0] else None)
    rows = [(k, float(value), reference) for k, (value, reference) in enumerate(zip(values.mean(axis=0), references))]
    if args.output:
        for k, ((_, atoms), (_, value, _)) in enumerate(zip(sourced, rows)):
            atoms.info[key] = value
            if spread is not None:
                atoms.info[f"{key}_std"] = float(spread[k])
        with atomic_output(args.output) as tmp:
            write(tmp, [atoms for _, atoms in sourced], format="extxyz")
    if args.csv or not args.output:
        with_reference = any(reference is not None for _, _, reference in rows)
        header = ["index", key] + ([f"{key}_std"] if spread is not None else []) + ([name] if with_reference else [])
        cells = [[k, repr(value)] + ([repr(float(spread[k]))] if spread is not None else [])
                 + (["" if r is None else repr(float(r))] if with_reference else []) for k, value, r in rows]
        if args.csv:
            with atomic_output(args.csv) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([header] + cells)
        else:
            csv.writer(sys.stdout, lineterminator="\n").writerows([header] + cells)
    return 0


def parse_keys(text: str):
    """'energy=REF_energy,forces=REF_forces' -> LabelKeys."""
    from ..data import LabelKeys

    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in ("energy", "forces", "stress", "property") or not value:
            raise ValueError(f"--keys: {item!r} is not LABEL=NAME with LABEL one of energy, forces, stress, property")
        mapping[name] = value
    return LabelKeys(**mapping)
