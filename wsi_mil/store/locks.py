"""Locks shared by every process writing one output folder (Slurm arrays, Kubernetes indexed jobs).

Each slide is claimed with an exclusive ``flock`` on ``<out>/.locks/<slide_id>.lock``; the kernel drops
the lock when its process dies, so locks of dead processes are reclaimed without any clean-up. Folder
locks (:func:`folder_lock`) guard short shared sections such as the manifest (shared by record writes,
exclusive for manifest updates, see :mod:`wsi_mil.store.records`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from wsi_mil.errors import OutputError


class SlideLock:
    """An exclusive, non-blocking per-slide lock shared by all processes on one output folder.

    Uses ``flock`` on ``<out>/.locks/<slide_id>.lock``: the kernel releases it when the holder dies,
    so a crashed worker's slide is picked up by the next run.
    """

    def __init__(self, out_dir: Path, slide_id: str) -> None:
        self.path = Path(out_dir) / ".locks" / f"{slide_id}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False  # held by another process
            raise OutputError(
                f"The file system of {self.path.parent.parent} refused a slide claim (flock: "
                f"{exc.strerror or exc}); wsi-mil needs it so that processes sharing the folder never do a slide "
                "twice. Write to a file system that supports flock (local disk; NFSv4; Lustre mounted with "
                "-o flock), or give each process its own --out folder."
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def folder_lock(out_dir: Path, name: str = "run", *, shared: bool = False) -> Iterator[None]:
    """A blocking lock for short critical sections (manifest updates, config writes): exclusive, or
    ``shared`` with other shared holders (record writes, which only manifest updates must wait for)."""
    lock_path = Path(out_dir) / ".locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError as exc:
            raise OutputError(
                f"The file system of {lock_path.parent.parent} refused a lock on {lock_path.name} (flock: "
                f"{exc.strerror or exc}); wsi-mil needs it so that processes sharing the folder keep one "
                "manifest. Write to a file system that supports flock (local disk; NFSv4; Lustre mounted with "
                "-o flock), or give each process its own --out folder."
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
