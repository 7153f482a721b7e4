"""A run folder belongs to one training process at a time: an advisory lock, and atomic writes
of the small files beside the checkpoints."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

from .errors import RunFolderError

LOCK_NAME = ".lock"


class RunFolderLock:
    """An exclusive flock on <run_dir>/.lock, held while a run trains there.

    The kernel releases it when the holder exits, however it exits (kill -9, a node crash on a
    local disk), so a lock left by a dead process is never in the way; the file keeps the
    holder's host and pid only to say who holds it.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunFolderLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunFolderError(f"cannot write to the run folder {self.path.parent}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or choose another run folder "
                "(hydra.run.dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def holder(self) -> Optional[str]:
        """Who holds the lock now ("process 12 on host"), or None when no process does (a probe:
        it takes a shared lock for an instant, never waits)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file: no run has trained here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


TEMP_SUFFIX = ".tmp"


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new hidden temporary file beside `path`, to be renamed over it; with the
    permissions of a normal file (mkstemp's 0600 would hide run files from collaborators)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_text(path: Path, text: str) -> None:
    """Replace a small text file atomically (summary.json, config.yaml)."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
