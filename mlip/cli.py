"""`mlip` command line. Each area registers its own sub-commands; this file only dispatches."""

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from .calculators import cli as calculators_cli
    from .deploy import cli as deploy_cli
    from .lammps import cli as lammps_cli
    from .train import cli as train_cli

    parser = argparse.ArgumentParser(prog="mlip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mlip {__import__('mlip').__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train_cli, deploy_cli, calculators_cli, lammps_cli):
        module.register(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        # Bad input deserves one clear line, not a traceback; MLIP_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("MLIP_DEBUG"):
            raise
        world = os.environ.get("WORLD_SIZE", "1")  # set by torchrun: name the process that failed
        where = f" (rank {os.environ.get('RANK')} of {world})" if world != "1" else ""
        print(f"mlip {args.command}{where}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
