"""One writer per run directory: a lock held for the life of a training run.

Two runs writing one directory would interleave their log rows and overwrite each other's
checkpoints. ``fcntl.flock`` on ``RUN_DIR/train.lock`` belongs to the open file, so the kernel
releases it when the process ends, however it ends (a SIGKILL or a lost node leaves no stale
lock, unlike a pid file). The file keeps the holder's process id, for the message of a refused
second writer. Distributed training takes it on rank 0 only.
"""

import contextlib
import errno
import fcntl
import os

LOCK_FILE = "train.lock"


class RunDirectoryInUse(RuntimeError):
    """Another process holds this run directory."""


@contextlib.contextmanager
def run_directory_lock(run_dir: str):
    """Hold the existing directory ``run_dir`` for the ``with`` block; refused at once, with a
    RunDirectoryInUse naming the directory and the holding process, if another process holds it."""
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryInUse(
                f"{run_dir} is in use by another training run (process {holder}, lock {path}): wait for it to "
                "end or stop it, or choose another run_dir") from None
        # The file is never removed: a process that opened it just before would lock a lost inode.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
