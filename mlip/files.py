"""Files the command line reads and writes: checked before the work, written atomically.

A relaxation, an MD run or a deploy must not fail at its end because its output path was
unusable, and a crash or a full disk must not leave a half-written file under the output's name
(or destroy the previous one). ``check_input`` and ``check_output`` raise ``ValueError`` or
``OSError`` naming the argument and the path; ``atomic_output`` writes through a temporary file in
the target's directory (same file system, so the final rename is atomic) and removes it on failure.
"""

import contextlib
import os
import tempfile
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def check_input(path: PathLike, argument: str) -> None:
    """``path`` is an existing, non-empty regular file (a directory, a device or an empty file are refused)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument} {path!r}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{argument} {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise ValueError(f"{argument} {path!r} is not a regular file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{argument} {path!r} is an empty file")


def check_output(path: PathLike, argument: str) -> None:
    """``path`` can be written: its directory exists and is writable, and it is not a directory or
    a device (which a rename would replace). An existing regular file is allowed (it is replaced)."""
    path = os.fspath(path)
    if not path or path.endswith(os.sep):
        raise ValueError(f"{argument} {path!r} is not a file name")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{argument} {path!r} is a directory; give a file name")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"{argument} {path!r} exists and is not a regular file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{argument} {path!r}: directory {os.path.dirname(path) or directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{argument} {path!r}: directory {os.path.dirname(path) or directory!r} is not writable")


def read_atoms(path: PathLike, argument: str, index=-1):
    """``ase.io.read(path, index)`` of a checked input file, parse errors named (see ``parsing``)."""
    check_input(path, argument)
    import ase.io

    with parsing(path, argument):
        return ase.io.read(path, index=index)


def check_structure_files(paths, argument: str) -> None:
    """Structure files (ASE's ``file@selection`` allowed) exist and their first structure parses:
    garbage is named before a long conversion or evaluation. ``.h5`` graph files are only checked to exist."""
    from .data.dataset import iter_structures, split_selection

    for path in paths:
        check_input(split_selection(path)[0], argument)
        if not os.fspath(path).endswith((".h5", ".hdf5")):
            with parsing(path, argument):
                next(iter_structures([path]), None)


@contextlib.contextmanager
def parsing(path: PathLike, argument: str) -> Iterator[None]:
    """Any error raised by a third-party reader inside the block becomes a ValueError naming the
    file (ase's readers raise anything from IndexError to StopIteration on garbage)."""
    try:
        yield
    except Exception as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{argument} {os.fspath(path)!r} could not be read by ase.io: {detail}") from error


@contextlib.contextmanager
def atomic_output(path: PathLike, mode: Optional[int] = None) -> Iterator[str]:
    """Yields a temporary path next to ``path``, with the same suffix (writers that pick a format by
    extension still see it); renames it to ``path`` when the block succeeds, removes it otherwise.
    An OSError while writing it is raised again naming ``path``.

    The new file gets the permissions a plain ``open(path, "w")`` would give (``mode`` & ~umask), not
    mkstemp's private 0600.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        try:
            yield tmp
        except OSError as error:
            if error.filename not in (None, tmp):  # about another file: not ours to rename
                raise
            # Name the file the user asked for, not the temporary one (a full disk, a quota).
            raise OSError(error.errno, error.strerror or str(error), path) from error
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o666 if mode is None else mode) & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
