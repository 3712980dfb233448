"""The tile stream: a slide's tiles read in batches for the encoder.

:class:`TileBatches` reads batches of tiles of one slide (rows of touching tiles in one read), opening
its own slide handle in each process from a picklable :class:`TileSource`. The batches are read by a
background thread (:class:`ThreadBatches`), in series (:func:`series_batches`) or by the run's
tile-reading processes (:mod:`wsi_mil.features.reader_pool`); :func:`model_batches` splits what was read
together into the encoder's forward passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wsi_mil.errors import SlideReadError
from wsi_mil.slide import FileStamp, Slide, SlideLimits, open_slide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileSource:
    """What a tile-reading process needs to open the slide itself (picklable; no handle crosses processes)."""

    path: str
    backend: str
    slide_mpp: float
    max_slide_px: int
    max_read_px: int
    mpp: float
    tile_px: int
    skip_unreadable: bool
    #: the file's stamp when this run opened and checked it: an unchanged file is not scanned again
    verified_stamp: FileStamp | None = None


class TileBatches(Dataset[dict[str, Any]]):
    """Batches of tiles: ``dataset[list_of_indices]`` -> uint8 ``[B, tile_px, tile_px, 3]`` and flags.

    Each process (main or tile-reading worker) opens its own slide handle on first use: OpenSlide
    handles must not be shared across forked workers. :meth:`read_tiles` reads tiles at any level-0
    coords of the slide (the reading processes get each batch's coords with the batch).
    """

    def __init__(self, source: TileSource, coords: np.ndarray | None = None) -> None:
        self.source = source
        self.coords = np.asarray(coords if coords is not None else np.empty((0, 2)), dtype=np.int64)
        self._slide: Slide | None = None
        self._pid = -1
        self._rows: tuple[int, int, int, bool] | None | bool = False  # not yet worked out
        #: slide opens (:func:`open_slide`) so far; a handle reopened after a decode error is not one
        self.n_opens = 0

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            s = self.source
            self._slide = open_slide(
                s.path,
                backend=s.backend,  # type: ignore[arg-type]
                mpp=s.slide_mpp,
                limits=SlideLimits(max_slide_px=s.max_slide_px, max_read_px=s.max_read_px),
                verified=s.verified_stamp,
            )
            self._pid = os.getpid()
            self.n_opens += 1
        return self._slide

    def read_tile(self, index: int) -> np.ndarray:
        return self._read_at(self.coords[index])

    def _read_at(self, xy: np.ndarray) -> np.ndarray:
        x, y = (int(v) for v in xy)
        return self._handle().read_region_mpp(
            (x, y), (self.source.tile_px, self.source.tile_px), self.source.mpp
        )

    def row_geometry(self) -> tuple[int, int, int, bool] | None:
        """How tiles of one row can be read in one call: ``(level, level pixels per tile, level-0 width
        of a tile's footprint, exact)``, or None when they cannot.

        A row read gives exactly the pixels of :meth:`read_tile` when the footprints start on whole
        pixels of the level read (level 0, or level-0 coordinates divisible by its downsample, which
        the run checks). ``exact``: the level-to-tile scale is an integer, so one resize of the whole
        row equals per-tile resizes (area averages never straddle two tiles); otherwise each tile's
        footprint is cut out of the row and resized on its own.
        """
        if self._rows is False:
            slide, px, mpp = self._handle(), self.source.tile_px, self.source.mpp
            level = slide.best_level_for_mpp(mpp)
            scale = mpp / slide.level_mpp(level)
            src = max(1, round(px * scale))
            downsample = slide.level_downsamples[level]
            width = src * downsample
            exact = scale >= 1 and abs(scale - round(scale)) < 1e-9 and src == round(scale) * px
            whole = abs(downsample - round(downsample)) < 1e-9 and abs(width - round(width)) < 1e-9
            self._rows = (level, src, round(width), exact) if whole else None
        return self._rows if self._rows is not False else None  # type: ignore[return-value]

    def _read_row(self, coords: np.ndarray, run: list[int], out: np.ndarray) -> None:
        """Tiles ``coords[run]`` (left to right on one row, footprints touching or overlapping) into ``out``:
        one read for the row, then one resize (integral scale) or one per tile."""
        level, src, _, exact = self.row_geometry()  # type: ignore[misc]
        slide = self._handle()
        downsample = round(slide.level_downsamples[level])
        px = self.source.tile_px
        x0, y = (int(v) for v in coords[run[0]])
        offsets = [(int(coords[i][0]) - x0) // downsample for i in run]
        region = slide.read_region((x0, y), level, (offsets[-1] + src, src))
        if exact and offsets == [k * src for k in range(len(run))]:
            if src != px:
                region = cv2.resize(region, (px * len(run), px), interpolation=cv2.INTER_AREA)
            out[:] = region.reshape(px, len(run), px, 3).transpose(1, 0, 2, 3)
            return
        for j, dx in enumerate(offsets):
            crop = region[:, dx : dx + src]
            out[j] = crop if src == px else cv2.resize(crop, (px, px), interpolation=cv2.INTER_AREA)

    def _runs(self, coords: np.ndarray) -> list[list[int]]:
        """Consecutive positions in ``coords`` on one row whose footprints touch or overlap (read together)."""
        geometry = self.row_geometry()
        if geometry is None:
            return [[i] for i in range(len(coords))]
        downsample = round(self._handle().level_downsamples[geometry[0]])
        width = geometry[2]
        runs: list[list[int]] = []
        for i in range(len(coords)):
            here = coords[i]
            if runs:
                last = coords[runs[-1][-1]]
                first = coords[runs[-1][0]]
                if (
                    here[1] == last[1]
                    and 0 < here[0] - last[0] <= width
                    and here[0] % downsample == 0
                    and first[0] % downsample == 0
                ):
                    runs[-1].append(i)
                    continue
            runs.append([i])
        return runs

    def __getitem__(self, indices: Any) -> dict[str, Any]:  # type: ignore[override]
        idx = [int(i) for i in np.atleast_1d(np.asarray(indices, dtype=np.int64))]
        tiles, ok = self.read_tiles(self.coords[idx])
        return {"tiles": torch.from_numpy(tiles), "index": torch.as_tensor(idx), "ok": torch.from_numpy(ok)}

    def read_tiles(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tiles at level-0 ``coords`` (in order): uint8 ``[n, tile_px, tile_px, 3]``, and which were read
        (all, unless ``skip_unreadable`` left a corrupt one white)."""
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        px = self.source.tile_px
        tiles = np.empty((len(coords), px, px, 3), dtype=np.uint8)
        ok = np.ones(len(coords), dtype=bool)
        for run in self._runs(coords):
            if len(run) > 1:
                try:
                    self._read_row(coords, run, tiles[run[0] : run[-1] + 1])
                    continue
                except SlideReadError:  # find the broken tile: read the row tile by tile
                    self._handle().reopen()
            for i in run:
                self._read_one(coords[i], i, tiles, ok)
        return tiles, ok

    def _read_one(self, xy: np.ndarray, j: int, tiles: np.ndarray, ok: np.ndarray) -> None:
        try:
            tiles[j] = self._read_at(xy)
        except SlideReadError:
            if not self.source.skip_unreadable:
                raise
            logger.warning("skipping unreadable tile at level-0 %s of %s", tuple(int(v) for v in xy), self.source.path)
            ok[j] = False
            tiles[j] = 255
            # OpenSlide fails every later read after a decode error: a fresh handle recovers.
            self._handle().reopen()

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


#: batches read ahead of the model (per reading thread or tile-reading process)
PREFETCH_BATCHES = 3


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ThreadBatches:
    """A slide's batches read by a background thread, up to ``depth`` batches ahead of the model.

    On a CPU-only machine a thread beats loader processes: no process start per slide, no copies
    through shared memory, and decoding (OpenSlide, tiffslide, OpenCV) releases the GIL. Errors while
    reading are raised where the batches are consumed; :meth:`close` stops the thread and closes the
    slide handle it opened.
    """

    _END = object()

    def __init__(self, dataset: TileBatches, batches: list[list[int]], depth: int = PREFETCH_BATCHES, pin: bool = False) -> None:
        self.dataset = dataset
        self._batches = batches
        self._pin = pin
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._read, name=f"wsi-mil-read-{Path(dataset.source.path).stem}", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for idx in self._batches:
                if self._stop.is_set():
                    return
                item = self.dataset[idx]
                if self._pin:
                    item["tiles"] = item["tiles"].pin_memory()
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # raised again in the consuming thread
            self._put(_Failure(exc))
        finally:
            self.dataset.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()


#: tiles per read: rows of touching tiles are read in one call, so reads batch more than the model
READ_BATCH_TILES = 32


def read_batch_size(batch_size: int | None) -> int:
    """Tiles per read for the encoder's ``batch_size``: at least :data:`READ_BATCH_TILES`."""
    return max(int(batch_size or 1), READ_BATCH_TILES)


def read_batches(n: int, batch_size: int) -> list[list[int]]:
    """The indices of ``n`` tiles in reads of ``batch_size``, in order."""
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def model_batches(n: int, batch_size: int) -> list[int]:
    """Forward passes for ``n`` tiles read together: full batches of ``batch_size``, then the short rest
    split into powers of two (e.g. 8 -> [8]; 19 at batch 16 -> 16, 2, 1).

    Each new input shape makes ``torch.compile`` recompile and oneDNN/cuDNN build (and keep) kernels;
    with one tail size per slide a long run would keep meeting new shapes. Powers of two bound the
    shapes to log2(batch size) + 1 over the whole run.
    """
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + [1 << b for b in range(rest.bit_length() - 1, -1, -1) if rest & (1 << b)]


def series_batches(dataset: TileBatches, batch_size: int) -> Iterator[dict[str, Any]]:
    """The batches of ``dataset``, ``batch_size`` tiles each, read in this thread when asked for."""
    for idx in read_batches(len(dataset), batch_size):
        yield dataset[idx]
