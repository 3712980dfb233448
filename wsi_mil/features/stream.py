"""The tile stream: a slide's tiles read in batches for the encoder.

:class:`TileBatches` reads batches of tiles of one slide (rows of touching tiles in one read), opening
its own slide handle in each process from a picklable :class:`TileSource`. The batches are read by a
background thread (:class:`ThreadBatches`), by loader processes or in series (:func:`tile_loader`);
:func:`model_batches` splits what was read together into the encoder's forward passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from wsi_mil.errors import SlideReadError
from wsi_mil.slide import Slide, SlideLimits, open_slide

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class TileSource:
    """What a loader worker needs to open the slide itself (picklable; no handle crosses processes)."""

    path: str
    backend: str
    slide_mpp: float
    max_slide_px: int
    max_read_px: int
    mpp: float
    tile_px: int
    skip_unreadable: bool


class TileBatches(Dataset[dict[str, Any]]):
    """Batches of tiles: ``dataset[list_of_indices]`` -> uint8 ``[B, tile_px, tile_px, 3]`` and flags.

    Each process (main or loader worker) opens its own slide handle on first use: OpenSlide
    handles must not be shared across forked workers.
    """

    def __init__(self, source: TileSource, coords: np.ndarray) -> None:
        self.source = source
        self.coords = np.asarray(coords, dtype=np.int64)
        self._slide: Slide | None = None
        self._pid = -1
        self._rows: tuple[int, int, int, bool] | None | bool = False  # not yet worked out

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
            )
            self._pid = os.getpid()
        return self._slide

    def read_tile(self, index: int) -> np.ndarray:
        x, y = (int(v) for v in self.coords[index])
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

    def _read_row(self, run: list[int], out: np.ndarray) -> None:
        """Tiles ``run`` (left to right on one row, footprints touching or overlapping) into ``out``:
        one read for the row, then one resize (integral scale) or one per tile."""
        level, src, _, exact = self.row_geometry()  # type: ignore[misc]
        slide = self._handle()
        downsample = round(slide.level_downsamples[level])
        px = self.source.tile_px
        x0, y = (int(v) for v in self.coords[run[0]])
        offsets = [(int(self.coords[i][0]) - x0) // downsample for i in run]
        region = slide.read_region((x0, y), level, (offsets[-1] + src, src))
        if exact and offsets == [k * src for k in range(len(run))]:
            if src != px:
                region = cv2.resize(region, (px * len(run), px), interpolation=cv2.INTER_AREA)
            out[:] = region.reshape(px, len(run), px, 3).transpose(1, 0, 2, 3)
            return
        for j, dx in enumerate(offsets):
            crop = region[:, dx : dx + src]
            out[j] = crop if src == px else cv2.resize(crop, (px, px), interpolation=cv2.INTER_AREA)

    def _runs(self, idx: list[int]) -> list[list[int]]:
        """Consecutive indices on one row whose footprints touch or overlap (read together)."""
        geometry = self.row_geometry()
        if geometry is None:
            return [[i] for i in idx]
        downsample = round(self._handle().level_downsamples[geometry[0]])
        width = geometry[2]
        runs: list[list[int]] = []
        for i in idx:
            here = self.coords[i]
            if runs:
                last = self.coords[runs[-1][-1]]
                first = self.coords[runs[-1][0]]
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
        px = self.source.tile_px
        tiles = np.empty((len(idx), px, px, 3), dtype=np.uint8)
        ok = np.ones(len(idx), dtype=bool)
        j0 = 0
        for run in self._runs(idx):
            if len(run) > 1:
                try:
                    self._read_row(run, tiles[j0 : j0 + len(run)])
                    j0 += len(run)
                    continue
                except SlideReadError:  # find the broken tile: read the row tile by tile
                    self._handle().reopen()
            for i in run:
                self._read_one(i, j0, tiles, ok)
                j0 += 1
        return {"tiles": torch.from_numpy(tiles), "index": torch.as_tensor(idx), "ok": torch.from_numpy(ok)}

    def _read_one(self, i: int, j: int, tiles: np.ndarray, ok: np.ndarray) -> None:
        try:
            tiles[j] = self.read_tile(i)
        except SlideReadError:
            if not self.source.skip_unreadable:
                raise
            logger.warning("skipping unreadable tile at level-0 %s of %s", tuple(self.coords[i]), self.source.path)
            ok[j] = False
            tiles[j] = 255
            # OpenSlide fails every later read after a decode error: a fresh handle recovers.
            self._handle().reopen()

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


#: batches read ahead of the model (per reading thread or loader process)
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


def tile_loader(
    dataset: TileBatches, n_workers: int, batch_size: int, pin: bool
) -> Iterable[dict[str, Any]]:
    """The batches of ``dataset``, ``batch_size`` tiles each, read in this thread (``n_workers=0``) or
    by ``n_workers`` loader processes (a :class:`~torch.utils.data.DataLoader`, pinned with ``pin``)."""
    if n_workers == 0:
        return (dataset[idx] for idx in read_batches(len(dataset), batch_size))
    sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_size=batch_size, drop_last=False)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=n_workers,
        pin_memory=pin,
        prefetch_factor=PREFETCH_BATCHES,
        persistent_workers=False,
        # Never fork a process that runs torch threads (and maybe a reading thread): a forked
        # child can inherit a held lock and hang. forkserver starts workers from a clean process.
        multiprocessing_context=_loader_context(),
    )


def _loader_context() -> Any:
    """The ``forkserver`` context for loader processes, its server preloading this module (torch and
    the slide readers): each worker is then forked from a clean, single-threaded process that has
    imported them once, instead of importing them again for every slide (seconds per worker)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once the server runs; it preloaded already
    return ctx
