"""Atomic writes: nothing is written in place.

Outputs go to a temp file (``.tmp-*``) in the destination folder and are moved with ``os.replace``
once complete, so a killed run leaves either nothing or a complete file. Disk and lock errors are
turned into :class:`~wsi_mil.errors.OutputError` naming the folder and the remedy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsi_mil.errors import OutputError
from wsi_mil.store.locks import SlideLock

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"

HDF5_LOCK_HINT = (
    "The file system refused HDF5's file lock (common on NFS/Lustre/SMB). Set the environment variable "
    "HDF5_USE_FILE_LOCKING=FALSE and run again, or write to a local disk."
)


_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def error_errno(exc: BaseException) -> int | None:
    """The errno of an OS error, also when HDF5 only states it in the message (``errno = 27``).

    h5py raises ``OSError`` or ``RuntimeError`` (depending on the HDF5 call that failed) whose ``errno``
    is often unset; the C library's errno is in the text.
    """
    value = getattr(exc, "errno", None)
    if isinstance(value, int):
        return value
    match = _ERRNO_IN_TEXT.search(str(exc))
    return int(match.group(1)) if match else None


#: errno values that mean "this output location cannot take more data / any data"
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


def _disk_error_message(exc: BaseException, folder: Path) -> str:
    code = error_errno(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"No space left while writing to {folder}: free space there or choose another --out folder."
    if code == errno.EFBIG:
        return (
            f"File too large for {folder} (a file size limit such as `ulimit -f`, or the file system's "
            "limit): raise the limit or choose another --out folder."
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = getattr(exc, "strerror", None) or os.strerror(code)
        return f"Cannot write to {folder} ({reason}): choose a writable --out folder or fix its permissions."
    if code == errno.ENOLCK:
        return f"{folder}: {HDF5_LOCK_HINT}"
    return f"Could not write to {folder}: {exc}"


def is_lock_error(exc: BaseException) -> bool:
    """HDF5's file-locking failure on file systems without locks (ENOLCK 37, ENOSYS 38: NFS, Lustre, SMB).

    ``EAGAIN``/``EWOULDBLOCK`` (another process has the file open) is not one: turning locking off
    would not be the remedy.
    """
    code = error_errno(exc)
    if code == errno.ENOLCK:
        return True
    return "unable to lock file" in str(exc) and code not in (errno.EAGAIN, errno.EWOULDBLOCK)


def is_disk_error(exc: BaseException) -> bool:
    """An OS or HDF5 error saying the output cannot be written (full, too large, read-only, denied)."""
    return isinstance(exc, OSError | RuntimeError) and error_errno(exc) in DISK_ERRNOS


def as_output_error(exc: BaseException, folder: Path) -> OutputError:
    """Convert an OS/HDF5 write error into an :class:`OutputError` that names ``folder`` and says what to do."""
    if is_lock_error(exc):
        return OutputError(f"{folder}: {HDF5_LOCK_HINT} ({exc})")
    return OutputError(_disk_error_message(exc, folder))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it onto ``path`` when the block succeeds.

    On any exception (including ``KeyboardInterrupt``) the temp file is removed and nothing is
    written at ``path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest, dest.suffix if suffix is None else suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode as open() gives, less umask
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    dest = Path(path)
    try:
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        if is_disk_error(exc):
            raise as_output_error(exc, dest.parent) from exc
        raise
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def temp_name(dest: Path, suffix: str = "") -> Path:
    """A unique temp path next to ``dest``: ``.tmp-<name>.<pid>.<8 hex><suffix>`` (see :func:`stale_temp_files`)."""
    return dest.parent / f"{TEMP_PREFIX}{dest.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def stale_temp_files(dest: Path) -> list[Path]:
    """Temp files of ``dest`` (made by :func:`temp_name`) that are still there, e.g. after a SIGKILL."""
    pattern = re.compile(re.escape(f"{TEMP_PREFIX}{dest.name}.") + r"\d+\.[0-9a-f]{8}(\.[^.]*)?")
    try:
        return sorted(p for p in dest.parent.iterdir() if pattern.fullmatch(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_stale_temp_files(dest: Path, *, claim: SlideLock) -> int:
    """Remove the temp files a killed writer of ``dest`` left (SIGKILL gives it no chance to).

    ``claim``: the claim of the slide ``dest`` belongs to, held by this process (refused otherwise): then
    no live process is writing them. (Under ``--no-claims`` the claim is a disabled lock, held by the
    process whose shard owns the slide.)
    """
    if not claim.held:
        raise ValueError(f"{dest}: only the process holding the slide's claim may remove its temp files.")
    n = 0
    for p in stale_temp_files(dest):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
            logger.info("removed %s, left by an interrupted run", p)
    return n


def ensure_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and prove it is writable, before any slide is opened (R15)."""
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"Output folder {p} is not writable ({exc.strerror or exc}). Choose a writable --out folder "
            "(in Docker, mount it read-write and check the container user's permissions)."
        ) from exc
    return p
