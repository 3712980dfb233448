"""The slide readers: OpenSlide and tiffslide behind :class:`~wsi_mil.slide.base.Slide`; choosing one.

``open_slide(path, backend="auto" | "openslide" | "tiffslide", mpp=None)`` is the only way the rest of
wsi-mil opens slides; this module is the only one that imports openslide or tiffslide. Truncated TIFF
files are refused here before a backend sees them (tiffslide would open them with fewer levels).
:func:`choose_reader` picks the faster backend for a slide where both decode it identically.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_mil.errors import InputError, SlideOpenError
from wsi_mil.slide.base import Slide, SlideLimits
from wsi_mil.slide.identity import FileStamp

logger = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiffslide"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


#: process-wide OpenSlide tile caches by capacity in bytes (see :meth:`OpenSlideSlide.share_tile_cache`)
_SHARED_CACHES: dict[int, Any] = {}
_SHARED_CACHES_LOCK = threading.Lock()


class OpenSlideSlide(Slide):
    backend_name = "openslide"
    _shared_cache: Any = None

    def _open_handle(self) -> None:
        import openslide

        try:
            self._handle = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise _UnsupportedFormat(str(exc)) from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideOpenError(f"OpenSlide could not open {self.path}: {exc}") from exc
        if self._shared_cache is not None:  # a reopened handle keeps the shared cache
            self._handle.set_cache(self._shared_cache)

    def share_tile_cache(self, capacity_bytes: int) -> None:
        """Keep decoded tiles in one process-wide cache of ``capacity_bytes``, shared by every handle given the
        same capacity, instead of a cache of its own per handle (OpenSlide's default, 32 MiB each): many open
        handles then stay within one budget. Needs OpenSlide >= 4; older versions keep their own caches."""
        import openslide

        if not hasattr(openslide, "OpenSlideCache"):
            logger.debug("OpenSlide %s has no shared tile cache", openslide.__library_version__)
            return
        with _SHARED_CACHES_LOCK:
            cache = _SHARED_CACHES.get(capacity_bytes)
            if cache is None:
                cache = _SHARED_CACHES[capacity_bytes] = openslide.OpenSlideCache(capacity_bytes)
        self._shared_cache = cache
        self._handle.set_cache(cache)

    def _read_rgba(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        return np.asarray(self._handle.read_region(location_px, level, size_px))

    @property
    def backend_version(self) -> str:
        import openslide

        return f"openslide-python {openslide.__version__}, OpenSlide {openslide.__library_version__}"

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(self._handle.associated_images.keys())

    def _read_associated(self, name: str) -> Any:
        return self._handle.associated_images[name]


class TiffSlideSlide(Slide):
    backend_name = "tiffslide"

    def _open_handle(self) -> None:
        import tiffslide

        try:
            self._handle = tiffslide.TiffSlide(str(self.path))
        except Exception as exc:  # tiffslide raises tifffile/zarr/ValueError variants
            raise SlideOpenError(f"tiffslide could not open {self.path}: {type(exc).__name__}: {exc}") from exc

    def _read_rgba(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        return np.asarray(self._handle.read_region(location_px, level, size_px, as_array=True, padding=False))

    @property
    def backend_version(self) -> str:
        import tiffslide

        return f"tiffslide {tiffslide.__version__}"

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(k for k in self._handle.associated_images.keys() if k)

    def _read_associated(self, name: str) -> Any:
        return self._handle.associated_images[name]


class _UnsupportedFormat(Exception):
    """OpenSlide does not recognise the format; ``auto`` may try tiffslide."""


_BACKENDS: dict[str, type[Slide]] = {"openslide": OpenSlideSlide, "tiffslide": TiffSlideSlide}


def open_slide(
    path: str | os.PathLike[str],
    backend: Backend = "auto",
    mpp: float | None = None,
    limits: SlideLimits | None = None,
    *,
    verified: FileStamp | None = None,
) -> Slide:
    """Open a slide with OpenSlide (``auto`` falls back to tiffslide for formats OpenSlide does not know).

    Raises :class:`SlideOpenError` for missing, empty, non-slide or truncated files,
    :class:`SlideTooLargeError` when the header claims more pixels than the budget,
    :class:`MissingMPPError` / :class:`InvalidMPPError` for unusable resolution metadata.

    The TIFF integrity scan (:func:`check_tiff_integrity`, a walk over every image directory) is skipped
    when ``verified`` is the :attr:`Slide.file_stamp` of an earlier open of the same file in this run and
    the file's stamp now is still that one; otherwise it runs. The returned slide's ``file_stamp`` is the
    stamp taken before the scan (a file changed during the scan gets another stamp, so is scanned again).
    """
    p = Path(path)
    if not p.exists():
        raise SlideOpenError(f"Slide file {p} does not exist. Check the path (and the mount, in Docker).")
    if not p.is_file():
        raise SlideOpenError(f"{p} is not a file.")
    stamp = FileStamp.of(p.stat())
    if stamp.size_bytes == 0:
        raise SlideOpenError(f"Slide file {p} is empty (0 bytes): the copy or download did not finish. Copy it again.")
    if backend not in ("auto", "openslide", "tiffslide"):
        raise InputError(f"Unknown slide backend {backend!r}; use auto, openslide or tiffslide.")
    if verified is not None and FileStamp(*verified) == stamp:
        logger.debug("%s: unchanged since it was checked in this run; integrity scan skipped", p)
    else:
        check_tiff_integrity(p)
    slide = _open_backend(p, backend, mpp, limits)
    slide.file_stamp = stamp
    return slide


def _open_backend(p: Path, backend: Backend, mpp: float | None, limits: SlideLimits | None) -> Slide:
    if backend in ("auto", "openslide"):
        try:
            return OpenSlideSlide(p, mpp=mpp, limits=limits)
        except _UnsupportedFormat as exc:
            if backend == "openslide":
                raise SlideOpenError(
                    f"OpenSlide does not recognise {p} as a slide ({exc}). Check the file is a whole-slide "
                    "image; try `--backend tiffslide` for plain pyramidal TIFFs."
                ) from exc
            logger.debug("OpenSlide does not know %s; trying tiffslide", p)
    try:
        return TiffSlideSlide(p, mpp=mpp, limits=limits)
    except SlideOpenError as exc:
        if backend != "auto":
            raise
        raise SlideOpenError(
            f"{p} is not a slide that OpenSlide or tiffslide can open ({exc}). Check the file is a "
            "whole-slide image and that it was copied completely."
        ) from exc


#: suffixes of the TIFF-based formats tiffslide reads
_TIFFSLIDE_SUFFIXES = (".svs", ".tif", ".tiff")


def choose_reader(slide: Slide, requested: str) -> Slide:
    """The slide object to read this slide with: with ``backend: auto``, tiffslide where it reads the same.

    tiffslide decodes TIFF/SVS JPEG tiles straight to RGB; OpenSlide returns premultiplied RGBA that
    is then composited. Measured here, tiffslide reads a tile in a third to a half of OpenSlide's time
    and a whole pyramid level (the QC thumbnail) in a third, which matters on a CPU where reading
    competes with the model. It is used only for TIFF and SVS files on which it sees the same pyramid
    and decodes a region of the coarsest level and a level-0 tile at the centre pixel-identically;
    otherwise, and whenever a backend was chosen explicitly, ``slide`` itself is returned. The caller
    closes a returned slide that is not ``slide``.
    """
    if requested != "auto" or slide.backend_name == "tiffslide" or slide.path.suffix.lower() not in _TIFFSLIDE_SUFFIXES:
        return slide
    try:
        other = open_slide(slide.path, backend="tiffslide", mpp=slide.mpp, limits=slide.limits, verified=slide.file_stamp)
    except Exception as exc:  # any refusal means: keep the slide's own reader
        logger.debug("%s: tiffslide cannot read it (%s); OpenSlide reads it", slide.slide_id, exc)
        return slide
    try:
        same_pyramid = other.level_dimensions == slide.level_dimensions and all(
            abs(a - b) <= 1e-6 * a for a, b in zip(other.level_downsamples, slide.level_downsamples, strict=True)
        )
        if same_pyramid:
            w0, h0 = slide.dimensions
            top = slide.level_count - 1
            tw, th = slide.level_dimensions[top]
            size = (min(tw, 512), min(th, 512))
            ds = slide.level_downsamples[top]
            probes = [
                (round((tw - size[0]) / 2 * ds), round((th - size[1]) / 2 * ds), top, size),
                (max(0, w0 // 2 - 128), max(0, h0 // 2 - 128), 0, (256, 256)),
            ]
            if all(
                np.array_equal(other.read_region((x, y), lv, sz), slide.read_region((x, y), lv, sz))
                for x, y, lv, sz in probes
            ):
                other.mpp_source = slide.mpp_source
                return other
            logger.info("%s: the backends decode it differently; OpenSlide reads it", slide.slide_id)
    except Exception as exc:
        logger.debug("%s: comparing the backends failed (%s); OpenSlide reads it", slide.slide_id, exc)
    other.close()
    return slide


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def check_tiff_integrity(path: Path) -> None:
    """Refuse truncated TIFF-family files (tiffslide opens them silently with fewer levels).

    Checks that the IFD chain ends inside the file and that every page's image data lies within it.
    Non-TIFF files are left to the backends.
    """
    with open(path, "rb") as magic_fh:
        head = magic_fh.read(4)
    if head not in _TIFF_MAGIC:
        return
    import tifffile

    file_size = path.stat().st_size
    tiff_logger = logging.getLogger("tifffile")
    previous_level = tiff_logger.level
    tiff_logger.setLevel(logging.CRITICAL)  # we report the problem ourselves
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            if not pages:
                raise SlideOpenError(f"{path}: the TIFF holds no images; the file is truncated or not a slide.")
            fmt = tif.tiff
            for index, page in enumerate(pages):
                offsets = getattr(page, "dataoffsets", ())
                counts = getattr(page, "databytecounts", ())
                end = max((int(o) + int(c) for o, c in zip(offsets, counts, strict=False)), default=0)
                if end > file_size:
                    raise SlideOpenError(
                        f"{path} is truncated: image {index} needs {end} bytes but the file has {file_size}. "
                        "Copy the slide again (compare its size or checksum with the source)."
                    )
            last = pages[-1]
            fh: Any = tif.filehandle
            fh.seek(last.offset)
            (n_tags,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
            fh.seek(last.offset + fmt.tagnosize + n_tags * fmt.tagsize)
            raw = fh.read(fmt.offsetsize)
            next_ifd = struct.unpack(fmt.offsetformat, raw)[0] if len(raw) == fmt.offsetsize else -1
            if next_ifd != 0:
                raise SlideOpenError(
                    f"{path} is truncated: its image directory chain points past the end of the file "
                    f"after {len(pages)} image(s). Copy the slide again."
                )
    except SlideOpenError:
        raise
    except Exception as exc:
        raise SlideOpenError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc}).") from exc
    finally:
        tiff_logger.setLevel(previous_level)


def reader_versions() -> dict[str, str]:
    """Versions of the slide readers that are installed (for run records)."""
    out: dict[str, str] = {}
    try:
        import openslide

        out["openslide_python"] = openslide.__version__
        out["openslide"] = str(openslide.__library_version__)
    except Exception:  # noqa: S110 - report what is there
        pass
    try:
        import tiffslide

        out["tiffslide"] = tiffslide.__version__
    except Exception:  # noqa: S110
        pass
    return out
