"""`mlip` command line. Each area registers its own sub-commands; this file only dispatches.

It also holds the argument types all sub-commands share and turns the errors a user causes into one
line on stderr (``--debug`` shows the traceback)."""

import argparse
import math
import os
import sys
from typing import Callable, List, Optional


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is one ``--help`` away); sub-parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type = float, low: Optional[float] = None, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite ``kind`` (float or int), >= ``low`` (> ``low`` if ``strict``).
    NaN and inf are refused here, at parse time, instead of surfacing later as NaN positions."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or (strict and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low:g}")
        return value

    return convert


FINITE = number(float)
POSITIVE = number(float, 0, strict=True)
NON_NEGATIVE = number(float, 0)
POSITIVE_INT = number(int, 0, strict=True)
NON_NEGATIVE_INT = number(int, 0)


def device(text: str) -> str:
    """An argparse ``type=`` for --device: a torch device this machine can compute on, checked before
    any work (the check that loading a model file makes)."""
    from .deploy.model_file import usable_device

    try:
        usable_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from .calculators import cli as calculators_cli
    from .deploy import cli as deploy_cli
    from .lammps import cli as lammps_cli
    from .train import cli as train_cli

    parser = Parser(prog="mlip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mlip {__import__('mlip').__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also MLIP_DEBUG=1); without it, one line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train_cli, deploy_cli, calculators_cli, lammps_cli):
        module.register(commands)
    for command in commands.choices.values():  # also after the command; SUPPRESS keeps `mlip --debug CMD`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the Python traceback of an error")
    return parser


def user_error(error: BaseException) -> bool:
    """Errors that bad input causes (and that carry a message naming it): shown as one line.

    ValueError (also config errors), OSError (missing, unreadable, full disk; ase's parse errors
    of structure files are OSErrors too), KeyError (a missing label or key), RuntimeError (model
    files and checkpoints that do not load, torch refusing a device), ase's unknown-format error.
    Not TypeError, AttributeError, IndexError, AssertionError...: those are bugs and keep their
    traceback.
    """
    from ase.io.formats import UnknownFileTypeError

    return isinstance(error, (ValueError, OSError, KeyError, RuntimeError, UnknownFileTypeError))


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; an OSError with its file name."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, KeyError) and error.args:  # KeyError('energy') or KeyError("a sentence")
        key = str(error.args[0])
        text = key if " " in key else f"missing key {key!r}"
    else:
        text = str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # A bare RuntimeError may come from deep inside torch (a bug as well as bad input): say where more is.
    return lines[0] + (" [details: mlip --debug]" if len(lines) > 1 or type(error) is RuntimeError else "")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version or a bad argument (already printed on one line)
        return stop.code if isinstance(stop.code, int) else 2
    debug = args.debug or os.environ.get("MLIP_DEBUG", "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        detail = f": {stop}" if str(stop) else ""  # e.g. where a stopped training run can be resumed
        print(f"mlip {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
    except Exception as error:
        if debug or not user_error(error):
            raise
        world = os.environ.get("WORLD_SIZE", "1")  # set by torchrun: name the process that failed
        where = f" (rank {os.environ.get('RANK')} of {world})" if world != "1" else ""
        print(f"mlip {args.command}{where}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
