"""One exception hierarchy for wsi-mil.

Every error raised on purpose by the package derives from :class:`WsiMilError`. Where a builtin
exception fits, the error also subclasses it (``FileNotFoundError``, ``ValueError``...), so callers
that catch builtins keep working. Messages say what happened *and* what to do next.
Backend errors (OpenSlide, tiffslide, tifffile, h5py) are converted at the boundary that calls them.
"""

from __future__ import annotations


class WsiMilError(Exception):
    """Base class of every error wsi-mil raises on purpose."""


# --- slides ---------------------------------------------------------------------------------------
class SlideError(WsiMilError):
    """A problem with one slide; batch commands record it and go on with the next slide."""


class SlideOpenError(SlideError, OSError):
    """The file could not be opened as a slide (missing, empty, not a slide, truncated)."""


class SlideReadError(SlideError, OSError):
    """Pixels could not be decoded from an opened slide (corrupt tile, I/O error)."""


class ReaderProcessError(SlideReadError):
    """A tile-reading process died while it read the slide (a crash in a decoder, the out-of-memory killer)."""


class MissingMPPError(SlideError, ValueError):
    """The slide does not say its microns per pixel and no override was given."""


class InvalidMPPError(SlideError, ValueError):
    """The microns per pixel are outside the plausible range."""


class SlideTooLargeError(SlideError, MemoryError):
    """A slide or a read exceeds the pixel budget; refused before any allocation."""


class NoTissueError(SlideError):
    """Tissue detection found nothing on the slide (recorded as ``no_tissue``, not as a failure)."""


# --- configuration and inputs ---------------------------------------------------------------------
class ConfigError(WsiMilError, ValueError):
    """A configuration file or option is invalid."""


class InputError(WsiMilError, ValueError):
    """Command inputs are inconsistent (duplicate slide ids, bad label table, leakage...)."""


class DuplicateSlideIdError(InputError):
    """Two input slides share one slide id (file stem)."""


class LabelTableError(InputError):
    """The label CSV is malformed."""


class SplitLeakageError(InputError):
    """One case has slides in more than one split."""


class SlideIdentityError(InputError):
    """An output (bag, scores, heatmap) is paired with a slide file other than the one it came from."""


class NotServedError(WsiMilError, LookupError):
    """The viewer was asked for something its run does not hold or cannot show (an HTTP 404)."""


class MixedCaseLabelError(InputError):
    """Slides of one case carry different labels, so the case has no single label (case-level metrics)."""


# --- outputs and storage --------------------------------------------------------------------------
class OutputError(WsiMilError, OSError):
    """An output folder or file cannot be written (permissions, disk full, lock failures)."""


class ProcessCrashError(WsiMilError, RuntimeError):
    """A process of a multi-process run (``extract --devices``) ended without reporting its slides."""


class OutputConflictError(OutputError):
    """The output folder was made with another configuration; use --overwrite to replace it."""


class BagFileError(WsiMilError, ValueError):
    """A feature bag file is incomplete, foreign, or inconsistent (e.g. features and coords differ)."""


# --- models ---------------------------------------------------------------------------------------
class WeightsError(WsiMilError, FileNotFoundError):
    """Encoder or model weights are missing or cannot be loaded."""


class CheckpointError(WsiMilError, ValueError):
    """A checkpoint is unsafe, unreadable, or does not fit the features."""


class FeatureSpecMismatchError(CheckpointError):
    """Features were made with another encoder, dimension or tile spec than the checkpoint expects."""
