"""``wsi-mil extract``: tissue -> tiles -> a frozen encoder -> resumable HDF5 feature bags.

Per slide: open it (TIFF/SVS through tiffslide where it decodes exactly as OpenSlide does, it is
faster), find tissue and write the QC files, lay the tile grid, then read tiles at the target µm/px
in batches while the main thread runs the encoder under ``torch.inference_mode()`` and autocast, and
stream features and level-0 coords into a temp HDF5 file that is marked complete and moved into place
at the end. Tiles are read by a background thread on CPU (``workers=-1``), by loader processes that
each open their own slide handle (``workers=N``; the default on CUDA), or in series (``workers=0``).
While one slide is encoded, the next one (its lock already taken) is prepared and, with the reading
thread, its first batches are read, so slide boundaries leave the model idle as little as possible.
Nothing of a slide outlives it: readers, loader processes and handles are closed after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from wsi_mil import __version__
from wsi_mil.config import EXTRACT_HASH_FIELDS, ExtractConfig, config_hash, load_config, write_config
from wsi_mil.errors import ConfigError, OutputConflictError, SlideReadError
from wsi_mil.runs.slide_loop import BatchSummary, run_batch
from wsi_mil.runs.tiles import SlideOpener, prepare_slide
from wsi_mil.slide import Slide, SlideLimits, choose_reader, open_slide, reader_versions
from wsi_mil.store import atomic_write_json, ensure_writable_dir, folder_lock, remove_stale_temp_files
from wsi_mil.store.bag_file import BagWriter, bag_is_complete

logger = logging.getLogger(__name__)

#: torch seed for ``--random-init`` weights (recorded in the outputs)
RANDOM_INIT_SEED = 0

EXTRACT_COLUMNS = (
    "slide_id",
    "path",
    "status",
    "error_class",
    "error",
    "n_tiles",
    "n_skipped_tiles",
    "seconds",
    "tiles_per_s",
    "read_s",
    "model_s",
    "prepare_s",
    "slide_mpp",
    "mpp",
    "footprint_px",
    "level",
    "rss_mb",
    "peak_rss_mb",
)


# --- tiles --------------------------------------------------------------------------------------------
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


@dataclass
class _Prepared:
    """A slide ready for encoding: where its tiles are, what its file will say, and maybe its reader."""

    source: TileSource
    coords: np.ndarray
    attrs: dict[str, Any]
    prepare_s: float
    stream: ThreadBatches | None = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


# --- the run --------------------------------------------------------------------------------------------
def memory_use_mb() -> dict[str, float]:
    """Resident memory now and at its peak (MB), recorded per slide: a long run must stay flat."""
    out: dict[str, float] = {}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux
    except (ImportError, OSError):
        pass
    return out


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: Encoders whose bf16 features fall below 0.999 cosine similarity to fp32 on some tiles (measured:
#: EfficientNet-Lite0 min 0.9987) and gain nothing from bf16 on CPU: ``auto`` keeps them at fp32 there.
CPU_FP32_ENCODERS = frozenset({"tf_efficientnet_lite0"})


def resolve_precision(precision: str, device: torch.device, encoder: str | None = None) -> str:
    """``auto``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16, else fp32.

    On CPU, encoders in :data:`CPU_FP32_ENCODERS` stay fp32 under ``auto``.
    """
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 autocast is slow and inexact on CPU; use --precision bf16 or fp32.")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if encoder in CPU_FP32_ENCODERS:
        return "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a container's CPU quota (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a container CPU quota (Docker ``--cpus``,
    Kubernetes limits). Threads beyond the quota are throttled mid-operation, which costs far more
    than they bring."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def resolve_threads(threads: int | None = None) -> int:
    """torch CPU threads: ``threads``, else ``OMP_NUM_THREADS`` when set, else the CPUs we may use."""
    if threads is None:
        try:
            threads = int(os.environ.get("OMP_NUM_THREADS", ""))
        except ValueError:
            threads = None
    return max(1, threads if threads else available_cpus())


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (unchanged for ``None``), restoring the previous count."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_loader(workers: int, device: torch.device) -> tuple[str, int]:
    """How tiles are read: ``("series", 0)`` for ``workers=0``, ``("processes", N)`` for ``workers=N``;
    ``workers=-1`` (auto): a reading thread on CPU, up to 8 loader processes on CUDA."""
    if workers == 0:
        return "series", 0
    if workers > 0:
        return "processes", workers
    if device.type == "cuda":
        return "processes", max(1, min(8, available_cpus() - 1))
    return "thread", 1


def _versions() -> dict[str, str]:
    import h5py
    import timm

    out = {
        "wsi_mil": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }
    out.update(reader_versions())
    return out


def _check_folder_config(
    out_dir: Path, cfg: ExtractConfig, chash: str, overwrite: bool, *, write: bool
) -> None:
    """Refuse a folder made with another config unless ``overwrite`` (R25); with ``write``, record ours.

    Called twice: first only to check (a refusal comes before the encoder is loaded), then, once the
    encoder has loaded (a mistyped ``--weights`` path must not leave its config behind), to check again
    and write, under the folder's config lock.
    """
    with folder_lock(out_dir, "config"):
        existing = out_dir / "config.yaml"
        if existing.exists() and not overwrite:
            try:
                old = load_config(ExtractConfig, existing)
                old_hash = config_hash(old, EXTRACT_HASH_FIELDS)
            except ConfigError as exc:
                raise OutputConflictError(
                    f"{out_dir} holds a config.yaml that is not a valid extract config ({exc}). "
                    "Use another --out folder, or --overwrite to replace its outputs."
                ) from exc
            if old_hash != chash:
                old_d, new_d = old.model_dump(), cfg.model_dump()
                diffs = [
                    f"{k}: {old_d[k]!r} -> {new_d[k]!r}" for k in EXTRACT_HASH_FIELDS if old_d[k] != new_d[k]
                ]
                raise OutputConflictError(
                    f"{out_dir} was made with another configuration ({'; '.join(diffs)}). Use another --out "
                    "folder, or rerun with --overwrite to recompute every slide with the new settings."
                )
        if write:
            write_config(cfg, existing)


def run_extract(
    slides: Sequence[Path],
    out_dir: Path,
    cfg: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    progress: bool | None = None,
    threads: int | None = None,
) -> BatchSummary:
    """Extract features for ``slides`` into ``out_dir`` (see the module docstring and the README).

    ``threads``: torch CPU threads while running (restored afterwards); default ``OMP_NUM_THREADS``
    when set, else the CPUs this process may use.
    """
    from wsi_mil.features.encoders import autocast_context, create_encoder, encoder_identity, resolve_device
    from wsi_mil.runs.slide_loop import check_unique_ids, select_shard

    cfg = cfg or ExtractConfig()
    slides = [Path(p) for p in slides]
    check_unique_ids(slides)  # R21: two inputs would write one output
    out_dir = ensure_writable_dir(out_dir)  # R15: before any slide is opened
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, cfg.encoder)
    resolved = cfg.model_copy(
        update={"precision": precision, "batch_size": resolve_batch_size(cfg.batch_size, device)}
    )
    cfg = resolved  # config.yaml records what ran
    chash = config_hash(resolved, EXTRACT_HASH_FIELDS)
    _check_folder_config(out_dir, resolved, chash, overwrite, write=False)
    opener = SlideOpener(cfg.slide)  # reads the mpp override CSV now: a bad table fails before any slide

    with torch.random.fork_rng(devices=[]):
        # Random weights are a fixed function of the config, so resumed runs, shards and concurrent
        # processes on one folder all compute with the same ones.
        torch.manual_seed(RANDOM_INIT_SEED)
        encoder = create_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init, device=device)
    if cfg.channels_last:
        encoder.set_channels_last(True)
    model: Any = encoder.model
    if cfg.compile:
        model = torch.compile(model)
    identity = encoder_identity(encoder)
    if cfg.random_init:
        identity["random_init_seed"] = RANDOM_INIT_SEED
    _check_folder_config(out_dir, resolved, chash, overwrite, write=True)
    loader_mode, n_workers = resolve_loader(cfg.workers, device)
    logger.info(
        "encoder %s (%d-d, weights %s) on %s, %s, batch %s, tiles read %s",
        encoder.name,
        encoder.feature_dim,
        identity["weights_source"],
        device,
        precision,
        cfg.batch_size,
        {"series": "in series", "thread": "by a thread", "processes": f"by {n_workers} processes"}[loader_mode],
    )
    index, count = shard
    selected = select_shard(list(slides), index, count) if count > 1 else list(slides)
    features_dir = out_dir / "features"
    features_dir.mkdir(exist_ok=True)

    def is_done(path: Path) -> bool:
        # The config hash covers the weights' path; the checksum catches a file changed in place.
        return not overwrite and bag_is_complete(
            features_dir / f"{path.stem}.h5", chash, require={"weights_sha256": identity["weights_sha256"]}
        )

    def prepare(path: Path) -> _Prepared:
        """Open the slide, find tissue (QC files), lay the grid, choose the tile reader; in thread mode start reading."""
        t_start = time.perf_counter()
        # We hold this slide's lock: temp files of it are left by a killed process (R10).
        remove_stale_temp_files(features_dir / f"{path.stem}.h5")
        with contextlib.ExitStack() as stack:
            opened = stack.enter_context(opener.open(path))
            slide = choose_reader(opened, cfg.slide.backend)
            if slide is not opened:
                stack.callback(slide.close)
            prepared = prepare_slide(
                slide, cfg.tissue, cfg.tiling, out_dir / "tissue", cfg.thumbnail_px,
                skip_unreadable=cfg.skip_unreadable_tiles,
            )  # fmt: skip
            grid = prepared.grid
            source = TileSource(
                path=str(path),
                backend=slide.backend_name,
                slide_mpp=slide.mpp,
                max_slide_px=cfg.slide.max_slide_px,
                max_read_px=cfg.slide.max_read_px,
                mpp=grid.mpp,
                tile_px=grid.tile_px,
                skip_unreadable=cfg.skip_unreadable_tiles,
            )
            attrs: dict[str, Any] = {
                "slide_id": slide.slide_id,
                "source_file": path.name,
                "source_bytes": path.stat().st_size,
                "slide_mpp": slide.mpp,
                "mpp_source": slide.mpp_source,
                "mpp": grid.mpp,
                "tile_mpp": grid.mpp,
                "tile_px": grid.tile_px,
                "footprint_px": grid.footprint_px,
                "footprint_px_exact": grid.footprint_px_exact,
                "stride_px": grid.stride_px,
                "level": slide.best_level_for_mpp(grid.mpp),
                "slide_width": slide.dimensions[0],
                "slide_height": slide.dimensions[1],
                "reader_backend": slide.backend_name,
                "reader_version": slide.backend_version,
                "wsi_mil_version": __version__,
                "config_hash": chash,
                "precision": precision,
                "coords_space": "level-0 pixels, top-left (x, y)",
                # corrupt file tiles the tissue/QC reads met and read as glass (skip_unreadable_tiles)
                "n_skipped_segmentation_tiles": len(prepared.skipped_tiles),
                **identity,
            }
        # The slide handle used here is closed: tiles are read through handles of their own.
        ready = _Prepared(source=source, coords=grid.coords, attrs=attrs, prepare_s=time.perf_counter() - t_start)
        if loader_mode == "thread":
            ready.stream = ThreadBatches(
                TileBatches(source, grid.coords), _batches(len(grid.coords), _read_batch(cfg)), depth=PREFETCH_BATCHES,
                pin=device.type == "cuda",
            )
        return ready

    # Work for the next slide (its lock already held) overlaps the current one: opening, tissue, QC
    # and, with a reading thread, its first batches of tiles.
    ahead: dict[str, Future[_Prepared]] = {}
    executor = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-mil-prepare")
        if loader_mode != "series" and len(selected) > 1
        else None
    )

    def prefetch(path: Path) -> None:
        if executor is not None:
            ahead[path.stem] = executor.submit(prepare, path)

    def discard(path: Path) -> None:
        future = ahead.pop(path.stem, None)
        if future is not None and not future.cancel():
            with contextlib.suppress(Exception):
                future.result().close()

    def process(path: Path) -> dict[str, Any]:
        t_start = time.perf_counter()
        future = ahead.pop(path.stem, None)
        if future is None:
            ready = prepare(path)
        else:
            try:
                ready = future.result()
            except KeyboardInterrupt:  # interrupted while waiting: close what the thread still makes
                future.add_done_callback(_close_prepared)
                raise
        try:
            stats = _encode_slide(
                ready, features_dir / f"{path.stem}.h5", encoder, model, precision, device, cfg, loader_mode,
                n_workers, progress, autocast_context,
            )  # fmt: skip
        finally:
            ready.close()
        seconds = time.perf_counter() - t_start
        attrs = ready.attrs
        return {
            "status": "done",
            "n_tiles": stats["n_tiles"],
            "n_skipped_tiles": stats["n_skipped"],
            "seconds": round(seconds, 3),
            "tiles_per_s": round(stats["n_tiles"] / max(seconds, 1e-9), 2),
            "read_s": round(stats["read_s"], 3),
            "model_s": round(stats["model_s"], 3),
            "prepare_s": round(ready.prepare_s, 3),
            "slide_mpp": attrs["slide_mpp"],
            "mpp": attrs["mpp"],
            "footprint_px": attrs["footprint_px"],
            "level": attrs["level"],
            **memory_use_mb(),
        }

    # Start-up, like loading the model: the tissue stage's outline tracer pulls in scikit-image/SciPy
    # (about a second); imported here it does not hold up the first slide.
    import skimage.measure  # noqa: F401

    t0 = time.perf_counter()
    n_threads = resolve_threads(threads) if device.type == "cpu" else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        stack.enter_context(torch_threads(n_threads))
        if executor is not None:
            stack.callback(_shutdown, executor, ahead)
        summary = run_batch(
            selected,
            out_dir,
            process,
            EXTRACT_COLUMNS,
            is_done=is_done,
            progress=progress,
            desc="slides",
            config_hash=chash,
            redo=overwrite,
            prefetch=prefetch if executor is not None else None,
            discard=discard,
        )
    totals: dict[str, Any] = {
        "slides": len(selected),
        "by_status": dict(summary.counts),
        "tiles": int(sum(int(r.get("n_tiles") or 0) for r in summary.records if r.get("status") == "done")),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    totals["tiles_per_s"] = round(float(totals["tiles"]) / max(float(totals["seconds"]), 1e-9), 2)
    run_name = "run.json" if count == 1 else f"run.shard-{index}-of-{count}.json"
    try:
        atomic_write_json(
            out_dir / run_name,
            {
                "command": "extract",
                "versions": _versions(),
                "device": _device_description(device, n_threads or torch.get_num_threads()),
                "precision": precision,
                "loader": loader_mode,
                "loader_workers": n_workers,
                "torch_threads": n_threads or torch.get_num_threads(),
                "config_hash": chash,
                "encoder": identity,
                "shard": [index, count],
                "interrupted": summary.interrupted,
                "totals": totals,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    except OSError as exc:
        logger.error("could not write %s: %s", run_name, exc)
    return summary


def _device_description(device: torch.device, n_threads: int) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {n_threads} threads)"


def _close_prepared(future: Future[_Prepared]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _shutdown(executor: ThreadPoolExecutor, ahead: dict[str, Future[_Prepared]]) -> None:
    """Stop preparing slides ahead and close whatever was prepared but not used."""
    executor.shutdown(wait=True, cancel_futures=True)
    for future in ahead.values():
        _close_prepared(future)
    ahead.clear()


def _loader_context() -> Any:
    """The ``forkserver`` context for loader processes, its server preloading this module (torch and
    the slide readers): each worker is then forked from a clean, single-threaded process that has
    imported them once, instead of importing them again for every slide (seconds per worker)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once the server runs; it preloaded already
    return ctx


#: tiles per read: rows of touching tiles are read in one call, so reads batch more than the model
READ_BATCH_TILES = 32
#: ``batch_size: null``: tiles per forward pass by device. On the 2-CPU machines measured (AMD EPYC,
#: avx512_bf16) batch 8 ran 20-60% more tiles/s than 32 or 64 for ResNet-50-trunc (fp32 and bf16) and
#: EfficientNet-Lite0: activations of a small batch stay in cache (benchmarks/encoder_speed.py).
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 128


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """The configured batch size, or the device's default for ``None``."""
    if batch_size is not None:
        return int(batch_size)
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def _read_batch(cfg: ExtractConfig) -> int:
    return max(int(cfg.batch_size or 1), READ_BATCH_TILES)


def _model_batches(n: int, batch_size: int) -> list[int]:
    """Forward passes for ``n`` tiles read together: full batches of ``batch_size``, then the short rest
    split into powers of two (e.g. 8 -> [8]; 19 at batch 16 -> 16, 2, 1).

    Each new input shape makes ``torch.compile`` recompile and oneDNN/cuDNN build (and keep) kernels;
    with one tail size per slide a long run would keep meeting new shapes. Powers of two bound the
    shapes to log2(batch size) + 1 over the whole run.
    """
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + [1 << b for b in range(rest.bit_length() - 1, -1, -1) if rest & (1 << b)]


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def _encode_slide(
    ready: _Prepared,
    dest: Path,
    encoder: Any,
    model: Any,
    precision: str,
    device: torch.device,
    cfg: ExtractConfig,
    loader_mode: str,
    n_workers: int,
    progress: bool | None,
    autocast_context: Any,
) -> dict[str, Any]:
    from wsi_mil.progress import progress_bar

    coords = ready.coords
    loader: Any
    dataset: TileBatches | None = None
    if ready.stream is not None:
        loader = ready.stream
    elif loader_mode == "processes":
        dataset = TileBatches(ready.source, coords)
        sampler = BatchSampler(SequentialSampler(range(len(coords))), batch_size=_read_batch(cfg), drop_last=False)
        loader = DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=n_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=PREFETCH_BATCHES,
            persistent_workers=False,
            # Never fork a process that runs torch threads (and maybe a reading thread): a forked
            # child can inherit a held lock and hang. forkserver starts workers from a clean process.
            multiprocessing_context=_loader_context(),
        )
    else:
        dataset = TileBatches(ready.source, coords)
        loader = (dataset[idx] for idx in _batches(len(coords), _read_batch(cfg)))
    read_s = model_s = 0.0
    n_skipped = 0
    bar = progress_bar(total=len(coords), desc=Path(ready.source.path).name, unit="tile", enable=progress)
    try:
        with BagWriter(
            dest, encoder.feature_dim, ready.attrs, feature_dtype=cfg.feature_dtype, expected_rows=len(coords)
        ) as writer:
            t_wait = time.perf_counter()
            for batch in loader:
                t_got = time.perf_counter()
                read_s += t_got - t_wait
                ok = batch["ok"].numpy()
                tiles = batch["tiles"]
                parts = []
                with torch.inference_mode(), autocast_context(device, precision):
                    start = 0
                    for size in _model_batches(len(tiles), int(cfg.batch_size or 1)):
                        x = encoder.transform(tiles[start : start + size], device=device)
                        parts.append(model(x).float())
                        start += size
                feats_np = torch.cat(parts).cpu().numpy()  # synchronises: honest model time
                t_done = time.perf_counter()
                model_s += t_done - t_got
                index = batch["index"].numpy()
                if not ok.all():
                    n_skipped += int((~ok).sum())
                writer.append(feats_np[ok], coords[index[ok]])
                bar.update(len(index))
                t_wait = time.perf_counter()
            writer.attrs["n_skipped_tiles"] = n_skipped
    finally:
        bar.close()
        if dataset is not None:
            dataset.close()
        del loader
    return {
        "n_tiles": int(len(coords) - n_skipped),
        "n_skipped": n_skipped,
        "read_s": read_s,
        "model_s": model_s,
    }


class _sigterm_as_interrupt:
    """Treat SIGTERM (docker stop, Slurm pre-emption) like Ctrl-C so temp files are cleaned up.

    Also ignores SIGXFSZ so that a file-size limit gives an error we can report instead of killing
    the process.
    """

    def __enter__(self) -> None:
        self._old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def describe_output(out_dir: Path) -> str:
    """One line per output kind, for the CLI."""
    run = out_dir / "run.json"
    totals = json.loads(run.read_text())["totals"] if run.exists() else {}
    return f"features: {out_dir / 'features'}; manifest: {out_dir / 'manifest.csv'}; totals: {totals}"
