"""The storage layer below every stage: atomic writes, locks, and every on-disk contract.

Each file format has one module with one writer, one validating reader and its schema in the docstring:

=====================  ==========================================  ===========================
module                 file                                        written by
=====================  ==========================================  ===========================
``bag_file``           ``features/<id>.h5`` (feature bag)          ``extract``
``coords_file``        ``coords/<id>.h5`` (tile coordinates)       ``tiles``
``score_file``         ``scores/<id>.h5`` (per-tile scores)        ``predict``
``heatmap_file``       ``<id>/heatmap.h5`` (heatmap arrays)        ``heatmap``
``geojson``            tissue, tile and lesion GeoJSON (QuPath)    ``tiles``/``extract``, ``heatmap``, demo
``records``            ``.records/<id>.json``, ``manifest.csv``    every batch command
``checkpoint``         ``fold_k/model.safetensors`` + ``model.json``  ``train``
=====================  ==========================================  ===========================

``atomic`` (temp file + ``os.replace``, disk-error messages) and ``locks`` (per-slide ``flock`` claims)
serve them all. This package re-exports the helpers that every stage uses.
"""

from __future__ import annotations

from wsi_mil.store.atomic import (
    DISK_ERRNOS,
    HDF5_LOCK_HINT,
    TEMP_PREFIX,
    as_output_error,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    error_errno,
    is_disk_error,
    is_lock_error,
    remove_stale_temp_files,
    stale_temp_files,
    temp_name,
)
from wsi_mil.store.locks import SlideLock, folder_lock
from wsi_mil.store.records import RecordStore

__all__ = [
    "DISK_ERRNOS",
    "HDF5_LOCK_HINT",
    "TEMP_PREFIX",
    "RecordStore",
    "SlideLock",
    "as_output_error",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "ensure_writable_dir",
    "error_errno",
    "folder_lock",
    "is_disk_error",
    "is_lock_error",
    "remove_stale_temp_files",
    "stale_temp_files",
    "temp_name",
]
