"""What run_nequip.py and run_allegro.py share: both models live in the nequip framework.

Runs inside a peer venv (nequip==0.19.1, or nequip-allegro==0.8.3 which brings nequip).
Models are built in Python from their builder functions, untrained (speed does not depend on the
weights), never through a training run or a config file.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402


def init_nequip() -> None:
    # nequip refuses to build models before its global state (TF32 etc.) is set.
    from nequip.utils.global_state import set_global_state

    set_global_state(allow_tf32=False)


def eager_calculator(model):
    """ASE calculator around an in-memory model.

    nequip's public entry points take a compiled file or a saved checkpoint; for a model built
    in Python the calculator is assembled by hand from the same transforms they use.
    """
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms
    from nequip.nn import graph_model

    model.eval()
    type_names = model.metadata[graph_model.TYPE_NAMES_KEY].split(" ")
    r_max = float(model.metadata[graph_model.R_MAX_KEY])
    transforms = basic_transforms(model.metadata, r_max, type_names, {t: t for t in type_names})
    return NequIPCalculator(model, device="cpu", transforms=transforms)


def compiled_calculator(build, tag: str, cache_dir: str):
    """ASE calculator from an AOTInductor file (``nequip-compile --mode aotinductor --target ase``).

    ``nequip-compile`` only reads checkpoints or packages, which need a training run. Its
    ``main`` is reused as is, with the model loader swapped for one that returns our in-memory
    model and a small example frame, so the file has exactly what the CLI would write. The
    compiled shapes are dynamic: one file per model and dtype serves every system size.
    """
    from nequip.integrations.ase import NequIPCalculator

    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(cache_dir), f"{tag}.nequip.pt2")
    if not os.path.exists(path):
        import nequip.scripts.compile as compile_script
        from nequip.data import AtomicDataDict, from_ase

        model = build()
        calc = eager_calculator(model)
        frame = calc.atoms_to_data(common.cu_fcc(108))
        data = AtomicDataDict.batched_from_list([frame])

        def load_in_memory(*args, **kwargs):
            return (model, data) if kwargs.get("return_data_dict") else model

        compile_script.load_saved_model = load_in_memory
        start = time.perf_counter()
        compile_script.main([
            "in-memory", path, "--mode", "aotinductor", "--device", "cpu", "--target", "ase",
        ])
        print(f"compiled {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return NequIPCalculator.from_compiled_model(path, device="cpu", chemical_species_to_atom_type_map=True)


def run_md(package: str, build, args) -> None:
    common.set_threads(args.threads)
    if args.path == "eager":
        calc = eager_calculator(build())
    else:
        calc = compiled_calculator(build, f"{package}-{args.dtype}", args.cache_dir)
    atoms = common.cu_fcc(args.atoms)
    atoms.calc = calc
    ms = common.time_md(atoms, args.steps, args.warmup)
    common.emit(package, args.path, args.dtype, args.atoms, ms, args.threads)


def run_train(package: str, build_for_types, args) -> None:
    """Training steps on 3BPA molecules: forward, energy + force MSE, backward, Adam step."""
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    common.set_threads(args.threads)
    type_names = ["C", "H", "N", "O"]
    model = build_for_types(type_names)
    model.train()
    dtype = getattr(torch, args.dtype)
    transforms = [
        ChemicalSpeciesToAtomTypeMapper(model_type_names=type_names,
                                        chemical_species_to_atom_type_map={t: t for t in type_names}),
        NeighborListTransform(r_max=common.R_MAX),
    ]
    structures = common.read_train_structures(args.train_data, args.batch_size * args.train_steps)
    frames = []
    for atoms in structures:
        frame = from_ase(atoms)
        for t in transforms:
            frame = t(frame)
        frames.append(frame)
    # Batches are built before timing: data loading is not what is compared.
    batches = []
    for i in range(0, len(frames), args.batch_size):
        batch = AtomicDataDict.batched_from_list(frames[i : i + args.batch_size])
        batches.append({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        inputs = {k: v for k, v in batch.items()
                  if k not in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY)}
        out = model(inputs)
        n = batch[AtomicDataDict.NUM_NODES_KEY].to(dtype)
        loss = torch.mean(((out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1) - batch[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)) / n) ** 2)
        loss = loss + torch.mean((out[AtomicDataDict.FORCE_KEY] - batch[AtomicDataDict.FORCE_KEY]) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = common.time_train_steps(step, batches)
    common.emit_train(package, args.path, args.dtype, args.batch_size / seconds, args.threads,
                      batch_size=args.batch_size, atoms=len(structures[0]), dataset="3bpa")
