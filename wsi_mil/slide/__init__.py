"""Slide access behind one small interface.

:func:`open_slide` is the only way the rest of wsi-mil reads slides, and this package the only one
that imports openslide or tiffslide. :mod:`~wsi_mil.slide.base` holds the :class:`Slide` interface
and its pixel budget, :mod:`~wsi_mil.slide.readers` the two backends, opening and choosing them,
:mod:`~wsi_mil.slide.mpp` the level-0 microns per pixel (checks, metadata, overrides),
:mod:`~wsi_mil.slide.identity` the fingerprint that ties every output to its slide file.
"""

from __future__ import annotations

from wsi_mil.slide.base import (
    DEFAULT_MAX_READ_PX,
    DEFAULT_MAX_SLIDE_PX,
    MAX_TILES_SEARCHED,
    Slide,
    SlideLimits,
)
from wsi_mil.slide.identity import FileStamp, SlideFingerprint, fingerprint_file
from wsi_mil.slide.mpp import MPP_RANGE, MPP_REMEDY, check_mpp, load_mpp_overrides, mpp_from_properties
from wsi_mil.slide.readers import (
    SLIDE_SUFFIXES,
    Backend,
    OpenSlideSlide,
    TiffSlideSlide,
    check_tiff_integrity,
    choose_reader,
    open_slide,
    reader_versions,
)

__all__ = [
    "DEFAULT_MAX_READ_PX",
    "DEFAULT_MAX_SLIDE_PX",
    "MAX_TILES_SEARCHED",
    "MPP_RANGE",
    "MPP_REMEDY",
    "SLIDE_SUFFIXES",
    "Backend",
    "FileStamp",
    "OpenSlideSlide",
    "Slide",
    "SlideFingerprint",
    "SlideLimits",
    "TiffSlideSlide",
    "check_mpp",
    "check_tiff_integrity",
    "choose_reader",
    "fingerprint_file",
    "load_mpp_overrides",
    "mpp_from_properties",
    "open_slide",
    "reader_versions",
]
