"""Feature folders (wsi-mil, CLAM, TRIDENT) and lazy bag datasets over them.

Layouts recognised by :func:`discover_features` (``FEATURES`` is what the user passes):

``wsi-mil``
    ``wsi-mil extract`` output: ``OUT/features/<slide_id>.h5`` (``FEATURES`` may be ``OUT`` or
    ``OUT/features``), datasets ``features`` (N x D) and ``coords`` (N x 2, level-0), attributes
    ``encoder_name``, ``pooling``, ``feature_dim``, ``mpp``, ``tile_px``, ``weights_sha256``, ``wsi_mil_version``...
``clam``
    CLAM's ``h5_files/<slide_id>.h5`` (``features`` + ``coords``) and/or ``pt_files/<slide_id>.pt``
    (an ``[N, D]`` tensor, loaded with ``torch.load(weights_only=True)``); ``h5_files`` wins when both
    hold a slide. CLAM records no encoder name, so the encoder cannot be checked (a warning says so).
``trident``
    TRIDENT's ``features_<encoder>/<slide_id>.h5`` (``features`` + ``coords``, tile attributes on
    ``coords``: ``patch_size``, ``patch_size_level0``, ``target_magnification``...); ``FEATURES`` may
    be the ``features_<encoder>`` folder, the folder above it, or the job folder two levels above.
``h5`` / ``pt``
    any other folder of ``.h5`` files with ``features`` (+ ``coords``), or of ``.pt`` tensors.

The slide id is the file name without its extension. Hidden and temp files (``.tmp-*``) are ignored.

:class:`LazyBagDataset` never holds more than the bag of the current step: each ``__getitem__`` opens
the file, reads the ``features`` dataset of that one bag (or ``max_instances`` sorted random rows of
it, block by block) and closes it.

One module because discovery, the readers of the four layouts and the lazy dataset share
:class:`BagSource`/:class:`BagInfo` and the feature-spec checks; the wsi-mil bag format itself is
defined in :mod:`wsi_mil.store.bag_file`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.errors import BagFileError, FeatureSpecMismatchError, InputError
from wsi_mil.mil.data import Bag
from wsi_mil.store.bag_file import FeatureSpec, writer_checked_finite
from wsi_mil.store.hdf5 import decode_attr, h5_open, positive_float, positive_int, text_or_none

logger = logging.getLogger(__name__)

__all__ = [
    "BagInfo",
    "BagSource",
    "FeatureFolder",
    "FeatureSpec",
    "LazyBagDataset",
    "check_spec",
    "cohort_spec",
    "discover_features",
    "inspect_bag",
    "read_coords",
    "read_features",
    "scan_bags",
    "ScanResult",
]

FEATURES = "features"
COORDS = "coords"
_READ_BLOCK_ROWS = 8192
_MPP_REL_TOL = 0.02


@dataclass(frozen=True)
class BagSource:
    """Where one slide's features live: an HDF5 file (``kind='h5'``) or a torch tensor (``'pt'``)."""

    slide_id: str
    path: Path
    kind: str
    layout: str
    encoder_hint: str | None = None  # TRIDENT: the encoder named by the folder


@dataclass
class BagInfo:
    """A scanned bag: size, spec, tile geometry and whether every value is finite."""

    source: BagSource
    n_tiles: int
    spec: FeatureSpec
    slide_mpp: float | None = None
    footprint_px: int | None = None
    has_coords: bool = True
    finite: bool | None = None
    """``None``: not scanned (``check_finite`` off, or trusted: see ``checked_by_writer``)."""
    attrs: dict[str, Any] = field(default_factory=dict)
    checked_by_writer: bool = False
    """The bag's writer checked every value was finite (``values_checked="finite"``)."""


@dataclass(frozen=True)
class FeatureFolder:
    """The bags found under ``root`` in one layout, by slide id (sorted)."""

    root: Path
    layout: str
    sources: dict[str, BagSource]

    def __len__(self) -> int:
        return len(self.sources)


# --- discovery ------------------------------------------------------------------------------------------
def _visible(paths: Sequence[Path]) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and not p.name.startswith("."))


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return _visible([p for p in folder.iterdir() if p.suffix.lower() in suffixes]) if folder.is_dir() else []


def _sources(paths: list[Path], kind: str, layout: str, encoder_hint: str | None = None) -> dict[str, BagSource]:
    return {p.stem: BagSource(p.stem, p, kind, layout, encoder_hint) for p in paths}


def _h5_layout(files: list[Path]) -> str:
    """``wsi-mil`` when the first file carries wsi-mil's attributes, else ``h5``."""
    try:
        with h5_open(files[0]) as f:
            return "wsi-mil" if "wsi_mil_version" in f.attrs and "encoder_name" in f.attrs else "h5"
    except Exception:  # an unreadable first file is reported when it is scanned
        return "h5"


def _trident(folder: Path) -> FeatureFolder:
    encoder = folder.name[len("features_") :] or None
    return FeatureFolder(folder, "trident", _sources(_files(folder, (".h5",)), "h5", "trident", encoder))


def discover_features(path: str | os.PathLike[str]) -> FeatureFolder:
    """Find the bags under ``path`` (a folder in one of the layouts above, or one bag file).

    Raises:
        InputError: nothing found, or several TRIDENT encoders to choose from.
    """
    root = Path(path)
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix not in (".h5", ".pt"):
            raise InputError(f"{root} is not a feature file (.h5 or .pt).")
        kind = suffix[1:]
        layout = _h5_layout([root]) if kind == "h5" else "pt"
        if root.parent.name.startswith("features_"):
            return FeatureFolder(root.parent, "trident", _sources([root], kind, "trident", root.parent.name[9:]))
        return FeatureFolder(root.parent, layout, _sources([root], kind, layout))
    if not root.is_dir():
        raise InputError(f"feature folder {root} does not exist.")
    if root.name.startswith("features_") and _files(root, (".h5",)):
        return _trident(root)
    if (root / "features").is_dir() and _files(root / "features", (".h5",)):
        files = _files(root / "features", (".h5",))
        layout = _h5_layout(files)
        return FeatureFolder(root / "features", layout, _sources(files, "h5", layout))
    h5_dir, pt_dir = root / "h5_files", root / "pt_files"
    if h5_dir.is_dir() or pt_dir.is_dir():
        sources = _sources(_files(pt_dir, (".pt",)), "pt", "clam")
        sources.update(_sources(_files(h5_dir, (".h5",)), "h5", "clam"))
        if not sources:
            raise InputError(f"{root}: CLAM folders h5_files/ and pt_files/ hold no .h5 or .pt files.")
        return FeatureFolder(root, "clam", dict(sorted(sources.items())))
    trident = sorted(p for p in root.glob("features_*") if p.is_dir() and _files(p, (".h5",)))
    if not trident:
        trident = sorted(p for p in root.glob("*/features_*") if p.is_dir() and _files(p, (".h5",)))
    if len(trident) == 1:
        return _trident(trident[0])
    if len(trident) > 1:
        raise InputError(
            f"{root} holds features of several encoders: {[str(p) for p in trident]}; pass one of these folders."
        )
    files = _files(root, (".h5",))
    if files:
        layout = _h5_layout(files)
        return FeatureFolder(root, layout, _sources(files, "h5", layout))
    pts = _files(root, (".pt",))
    if pts:
        return FeatureFolder(root, "pt", _sources(pts, "pt", "pt"))
    raise InputError(
        f"no feature files found under {root}: expected wsi-mil's features/*.h5, CLAM's h5_files/ or "
        "pt_files/, TRIDENT's features_<encoder>/, or a folder of .h5/.pt bags. Run `wsi-mil extract` first."
    )


# --- reading --------------------------------------------------------------------------------------------

def _load_pt(path: Path) -> torch.Tensor:
    """A CLAM ``.pt`` bag: an ``[N, D]`` tensor (or a dict with ``features``/``feats``), never unpickled."""
    import pickle

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BagFileError(
            f"{path}: refused to load; it holds objects other than tensors (weights_only=True): {exc}"
        ) from exc
    except Exception as exc:
        raise BagFileError(f"{path}: unreadable .pt file ({type(exc).__name__}: {exc}).") from exc
    if isinstance(obj, dict):
        for key in ("features", "feats"):
            if isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, torch.Tensor):
        raise BagFileError(f"{path}: expected a [N, D] tensor, found {type(obj).__name__}.")
    if obj.dim() == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() != 2:
        raise BagFileError(f"{path}: features must be [N, D], found shape {tuple(obj.shape)}.")
    return obj


def inspect_bag(source: BagSource, check_finite: bool = True, trust_writer: bool = False) -> BagInfo:
    """Size, feature spec and tile geometry of one bag; with ``check_finite``, one block-wise read pass,
    skipped under ``trust_writer`` when the bag's writer checked every value (``values_checked="finite"``).

    Raises:
        BagFileError: unreadable file, missing ``features``, ``features`` and ``coords`` of different
            lengths (R28), or a wsi-mil file not marked complete; the message names the slide.
    """
    if source.kind == "pt":
        tensor = _load_pt(source.path)
        pt_finite = bool(torch.isfinite(tensor).all()) if check_finite else None
        spec = FeatureSpec(None, int(tensor.shape[1]), None, None)
        return BagInfo(source, int(tensor.shape[0]), spec, has_coords=False, finite=pt_finite)
    try:
        with h5_open(source.path) as f:
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
            if FEATURES not in f:
                raise BagFileError(
                    f"slide {source.slide_id!r} ({source.path}): no 'features' dataset; not a feature bag."
                )
            ds = f[FEATURES]
            if ds.ndim != 2:
                raise BagFileError(
                    f"slide {source.slide_id!r} ({source.path}): features must be [N, D], found {ds.shape}."
                )
            n_tiles, dim = int(ds.shape[0]), int(ds.shape[1])
            coords_attrs: dict[str, Any] = {}
            has_coords = COORDS in f
            if has_coords:
                n_coords = int(f[COORDS].shape[0])
                coords_attrs = {k: decode_attr(v) for k, v in f[COORDS].attrs.items()}
                if n_coords != n_tiles:
                    raise BagFileError(
                        f"slide {source.slide_id!r} ({source.path}) has {n_tiles} feature rows but {n_coords} "
                        "coords; the file is inconsistent. Re-extract this slide."
                    )
            finite: bool | None = None
            checked_by_writer = writer_checked_finite(attrs)
            if check_finite and not (trust_writer and checked_by_writer):
                finite = True
                for start in range(0, n_tiles, _READ_BLOCK_ROWS):
                    if not np.isfinite(ds[start : start + _READ_BLOCK_ROWS]).all():
                        finite = False
                        break
    except BagFileError:
        raise
    except Exception as exc:
        raise BagFileError(
            f"slide {source.slide_id!r}: {source.path} is unreadable or partial ({type(exc).__name__}: {exc}); "
            "re-extract it or remove it from the folder."
        ) from exc
    if source.layout == "wsi-mil" and attrs.get("complete") not in (True, 1):
        raise BagFileError(
            f"slide {source.slide_id!r}: {source.path} is not marked complete (an interrupted extract?); "
            "rerun `wsi-mil extract` on that folder."
        )
    slide_mpp = positive_float(attrs.get("slide_mpp"))
    footprint = positive_int(attrs.get("footprint_px"))
    if source.layout == "trident" or "target_magnification" in coords_attrs:
        magnification = positive_float(coords_attrs.get("target_magnification"))
        level0 = positive_float(coords_attrs.get("level0_magnification"))
        spec = FeatureSpec(
            encoder_name=source.encoder_hint or text_or_none(attrs.get("encoder_name")),
            feature_dim=dim,
            mpp=round(10.0 / magnification, 4) if magnification else None,
            tile_px=positive_int(coords_attrs.get("patch_size")),
        )
        slide_mpp = round(10.0 / level0, 4) if level0 else slide_mpp
        footprint = positive_int(coords_attrs.get("patch_size_level0")) or footprint
    else:
        spec = FeatureSpec(
            encoder_name=text_or_none(attrs.get("encoder_name")),
            feature_dim=dim,
            mpp=positive_float(attrs.get("mpp", attrs.get("tile_mpp"))),
            tile_px=positive_int(attrs.get("tile_px")),
            weights_sha256=text_or_none(attrs.get("weights_sha256")),
            wsi_mil_version=text_or_none(attrs.get("wsi_mil_version")),
            pooling=text_or_none(attrs.get("pooling")),
        )
        if footprint is None:
            footprint = positive_int(coords_attrs.get("patch_size"))
    return BagInfo(
        source=source, n_tiles=n_tiles, spec=spec, slide_mpp=slide_mpp, footprint_px=footprint,
        has_coords=has_coords, finite=finite, attrs=attrs, checked_by_writer=checked_by_writer,
    )


def _read_rows(ds: Any, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` for sorted unique ``rows``, read block by block (fast and bounded in memory)."""
    out = np.empty((len(rows), ds.shape[1]), dtype=np.float32)
    filled = 0
    n = ds.shape[0]
    for start in range(0, n, _READ_BLOCK_ROWS):
        stop = min(start + _READ_BLOCK_ROWS, n)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            first, last = int(rows[lo]), int(rows[hi - 1])
            block = ds[first : last + 1]
            out[filled : filled + hi - lo] = block[rows[lo:hi] - first]
            filled += hi - lo
    return out


def read_features(source: BagSource, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[N, D]`` features of one bag (or the sorted, unique ``rows`` of it)."""
    if source.kind == "pt":
        tensor = _load_pt(source.path)
        selected = tensor if rows is None else tensor[torch.from_numpy(rows)]
        return np.ascontiguousarray(selected.to(torch.float32).numpy())
    try:
        with h5_open(source.path) as f:
            ds = f[FEATURES]
            if rows is None:
                data = ds[()]
                return data if data.dtype == np.float32 else data.astype(np.float32)
            return _read_rows(ds, rows)
    except BagFileError:
        raise
    except Exception as exc:
        raise BagFileError(f"slide {source.slide_id!r}: cannot read {source.path} ({type(exc).__name__}: {exc}).") from exc


def read_coords(source: BagSource, n_tiles: int) -> np.ndarray:
    """int64 ``[N, 2]`` level-0 coords; ``-1`` everywhere when the layout has none (CLAM ``.pt``)."""
    if source.kind == "h5":
        with h5_open(source.path) as f:
            if COORDS in f:
                return np.asarray(f[COORDS][()], dtype=np.int64).reshape(-1, 2)
    return np.full((n_tiles, 2), -1, dtype=np.int64)


# --- specs ----------------------------------------------------------------------------------------------
def _same_mpp(a: float, b: float) -> bool:
    return abs(a - b) <= _MPP_REL_TOL * max(a, b)


def spec_differences(expected: FeatureSpec, actual: FeatureSpec) -> list[str]:
    """Fields known on both sides that disagree, as ``name: expected X, got Y``."""
    out = []
    if expected.feature_dim != actual.feature_dim:
        out.append(f"feature_dim: expected {expected.feature_dim}, got {actual.feature_dim}")
    if expected.encoder_name and actual.encoder_name and expected.encoder_name != actual.encoder_name:
        out.append(f"encoder_name: expected {expected.encoder_name!r}, got {actual.encoder_name!r}")
    if expected.pooling and actual.pooling and expected.pooling != actual.pooling:
        out.append(f"pooling: expected {expected.pooling!r}, got {actual.pooling!r}")
    if (
        expected.weights_sha256
        and actual.weights_sha256
        and expected.weights_sha256 != actual.weights_sha256
    ):
        out.append(
            f"encoder weights_sha256: expected {expected.weights_sha256[:16]}..., got {actual.weights_sha256[:16]}..."
        )
    if expected.mpp and actual.mpp and not _same_mpp(expected.mpp, actual.mpp):
        out.append(f"tile mpp: expected {expected.mpp} µm/px, got {actual.mpp} µm/px")
    if expected.tile_px and actual.tile_px and expected.tile_px != actual.tile_px:
        out.append(f"tile_px: expected {expected.tile_px}, got {actual.tile_px}")
    return out


def unchecked_fields(expected: FeatureSpec, actual: FeatureSpec) -> list[str]:
    """Spec fields that one side does not record (so they could not be compared)."""
    return [
        name
        for name in ("encoder_name", "mpp", "tile_px")
        if (getattr(expected, name) is None) != (getattr(actual, name) is None)
    ]


def check_spec(expected: FeatureSpec, infos: Sequence[BagInfo], what: str = "the checkpoint") -> None:
    """Refuse bags whose spec differs from ``expected`` (R24), naming expected and actual values.

    Raises:
        FeatureSpecMismatchError: listing the first slides concerned and each differing field.
    """
    problems: dict[tuple[str, ...], list[str]] = {}
    unchecked: set[str] = set()
    for info in infos:
        diffs = spec_differences(expected, info.spec)
        if diffs:
            problems.setdefault(tuple(diffs), []).append(info.source.slide_id)
        unchecked.update(unchecked_fields(expected, info.spec))
    if problems:
        parts = []
        for diff_key, slides in problems.items():
            shown = ", ".join(repr(s) for s in slides[:5]) + (f" and {len(slides) - 5} more" if len(slides) > 5 else "")
            parts.append(f"{'; '.join(diff_key)} (slides {shown})")
        raise FeatureSpecMismatchError(
            f"the features do not fit {what}: " + " | ".join(parts) + ". Extract features with the encoder and "
            "tile settings the model was trained with (see its model.json feature_spec)."
        )
    if unchecked:
        logger.warning(
            "could not check %s against %s: one side does not record it (foreign feature layout?)",
            ", ".join(sorted(unchecked)),
            what,
        )


def cohort_spec(infos: Sequence[BagInfo]) -> FeatureSpec:
    """The one spec shared by a training cohort; mixed encoders, dimensions or tile specs are refused."""
    if not infos:
        raise InputError("no bags to train on.")
    first = infos[0].spec
    check_spec(first, infos, what=f"the first slide {infos[0].source.slide_id!r}")
    # fill fields unknown on the first bag from the others (they agree wherever known)
    values = asdict(first)
    for info in infos[1:]:
        for key, value in asdict(info.spec).items():
            if values.get(key) is None and value is not None:
                values[key] = value
    return FeatureSpec(**values)


# --- dataset --------------------------------------------------------------------------------------------
class LazyBagDataset(Sequence[Bag]):
    """Bags read from disk on demand (one file open + one dataset read per ``__getitem__``).

    Args:
        sources: one :class:`BagSource` per bag (its ``slide_id`` is the bag key).
        labels: class index per bag, or ``None`` (inference).
        n_tiles: tiles per bag (from :func:`inspect_bag`), needed for subsampling.
        max_instances: read at most this many random tiles per call (sorted rows, with ``tile_index``);
            ``None``: every tile. Use it on training data only.
    """

    def __init__(
        self,
        sources: Sequence[BagSource],
        labels: Sequence[int | None],
        n_tiles: Sequence[int] | None = None,
        max_instances: int | None = None,
    ) -> None:
        if len(sources) != len(labels):
            raise InputError(f"{len(sources)} bag sources but {len(labels)} labels")
        if max_instances is not None and n_tiles is None:
            raise InputError("max_instances needs n_tiles")
        self.sources = list(sources)
        self.labels = list(labels)
        self.n_tiles = None if n_tiles is None else [int(n) for n in n_tiles]
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Bag:  # type: ignore[override]
        source = self.sources[index]
        rows = None
        if self.max_instances is not None and self.n_tiles is not None and self.n_tiles[index] > self.max_instances:
            # the global torch RNG: seeded by the trainer, reseeded per epoch in DataLoader workers
            rows = torch.randperm(self.n_tiles[index])[: self.max_instances].sort().values.numpy()
        features = torch.from_numpy(read_features(source, rows))
        if features.shape[0] == 0:
            raise BagFileError(f"slide {source.slide_id!r} has no tiles; it should have been excluded.")
        return Bag(
            key=source.slide_id,
            features=features,
            label=self.labels[index],
            tile_index=None if rows is None else torch.from_numpy(rows.astype(np.int64)),
        )


# --- scanning a cohort ------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    """Usable bags by slide id (input order), the slides left out, by reason, and the bags not scanned for
    NaN/Inf because their writer had checked them."""

    infos: dict[str, BagInfo]
    empty: list[str]
    non_finite: list[str]
    trusted: list[str] = field(default_factory=list)


def scan_bags(
    sources: Sequence[BagSource],
    check_finite: bool = True,
    strict: bool = False,
    progress: bool | None = None,
    recheck: bool = False,
) -> ScanResult:
    """Inspect every bag; leave out empty bags (R17, counted) and bags with NaN/Inf (R16, a warning;
    an error under ``strict``). With ``check_finite``, bags whose writer checked every value
    (``values_checked="finite"``, every wsi-mil bag since it was recorded) are trusted unless ``recheck``;
    the others (older wsi-mil bags, CLAM, TRIDENT) are scanned.

    Raises:
        BagFileError: unreadable or inconsistent files (R28), all named at once; NaN/Inf under ``strict``.
    """
    from wsi_mil.progress import progress_bar

    infos: dict[str, BagInfo] = {}
    empty: list[str] = []
    non_finite: list[str] = []
    trusted: list[str] = []
    broken: list[str] = []
    with progress_bar(total=len(sources), desc="checking bags", unit="bag", enable=progress) as bar:
        for source in sources:
            try:
                info = inspect_bag(source, check_finite=check_finite, trust_writer=not recheck)
            except BagFileError as exc:
                broken.append(str(exc))
                bar.update(1)
                continue
            if info.n_tiles == 0:
                empty.append(source.slide_id)
            elif info.finite is False:
                non_finite.append(source.slide_id)
            else:
                infos[source.slide_id] = info
                if check_finite and info.finite is None and info.checked_by_writer:
                    trusted.append(source.slide_id)
            bar.update(1)
    if broken:
        more = f" (and {len(broken) - 5} more)" if len(broken) > 5 else ""
        raise BagFileError(f"{len(broken)} feature file(s) cannot be used: " + " | ".join(broken[:5]) + more)
    if empty:
        logger.warning("%d bag(s) with 0 tiles left out: %s", len(empty), _ids(empty))
    if non_finite:
        message = f"{len(non_finite)} bag(s) hold NaN/Inf features: {_ids(non_finite)}"
        if strict:
            raise BagFileError(message + "; re-extract them (or drop --strict to leave them out).")
        logger.warning("%s; they are left out (re-extract them to use them).", message)
    if trusted:
        logger.info(
            "%d of %d bag(s) not scanned for NaN/Inf: their writer checked every value (--recheck scans them too)",
            len(trusted), len(sources),
        )
    return ScanResult(infos=infos, empty=empty, non_finite=non_finite, trusted=trusted)


def _ids(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(s) for s in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
