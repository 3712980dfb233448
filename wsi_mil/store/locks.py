"""Locks shared by every process writing one output folder (Slurm arrays, Kubernetes indexed jobs).

Each slide is claimed with an exclusive ``flock`` on ``<out>/.locks/<slide_id>.lock``; the kernel drops
the lock when its process dies, so locks of dead processes are reclaimed without any clean-up. Folder
locks (:func:`folder_lock`) guard short shared sections such as the manifest (shared by record writes,
exclusive for manifest updates, see :mod:`wsi_mil.store.records`). A file
system that refuses ``flock`` (errno other than "held": ENOLCK, ENOSYS, EINVAL on NFS mounted
``nolock`` or Lustre without ``-o flock``) is an :class:`OutputError` naming the folder and the
remedies. ``enabled=False`` (``extract --no-claims``) takes no locks at all: the processes sharing the
folder must then be given disjoint shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from wsi_mil.errors import OutputError

#: errno values of a ``flock`` that is held by another process (the only failure that is not an error)
HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def lock_refused(out_dir: Path, what: str, exc: OSError) -> OutputError:
    """The error for a file system that refused a ``flock`` in ``out_dir``: the folder and both remedies."""
    return OutputError(
        f"The file system of {out_dir} refused {what} (flock: {exc.strerror or exc}); wsi-mil needs it so that "
        "processes sharing the folder never do a slide twice. Write to a file system that supports flock "
        "(local disk; NFSv4; Lustre mounted with -o flock), or give each process its own --out folder, or "
        "rerun with --no-claims to rely on disjoint shards only (--shard I/N, a Slurm array, a Kubernetes "
        "indexed job or --devices: no two processes may be given the same slide)."
    )


class SlideLock:
    """An exclusive, non-blocking per-slide lock shared by all processes on one output folder.

    Uses ``flock`` on ``<out>/.locks/<slide_id>.lock``: the kernel releases it when the holder dies,
    so a crashed worker's slide is picked up by the next run. With ``enabled=False`` no file is
    touched and :meth:`acquire` always succeeds (claims are off: shards must be disjoint).
    """

    def __init__(self, out_dir: Path, slide_id: str, *, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / ".locks" / f"{slide_id}.lock"
        self.enabled = enabled
        self._fd: int | None = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> bool:
        if not self.enabled:
            self._held = True
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in HELD_ERRNOS:
                return False  # held by another process
            raise lock_refused(self.out_dir, "a slide claim", exc) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._held = True
        return True

    def release(self) -> None:
        self._held = False
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
def folder_lock(out_dir: Path, name: str = "run", *, shared: bool = False, enabled: bool = True) -> Iterator[None]:
    """A blocking lock for short critical sections (manifest updates, config writes): exclusive, or
    ``shared`` with other shared holders (record writes, which only manifest updates must wait for).

    ``enabled=False``: no lock (``--no-claims``; what it guards is then written atomically, last writer wins).
    """
    if not enabled:
        yield
        return
    lock_path = Path(out_dir) / ".locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError as exc:
            raise lock_refused(Path(out_dir), f"the {name} lock", exc) from exc
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
