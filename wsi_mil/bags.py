"""Feature bag files (HDF5): written atomically and streamed, validated before they are trusted.

Layout (readable by CLAM's and TRIDENT's loaders): datasets ``features`` (N x D, float32 or float16)
and ``coords`` (N x 2, int64, level-0 top-left x, y) at the root; attributes describe the slide, the
tile grid, the encoder and the run, and ``complete`` is set last. A file without ``complete=True``,
with another config hash, or whose datasets disagree is never taken as done.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BagFileError, OutputError
from .store import HDF5_LOCK_HINT, TEMP_PREFIX, as_output_error

logger = logging.getLogger(__name__)

FEATURES = "features"
COORDS = "coords"


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc)
    return "unable to lock file" in text or "errno = 37" in text or getattr(exc, "errno", None) == 37


def _is_disk_error_text(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        s in text for s in ("errno = 27", "errno = 28", "file too large", "no space left", "errno = 122")
    ) or getattr(exc, "errno", None) in (27, 28, 122)


def h5_open(path: str | os.PathLike[str], mode: str = "r") -> Any:
    """``h5py.File`` with lock failures turned into an error that says what to do (R27)."""
    import h5py

    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if _is_lock_error(exc):
            raise OutputError(f"{path}: {HDF5_LOCK_HINT} ({exc})") from exc
        raise


def _attr_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Mapping | list | tuple) and not isinstance(value, str):
        return json.dumps(value, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


class BagWriter:
    """Stream features and coords of one slide into ``<dest>`` through a temp file in the same folder.

    Use as a context manager: on success the file is marked complete and moved into place; on any
    error (including ``KeyboardInterrupt``) the temp file is removed.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        feature_dim: int,
        attrs: Mapping[str, Any],
        feature_dtype: str = "float32",
        chunk_rows: int = 1024,
    ) -> None:
        self.dest = Path(dest)
        self.feature_dim = int(feature_dim)
        self.attrs = dict(attrs)
        self.feature_dtype = np.dtype(feature_dtype)
        self.chunk_rows = chunk_rows
        self.tmp = self.dest.parent / f"{TEMP_PREFIX}{self.dest.name}.{os.getpid()}"
        self.n = 0
        self._file: Any = None

    def __enter__(self) -> BagWriter:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = h5_open(self.tmp, "w")
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
        except BaseException:
            self._discard()
            raise
        return self

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """Append rows; non-finite features are refused here (R16), before they reach any file."""
        features = np.asarray(features)
        coords = np.asarray(coords, dtype=np.int64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise BagFileError(f"features of shape {features.shape} do not match dimension {self.feature_dim}")
        if len(features) != len(coords):
            raise BagFileError(f"{len(features)} feature rows but {len(coords)} coords")
        finite = np.isfinite(features)
        if not finite.all():
            bad_rows = np.flatnonzero(~finite.all(axis=1))
            where = ", ".join(f"({coords[i, 0]}, {coords[i, 1]})" for i in bad_rows[:5])
            raise BagFileError(
                f"{len(bad_rows)} tile(s) gave NaN/Inf features (first at level-0 {where}); the file is not written. "
                "Try --precision fp32; if it persists the encoder weights are broken."
            )
        if self.feature_dtype == np.float16 and np.abs(features).max(initial=0) > 65504:
            raise BagFileError("features overflow float16; use feature_dtype float32")
        k = len(features)
        if k == 0:
            return
        try:
            f = self._file
            f[FEATURES].resize(self.n + k, axis=0)
            f[FEATURES][self.n : self.n + k] = features.astype(self.feature_dtype, copy=False)
            f[COORDS].resize(self.n + k, axis=0)
            f[COORDS][self.n : self.n + k] = coords
        except OSError as exc:
            if _is_disk_error_text(exc):
                raise as_output_error(exc, self.dest.parent) from exc
            raise
        self.n += k

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            f = self._file
            f[COORDS].attrs["patch_level"] = 0  # CLAM's readers look for these
            if "footprint_px" in self.attrs:
                f[COORDS].attrs["patch_size"] = int(self.attrs["footprint_px"])
            for key, value in self.attrs.items():
                f.attrs[key] = _attr_value(value)
            f.attrs["n_tiles"] = self.n
            f.attrs["feature_dim"] = self.feature_dim
            f.attrs["complete"] = True
            f.flush()
            f.close()
            self._file = None
            os.replace(self.tmp, self.dest)
        except OSError as exc:
            self._discard()
            if _is_disk_error_text(exc):
                raise as_output_error(exc, self.dest.parent) from exc
            raise
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception as exc:  # closing a file on a full disk may fail too
                logger.debug("closing %s failed: %s", self.tmp, exc)
            self._file = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def read_bag_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes of a bag file (``BagFileError`` when it cannot be opened or is not an HDF5 bag)."""
    p = Path(path)
    try:
        with h5_open(p) as f:
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            if FEATURES not in f or COORDS not in f:
                raise BagFileError(f"{p}: not a feature bag (needs datasets '{FEATURES}' and '{COORDS}').")
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


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def bag_is_complete(path: str | os.PathLike[str], config_hash: str | None = None) -> bool:
    """True only for a readable, complete bag with matching datasets (and config hash when given)."""
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

