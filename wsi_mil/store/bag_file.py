"""Feature bag files (HDF5): written atomically and streamed, validated before they are trusted.

Layout (readable by CLAM's and TRIDENT's loaders): datasets ``features`` (N x D, float32 or float16)
and ``coords`` (N x 2, int64, level-0 top-left x, y) at the root; attributes describe the slide, the
tile grid, the encoder and the run, and ``complete`` is set last. A file without ``complete=True``,
with another config hash, or whose datasets disagree is never taken as done.

``values_checked="finite"``: the writer refused every NaN/Inf (R16), so ``train`` and ``predict`` need not
scan the values again (:func:`writer_checked_finite`); bags without it (older wsi-mil, CLAM, TRIDENT) are scanned.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagFileError, OutputError
from wsi_mil.store.atomic import as_output_error, is_disk_error, temp_name
from wsi_mil.store.hdf5 import (
    decode_attr,
    encode_attr,
    h5_open,
    positive_float,
    positive_int,
    text_or_none,
    written_by,
)

logger = logging.getLogger(__name__)

FEATURES = "features"
COORDS = "coords"
VALUES_CHECKED = "values_checked"
CHECKED_FINITE = "finite"


def writer_checked_finite(attrs: Mapping[str, Any]) -> bool:
    """Whether the bag's writer checked every feature value was finite (``values_checked="finite"``, BagWriter)."""
    return decode_attr(attrs.get(VALUES_CHECKED)) == CHECKED_FINITE


@dataclass(frozen=True)
class FeatureSpec:
    """What features must share with a checkpoint (R24). ``None``: unknown (foreign layouts)."""

    encoder_name: str | None
    feature_dim: int
    mpp: float | None
    tile_px: int | None
    weights_sha256: str | None = None
    wsi_mil_version: str | None = None
    pooling: str | None = None
    """How token outputs became one vector (``cls``, ``cls+mean``, ``avg``); ``None`` in bags written before
    pooling was recorded."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(
            encoder_name=text_or_none(data.get("encoder_name")),
            feature_dim=int(data["feature_dim"]),
            mpp=positive_float(data.get("mpp")),
            tile_px=positive_int(data.get("tile_px")),
            weights_sha256=text_or_none(data.get("weights_sha256")),
            wsi_mil_version=text_or_none(data.get("wsi_mil_version")),
            pooling=text_or_none(data.get("pooling")),
        )


class _GuardedFile:
    """A binary file for h5py's ``fileobj`` driver that never lets HDF5 see a failed write.

    After a failed write (disk full, file too large) HDF5 cannot close the file and the process later
    crashes when HDF5 tears down (measured with h5py 3.16: a segfault at exit). Here the first I/O
    error is kept in :attr:`error` and HDF5 is told the write succeeded; :class:`BagWriter` checks
    :attr:`error` after every append and at the end, raises it, and deletes the (garbage) temp file.
    """

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc

    def readinto(self, buf: Any) -> int:
        try:
            return int(self._fh.readinto(buf) or 0)
        except OSError as exc:
            self._fail(exc)
            return 0

    def read(self, size: int = -1) -> bytes:
        try:
            return self._fh.read(size) or b""
        except OSError as exc:
            self._fail(exc)
            return b""

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if self.error is None:
            try:
                done = 0
                while done < view.nbytes:  # unbuffered writes may be partial
                    done += self._fh.write(view[done:]) or 0
            except OSError as exc:
                self._fail(exc)
        return view.nbytes

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self._fh.truncate(size)
        except OSError as exc:
            self._fail(exc)
            return self._fh.tell() if size is None else size

    def flush(self) -> None:
        return None  # unbuffered

    def fsync(self) -> None:
        try:
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._fail(exc)

    def close(self) -> None:
        self._fh.close()


#: target size of one HDF5 chunk; chunks must fit the chunk cache, or every append re-reads and
#: re-writes a whole chunk
CHUNK_BYTES = 1 << 20


class BagWriter:
    """Stream features and coords of one slide into ``<dest>`` through a temp file in the same folder.

    Use as a context manager: on success the file is marked complete, synced and moved into place; on
    any error (including ``KeyboardInterrupt``) the temp file is removed. Write errors that mean the
    output location is full or unwritable (disk full, file too large, read-only) become
    :class:`OutputError` naming the folder, so a batch stops at once instead of failing every slide.
    With ``expected_rows`` the free space and the file-size limit are checked before anything is
    written, so a slide that cannot fit fails before its tiles are encoded.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        feature_dim: int,
        attrs: Mapping[str, Any],
        feature_dtype: str = "float32",
        chunk_rows: int | None = None,
        expected_rows: int | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.feature_dim = int(feature_dim)
        self.attrs = dict(attrs)
        self.feature_dtype = np.dtype(feature_dtype)
        row_bytes = self.feature_dim * self.feature_dtype.itemsize
        self.chunk_rows = int(chunk_rows or min(1024, max(16, CHUNK_BYTES // max(1, row_bytes))))
        self.expected_rows = expected_rows
        self.tmp = temp_name(self.dest)
        self.n = 0
        self._file: Any = None
        self._io: _GuardedFile | None = None

    def expected_bytes(self, rows: int) -> int:
        """A generous estimate of the finished file's size for ``rows`` tiles."""
        chunks = -(-max(rows, 1) // self.chunk_rows)
        data = chunks * self.chunk_rows * (self.feature_dim * self.feature_dtype.itemsize + 16)
        return int(data * 1.02) + (256 << 10)

    def _check_room(self, rows: int) -> None:
        """Fail fast when the file cannot fit: the free space and ``RLIMIT_FSIZE`` (``ulimit -f``)."""
        need = self.expected_bytes(rows)
        folder = self.dest.parent
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        except (ImportError, OSError, ValueError):
            soft = -1
        if soft >= 0 and soft != getattr(resource, "RLIM_INFINITY", -1) and need > soft:
            raise as_output_error(
                OSError(errno.EFBIG, f"a {need / 1e6:.1f} MB feature file exceeds the file size limit of "
                        f"{soft / 1e6:.1f} MB"),
                folder,
            )
        try:
            st = os.statvfs(folder)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise as_output_error(
                OSError(errno.ENOSPC, f"{need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free"), folder
            )

    def _raise_io_error(self) -> None:
        if self._io is not None and self._io.error is not None:
            exc = self._io.error
            converted = as_output_error(exc, self.dest.parent) if is_disk_error(exc) else exc
            if converted is exc:
                raise exc
            raise converted from exc

    def __enter__(self) -> BagWriter:
        with self._discard_on_error():
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            if self.expected_rows is not None:
                self._check_room(self.expected_rows)
            self._io = _GuardedFile(self.tmp)
            chunk_bytes = self.chunk_rows * self.feature_dim * self.feature_dtype.itemsize
            self._file = h5_open(self._io, "w", rdcc_nbytes=max(1 << 20, 4 * chunk_bytes))
            f = self._file
            f.create_dataset(
                FEATURES,
                shape=(0, self.feature_dim),
                maxshape=(None, self.feature_dim),
                dtype=self.feature_dtype,
                chunks=(self.chunk_rows, self.feature_dim),
            )
            f.create_dataset(COORDS, shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(self.chunk_rows, 2))
            f.attrs["complete"] = False
            self._raise_io_error()
        return self

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """Append rows; non-finite features are refused here (R16), before they reach any file."""
        features = np.asarray(features)
        coords = np.asarray(coords, dtype=np.int64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise BagFileError(
                f"{self.dest.stem}: features of shape {features.shape} do not match dimension {self.feature_dim}"
            )
        if coords.ndim != 2 or coords.shape[1] != 2 or len(features) != len(coords):
            raise BagFileError(f"{self.dest.stem}: {len(features)} feature rows but coords of shape {coords.shape}")
        finite = np.isfinite(features)
        if not finite.all():
            bad_rows = np.flatnonzero(~finite.all(axis=1))
            where = ", ".join(f"({coords[i, 0]}, {coords[i, 1]})" for i in bad_rows[:5])
            raise BagFileError(
                f"{self.dest.stem}: {len(bad_rows)} tile(s) gave NaN/Inf features (first at level-0 {where}); "
                "the file is not written. Try --precision fp32; if it persists the encoder weights are broken."
            )
        if self.feature_dtype == np.float16 and np.abs(features).max(initial=0) > 65504:
            raise BagFileError(f"{self.dest.stem}: features overflow float16; use --feature-dtype float32")
        k = len(features)
        if k == 0:
            return
        f = self._file
        f[FEATURES].resize(self.n + k, axis=0)
        f[FEATURES][self.n : self.n + k] = features.astype(self.feature_dtype, copy=False)
        f[COORDS].resize(self.n + k, axis=0)
        f[COORDS][self.n : self.n + k] = coords
        self.n += k
        self._raise_io_error()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._discard()
            return
        with self._discard_on_error():
            f = self._file
            f[COORDS].attrs["patch_level"] = 0  # CLAM's readers look for these
            if "footprint_px" in self.attrs:
                f[COORDS].attrs["patch_size"] = int(self.attrs["footprint_px"])
            for key, value in self.attrs.items():
                f.attrs[key] = encode_attr(value)
            f.attrs["n_tiles"] = self.n
            f.attrs["feature_dim"] = self.feature_dim
            f.attrs[VALUES_CHECKED] = CHECKED_FINITE  # append() refused every NaN/Inf
            f.attrs["complete"] = True
            f.close()
            self._file = None
            assert self._io is not None
            self._io.fsync()  # durable before it is visible under its final name
            self._raise_io_error()
            self._io.close()
            self._io = None
            os.replace(self.tmp, self.dest)

    @contextlib.contextmanager
    def _discard_on_error(self) -> Iterator[None]:
        """Remove the temp file on any error; disk errors become an :class:`OutputError` naming the folder."""
        try:
            yield
        except OSError as exc:
            self._discard()
            if is_disk_error(exc):
                raise as_output_error(exc, self.dest.parent) from exc
            raise
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception as exc:
                logger.debug("closing %s failed: %s", self.tmp, exc)
            self._file = None
        if self._io is not None:
            with contextlib.suppress(OSError):
                self._io.close()
            self._io = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def read_bag_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes of a bag file (``BagFileError`` when it cannot be opened or is not an HDF5 bag)."""
    p = Path(path)
    try:
        with h5_open(p) as f:
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
            if FEATURES not in f or COORDS not in f:
                raise BagFileError(
                    f"{p}: not a feature bag (needs datasets '{FEATURES}' and '{COORDS}'; {written_by(attrs)})."
                )
            attrs["_n_features"] = int(f[FEATURES].shape[0])
            attrs["_n_coords"] = int(f[COORDS].shape[0])
            attrs["_feature_dim"] = int(f[FEATURES].shape[1]) if f[FEATURES].ndim == 2 else -1
    except BagFileError:
        raise
    except OutputError:
        raise
    except Exception as exc:
        raise BagFileError(f"{p}: unreadable or partial HDF5 file ({type(exc).__name__}: {exc}).") from exc
    return attrs


def bag_is_complete(
    path: str | os.PathLike[str], config_hash: str | None = None, require: Mapping[str, Any] | None = None
) -> bool:
    """True only for a readable, complete bag with matching datasets (and config hash and ``require``d
    attribute values when given)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        attrs = read_bag_attrs(p)
    except (BagFileError, OutputError) as exc:
        logger.info("%s will be recomputed: %s", p, exc)
        return False
    if attrs.get("complete") is not True and attrs.get("complete") != 1:
        logger.info("%s is not marked complete; it will be recomputed", p)
        return False
    if attrs["_n_features"] != attrs["_n_coords"] or attrs.get("n_tiles") != attrs["_n_features"]:
        logger.info("%s has inconsistent lengths; it will be recomputed", p)
        return False
    if config_hash is not None and attrs.get("config_hash") != config_hash:
        logger.info("%s was made with another config; it will be recomputed", p)
        return False
    for key, value in (require or {}).items():
        if attrs.get(key) != value:
            logger.info("%s has %s=%r, not %r; it will be recomputed", p, key, attrs.get(key), value)
            return False
    return True


def load_bag(path: str | os.PathLike[str], *, check_finite: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Features (float32), coords (int64) and attributes; validates lengths (R28)."""
    p = Path(path)
    attrs = read_bag_attrs(p)
    if attrs["_n_features"] != attrs["_n_coords"]:
        raise BagFileError(
            f"{p}: slide '{attrs.get('slide_id', p.stem)}' has {attrs['_n_features']} feature rows but "
            f"{attrs['_n_coords']} coords; the file is inconsistent. Re-extract this slide."
        )
    with h5_open(p) as f:
        features = np.asarray(f[FEATURES][:], dtype=np.float32)
        coords = np.asarray(f[COORDS][:], dtype=np.int64)
    if check_finite and not np.isfinite(features).all():
        raise BagFileError(f"{p}: features contain NaN/Inf.")
    return features, coords, attrs


def feature_file_summary(attrs: Mapping[str, Any]) -> str:
    keys = ("slide_id", "encoder_name", "feature_dim", "mpp", "tile_px", "n_tiles")
    return ", ".join(f"{k}={attrs.get(k)}" for k in keys if k in attrs)
