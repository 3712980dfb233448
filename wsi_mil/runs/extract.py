"""``wsi-mil extract``: tissue -> tiles -> a frozen encoder -> resumable HDF5 feature bags.

Per slide: open it (TIFF/SVS through tiffslide where it decodes exactly as OpenSlide does, it is
faster), find tissue and write the QC files, lay the tile grid, then read tiles at the target µm/px
in batches while the main thread runs the encoder under ``torch.inference_mode()`` and autocast, and
stream features and level-0 coords into a temp HDF5 file that is marked complete and moved into place
at the end. Tiles are read by a background thread on CPU (``workers=-1``), by tile-reading processes
started once for the whole run that move from slide to slide (``workers=N``, the default on CUDA:
:mod:`wsi_mil.features.reader_pool`), or in series (``workers=0``). While one slide is encoded, the next
one (its lock already taken) is prepared and its first batches are read (by the reading thread, or by the
processes as soon as they are done with the current slide), so slide boundaries leave the model idle as
little as possible; each slide's record says for how long (``gap_s``). Nothing of a slide outlives it:
its reader and handles are closed after it, and the reading processes are stopped at the end of the run.

The tile stream is :mod:`wsi_mil.features.stream`, the device, precision and thread policy
:mod:`wsi_mil.features.runtime`. This is one module, over 400 lines, because a slide's preparation, its
encoding and the look-ahead to the next slide all work from the settings :func:`run_extract` resolves
once (config, encoder, device, precision, loader, output folder); apart, each would take them all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil import __version__
from wsi_mil.config import (
    ExtractConfig,
    TilingConfig,
    extract_config_hash,
    extract_hash_fields,
    load_config,
    write_config,
)
from wsi_mil.errors import ConfigError, OutputConflictError
from wsi_mil.features.reader_pool import ReaderPool, SlideBatches
from wsi_mil.features.runtime import (
    Precision,
    autocast_context,
    describe_device,
    memory_use_mb,
    resolve_batch_size,
    resolve_device,
    resolve_loader,
    resolve_precision,
    resolve_threads,
    torch_threads,
)
from wsi_mil.features.stream import (
    ThreadBatches,
    TileBatches,
    TileSource,
    model_batches,
    read_batch_size,
    read_batches,
    series_batches,
)
from wsi_mil.features.timm_import import import_timm
from wsi_mil.runs.prepare import SlideOpener, prepare_slide
from wsi_mil.runs.slide_loop import BatchSummary, run_batch, sigterm_as_interrupt
from wsi_mil.slide import choose_reader, reader_versions
from wsi_mil.store import atomic_write_json, ensure_writable_dir, folder_lock
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
    "gap_s",
    "slide_mpp",
    "mpp",
    "footprint_px",
    "level",
    "rss_mb",
    "peak_rss_mb",
)


@dataclass
class _Prepared:
    """A slide ready for encoding: where its tiles are, what its file will say, and maybe its reader."""

    source: TileSource
    coords: np.ndarray
    attrs: dict[str, Any]
    prepare_s: float
    stream: ThreadBatches | SlideBatches | None = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


@dataclass
class _ModelClock:
    """When the model last finished a batch (``perf_counter``), and the idle gaps before each slide's first."""

    free_at: float | None = None
    gaps_s: list[float] = field(default_factory=list)


# --- the run --------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import h5py
    timm = import_timm()

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
    out_dir: Path, cfg: ExtractConfig, chash: str, overwrite: bool, *, write: bool, locking: bool = True
) -> None:
    """Refuse a folder made with another config unless ``overwrite`` (R25); with ``write``, record ours.

    Called twice: first only to check (a refusal comes before the encoder is loaded), then, once the
    encoder has loaded (a mistyped ``--weights`` path must not leave its config behind), to check again
    and write, under the folder's config lock.
    """
    with folder_lock(out_dir, "config", enabled=locking):
        existing = out_dir / "config.yaml"
        if existing.exists() and not overwrite:
            try:
                old = load_config(ExtractConfig, existing)
                old_hash = extract_config_hash(old)
            except ConfigError as exc:
                raise OutputConflictError(
                    f"{out_dir} holds a config.yaml that is not a valid extract config ({exc}). "
                    "Use another --out folder, or --overwrite to replace its outputs."
                ) from exc
            if old_hash != chash:
                old_d, new_d = old.model_dump(), cfg.model_dump()
                keys = dict.fromkeys(extract_hash_fields(old) + extract_hash_fields(cfg))
                diffs = [f"{k}: {old_d[k]!r} -> {new_d[k]!r}" for k in keys if old_d[k] != new_d[k]]
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
    claims: bool = True,
    process_device: str | None = None,
    process_workers: int | None = None,
    part: tuple[int, int] = (0, 1),
    on_record: Callable[[dict[str, Any]], None] | None = None,
    write_manifest: bool = True,
) -> BatchSummary:
    """Extract features for ``slides`` into ``out_dir`` (see the module docstring and the README).

    ``threads``: torch CPU threads while running (restored afterwards); default ``OMP_NUM_THREADS``
    when set, else the CPUs this process may use. ``claims=False`` (``--no-claims``): no slide claims;
    the processes sharing ``out_dir`` must be given disjoint shards. One process of ``extract --devices``
    (:mod:`wsi_mil.runs.devices` sets the rest) runs on ``process_device`` with ``process_workers`` loader
    workers over part ``part = (k, M)`` of its shard; both override the config's without changing
    ``config.yaml``.
    """
    from wsi_mil.features.encoders import create_encoder, encoder_identity
    from wsi_mil.features.tile_settings import resolve_tile_settings
    from wsi_mil.runs.slide_loop import check_unique_ids, run_file_name, select_shard

    cfg = cfg or ExtractConfig()
    if cfg.devices is not None and process_device is None:
        raise ConfigError(
            f"devices {cfg.devices!r} asks for one process per device: run it with wsi_mil.runs.devices."
            "extract_on_devices (as `wsi-mil extract` and the pipeline do), not run_extract."
        )
    if not claims:
        logger.warning(
            "--no-claims: slides are not claimed and %s is not locked; every process writing there must be given "
            "other slides (--shard I/N, a Slurm array, a Kubernetes indexed job or --devices), or a slide is "
            "computed twice and a process may remove the other's temp files.",
            out_dir,
        )
    slides = [Path(p) for p in slides]
    check_unique_ids(slides)  # R21: two inputs would write one output
    out_dir = ensure_writable_dir(out_dir)  # R15: before any slide is opened
    device = resolve_device(cfg.device if process_device is None else process_device)
    precision = resolve_precision(cfg.precision, device, cfg.encoder)
    tile = resolve_tile_settings(cfg.encoder, cfg.tiling.mpp, cfg.tiling.tile_px)  # the preset's unless overridden
    for warning in tile.warnings:
        logger.warning("%s", warning)
    resolved = cfg.model_copy(
        update={
            "precision": precision,
            "batch_size": resolve_batch_size(cfg.batch_size, device),
            "tiling": cfg.tiling.model_copy(update={"mpp": tile.mpp, "tile_px": tile.tile_px}),
        }
    )
    cfg = resolved  # config.yaml records what ran
    tiling = TilingConfig(**cfg.tiling.model_dump())
    chash = extract_config_hash(resolved)
    _check_folder_config(out_dir, resolved, chash, overwrite, write=False, locking=claims)
    opener = SlideOpener(cfg.slide)  # reads the mpp override CSV now: a bad table fails before any slide

    with torch.random.fork_rng(devices=[]):
        # Random weights are a fixed function of the config, so resumed runs, shards and concurrent
        # processes on one folder all compute with the same ones.
        torch.manual_seed(RANDOM_INIT_SEED)
        encoder = create_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init, device=device)
    if cfg.preprocessing is not None:
        _override_preprocessing(encoder, cfg)
    if cfg.channels_last:
        encoder.set_channels_last(True)
    batch = int(cfg.batch_size or 1)
    model: Any = torch.compile(encoder.model) if cfg.compile else encoder.inference_model(precision, batch, cfg.cpu_fusion)
    identity = encoder_identity(encoder)
    if cfg.random_init:
        identity["random_init_seed"] = RANDOM_INIT_SEED
    _check_folder_config(out_dir, resolved, chash, overwrite, write=True, locking=claims)
    loader_mode, n_workers = resolve_loader(cfg.workers if process_workers is None else process_workers, device)
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
    selected = select_shard(slides, index, count, part)
    features_dir = out_dir / "features"
    features_dir.mkdir(exist_ok=True)

    def is_done(path: Path) -> bool:
        # The config hash covers the weights' path; the checksum catches a file changed in place.
        return not overwrite and bag_is_complete(
            features_dir / f"{path.stem}.h5", chash, require={"weights_sha256": identity["weights_sha256"]}
        )

    pools: list[ReaderPool] = []  # the run's tile-reading processes, started with the first slide prepared
    pool_lock = threading.Lock()

    def reader_pool() -> ReaderPool:
        with pool_lock:
            if not pools:
                pools.append(ReaderPool(n_workers, pin=device.type == "cuda"))
            return pools[0]

    def prepare(path: Path) -> _Prepared:
        """Open the slide, find tissue (QC files), lay the grid, choose the tile reader, queue its reads (not in series)."""
        t_start = time.perf_counter()
        if loader_mode == "processes":
            reader_pool()  # the processes start while this slide is prepared
        with contextlib.ExitStack() as stack:
            opened = stack.enter_context(opener.open(path))
            slide = choose_reader(opened, cfg.slide.backend)
            if slide is not opened:
                stack.callback(slide.close)
            prepared = prepare_slide(
                slide, cfg.tissue, tiling, out_dir / "tissue", cfg.thumbnail_px,
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
                verified_stamp=slide.file_stamp,  # checked just now: readers need not scan the file again
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
                "slide_fingerprint": slide.fingerprint().to_json(),
                # corrupt file tiles the tissue/QC reads met and read as glass (skip_unreadable_tiles)
                "n_skipped_segmentation_tiles": len(prepared.skipped_tiles),
                **identity,
            }
        # The slide handle used here is closed: tiles are read through handles of their own.
        ready = _Prepared(source=source, coords=grid.coords, attrs=attrs, prepare_s=time.perf_counter() - t_start)
        batches = read_batches(len(grid.coords), read_batch_size(cfg.batch_size))
        if loader_mode == "thread":
            ready.stream = ThreadBatches(TileBatches(source, grid.coords), batches, pin=device.type == "cuda")
        elif loader_mode == "processes":  # queued behind the slide being encoded
            ready.stream = reader_pool().submit(source, grid.coords, batches)
        return ready

    # Work for the next slide (its lock already held) overlaps the current one: opening, tissue, QC
    # and its first batches of tiles (unless tiles are read in series).
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

    clock = _ModelClock()

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
                ready, features_dir / f"{path.stem}.h5", encoder, model, precision, device, cfg, clock, progress
            )
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
            "gap_s": None if stats["gap_s"] is None else round(stats["gap_s"], 4),
            "slide_mpp": attrs["slide_mpp"],
            "mpp": attrs["mpp"],
            "footprint_px": attrs["footprint_px"],
            "level": attrs["level"],
            **memory_use_mb(),
        }

    # Start-up, like loading the model: the tissue stage's outline tracer pulls in scikit-image/SciPy
    # (about a second); imported here it does not hold up the first slide. h5py too: the bag writer imports it
    # lazily, and an import cut by Ctrl-C or SIGTERM leaves it half-initialised (KeyError '__reduce_cython__'
    # at the next import), which would turn an interrupted run's exit 130 into 1.
    import h5py  # noqa: F401
    import skimage.measure  # noqa: F401

    t0 = time.perf_counter()
    n_threads = resolve_threads(threads) if device.type == "cpu" else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())
        stack.enter_context(torch_threads(n_threads))
        stack.callback(_close_pools, pools)  # after the look-ahead stops (callbacks run last-in first-out)
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
            on_record=on_record,
            claims=claims,
            # temp files of these left by a killed process (R10) are removed by the slide's claim holder
            outputs=lambda p: (features_dir / f"{p.stem}.h5", out_dir / "tissue" / f"{p.stem}.png",
                               out_dir / "tissue" / f"{p.stem}.geojson"),
            write_manifest=write_manifest,
        )
    totals: dict[str, Any] = {
        "slides": len(selected),
        "by_status": dict(summary.counts),
        "tiles": int(sum(int(r.get("n_tiles") or 0) for r in summary.records if r.get("status") == "done")),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    totals["tiles_per_s"] = round(float(totals["tiles"]) / max(float(totals["seconds"]), 1e-9), 2)
    if clock.gaps_s:  # the model's idle time between one slide's last batch and the next slide's first
        gaps = np.asarray(clock.gaps_s)
        totals["slide_gap_s"] = {
            "n": len(gaps), "median": round(float(np.median(gaps)), 4), "p95": round(float(np.percentile(gaps, 95)), 4),
            "max": round(float(gaps.max()), 4), "sum": round(float(gaps.sum()), 3),
        }  # fmt: skip
    run_name = run_file_name(shard, part)
    try:
        atomic_write_json(
            out_dir / run_name,
            {
                "command": "extract",
                "versions": _versions(),
                "device": describe_device(device, n_threads or torch.get_num_threads()),
                "precision": precision,
                "loader": loader_mode,
                "loader_workers": n_workers,
                "torch_threads": n_threads or torch.get_num_threads(),
                "config_hash": chash,
                "encoder": identity,
                "shard": [index, count],
                **({"part": list(part)} if part[1] > 1 else {}),
                "claims": claims,
                "interrupted": summary.interrupted,
                "totals": totals,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    except OSError as exc:
        logger.error("could not write %s: %s", run_name, exc)
    return summary


def _override_preprocessing(encoder: Any, cfg: ExtractConfig) -> None:
    """Apply ``cfg.preprocessing`` over the encoder's own (warning for each value it changes)."""
    from wsi_mil.features.presets import Preprocessing
    from wsi_mil.features.tile_settings import merge_preprocessing
    from wsi_mil.features.transforms import preset_preprocessing, preset_transform

    assert cfg.preprocessing is not None
    tf = encoder.transform
    base = encoder.preset.preprocessing if encoder.preset is not None else Preprocessing(
        tf.input_size[0], tf.resize_size[0], tf.interpolation, tf.mean, tf.std
    )
    owner = f"the {encoder.name} preset" if encoder.preset is not None else f"timm's config of {encoder.name}"
    merged, warnings = merge_preprocessing(base, cfg.preprocessing.model_dump(), owner)
    for warning in warnings:
        logger.warning("%s", warning)
    encoder.transform = preset_transform(merged)
    encoder.preprocessing = preset_preprocessing(merged)


def _close_prepared(future: Future[_Prepared]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _close_pools(pools: list[ReaderPool]) -> None:
    for pool in pools:
        pool.close()


def _shutdown(executor: ThreadPoolExecutor, ahead: dict[str, Future[_Prepared]]) -> None:
    """Stop preparing slides ahead and close whatever was prepared but not used."""
    executor.shutdown(wait=True, cancel_futures=True)
    for future in ahead.values():
        _close_prepared(future)
    ahead.clear()


def _encode_slide(
    ready: _Prepared,
    dest: Path,
    encoder: Any,
    model: Any,
    precision: Precision,
    device: torch.device,
    cfg: ExtractConfig,
    clock: _ModelClock,
    progress: bool | None,
) -> dict[str, Any]:
    """Encode a prepared slide into ``dest``; ``clock``: when the model last finished a batch, and the gaps."""
    from wsi_mil.progress import progress_bar

    coords = ready.coords
    loader: Any
    dataset: TileBatches | None = None
    if ready.stream is not None:
        loader = ready.stream
    else:
        dataset = TileBatches(ready.source, coords)
        loader = series_batches(dataset, read_batch_size(cfg.batch_size))
    read_s = model_s = 0.0
    gap_s: float | None = None  # None for the run's first slide: no boundary before it
    first = True
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
                if first and clock.free_at is not None:
                    gap_s = t_got - clock.free_at
                    clock.gaps_s.append(gap_s)
                first = False
                ok = batch["ok"].numpy()
                tiles = batch["tiles"]
                parts = []
                with torch.inference_mode(), autocast_context(device, precision):
                    start = 0
                    for size in model_batches(len(tiles), int(cfg.batch_size or 1)):
                        x = encoder.transform(tiles[start : start + size], device=device)
                        parts.append(model(x).float())
                        start += size
                feats_np = torch.cat(parts).cpu().numpy()  # synchronises: honest model time
                t_done = clock.free_at = time.perf_counter()
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
        "gap_s": gap_s,
    }


def describe_output(out_dir: Path) -> str:
    """One line per output kind, for the CLI."""
    run = out_dir / "run.json"
    totals = json.loads(run.read_text())["totals"] if run.exists() else {}
    return f"features: {out_dir / 'features'}; manifest: {out_dir / 'manifest.csv'}; totals: {totals}"
