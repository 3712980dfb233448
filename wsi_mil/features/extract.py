"""``wsi-mil extract``: tissue -> tiles -> a frozen encoder -> resumable HDF5 feature bags.

Per slide, a DataLoader whose workers each open their own slide handle reads tiles at the target
µm/px (whole batches per worker call, so inter-process traffic is one message per batch); the main
process runs the encoder under ``torch.inference_mode()`` and autocast and streams features and
level-0 coords into a temp HDF5 file that is marked complete and moved into place at the end.
Nothing of a slide outlives it: loader, workers and handles are closed before the next slide.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from .. import __version__
from ..bags import BagWriter, bag_is_complete
from ..batch import BatchSummary, run_batch
from ..config import EXTRACT_HASH_FIELDS, ExtractConfig, config_hash, load_config, write_config
from ..errors import ConfigError, OutputConflictError, SlideReadError
from ..prepare import SlideOpener, prepare_slide
from ..slide import Slide, SlideLimits, open_slide
from ..store import atomic_write_json, ensure_writable_dir, folder_lock

logger = logging.getLogger(__name__)

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
    "slide_mpp",
    "mpp",
    "footprint_px",
    "level",
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
        return self._handle().read_region_mpp((x, y), (self.source.tile_px, self.source.tile_px), self.source.mpp)

    def __getitem__(self, indices: Any) -> dict[str, Any]:  # type: ignore[override]
        idx = [int(i) for i in np.atleast_1d(np.asarray(indices, dtype=np.int64))]
        px = self.source.tile_px
        tiles = np.empty((len(idx), px, px, 3), dtype=np.uint8)
        ok = np.ones(len(idx), dtype=bool)
        for j, i in enumerate(idx):
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
        return {"tiles": torch.from_numpy(tiles), "index": torch.as_tensor(idx), "ok": torch.from_numpy(ok)}

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


# --- the run --------------------------------------------------------------------------------------------
def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16, else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 autocast is slow and inexact on CPU; use --precision bf16 or fp32.")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_workers(workers: int, device: torch.device) -> int:
    if workers >= 0:
        return workers
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, n_cpu - 1))
    return 1 if n_cpu >= 2 else 0


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


def _check_folder_config(out_dir: Path, cfg: ExtractConfig, chash: str, overwrite: bool) -> None:
    """Refuse a folder made with another config unless ``overwrite`` (R25); then record ours."""
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
                diffs = [f"{k}: {old_d[k]!r} -> {new_d[k]!r}" for k in EXTRACT_HASH_FIELDS if old_d[k] != new_d[k]]
                raise OutputConflictError(
                    f"{out_dir} was made with another configuration ({'; '.join(diffs)}). Use another --out "
                    "folder, or rerun with --overwrite to recompute every slide with the new settings."
                )
        write_config(cfg, existing)


def run_extract(
    slides: Sequence[Path],
    out_dir: Path,
    cfg: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    progress: bool | None = None,
) -> BatchSummary:
    """Extract features for ``slides`` into ``out_dir`` (see the module docstring and the README)."""
    from ..batch import select_shard
    from .encoders import autocast_context, create_encoder, encoder_identity, resolve_device

    cfg = cfg or ExtractConfig()
    out_dir = ensure_writable_dir(out_dir)  # R15: before any slide is opened
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    resolved = cfg.model_copy(update={"precision": precision})
    chash = config_hash(resolved, EXTRACT_HASH_FIELDS)
    _check_folder_config(out_dir, resolved, chash, overwrite)
    opener = SlideOpener(cfg.slide)  # reads the mpp override CSV now: a bad table fails before any slide

    encoder = create_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init, device=device)
    if cfg.channels_last:
        encoder.set_channels_last(True)
    model: Any = encoder.model
    if cfg.compile:
        model = torch.compile(model)
    identity = encoder_identity(encoder)
    n_workers = resolve_workers(cfg.workers, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    logger.info(
        "encoder %s (%d-d, weights %s) on %s, %s, batch %d, %d loader worker(s)",
        encoder.name, encoder.feature_dim, identity["weights_source"], device, precision, cfg.batch_size, n_workers,
    )
    index, count = shard
    selected = select_shard(list(slides), index, count) if count > 1 else list(slides)
    features_dir = out_dir / "features"
    features_dir.mkdir(exist_ok=True)

    def is_done(path: Path) -> bool:
        return not overwrite and bag_is_complete(features_dir / f"{path.stem}.h5", chash)

    def process(path: Path) -> dict[str, Any]:
        t_start = time.perf_counter()
        with opener.open(path) as slide:
            prepared = prepare_slide(slide, cfg.tissue, cfg.tiling, out_dir / "tissue", cfg.thumbnail_px)
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
                **identity,
            }
        # The slide handle of the main process is closed: workers open their own.
        stats = _encode_slide(
            source, grid.coords, features_dir / f"{path.stem}.h5", attrs, encoder, model, precision,
            device, cfg, n_workers, progress, autocast_context,
        )
        seconds = time.perf_counter() - t_start
        return {
            "status": "done",
            "n_tiles": stats["n_tiles"],
            "n_skipped_tiles": stats["n_skipped"],
            "seconds": round(seconds, 3),
            "tiles_per_s": round(stats["n_tiles"] / max(seconds, 1e-9), 2),
            "read_s": round(stats["read_s"], 3),
            "model_s": round(stats["model_s"], 3),
            "slide_mpp": attrs["slide_mpp"],
            "mpp": grid.mpp,
            "footprint_px": grid.footprint_px,
            "level": attrs["level"],
        }

    t0 = time.perf_counter()
    with _sigterm_as_interrupt():
        summary = run_batch(selected, out_dir, process, EXTRACT_COLUMNS, is_done=is_done, progress=progress, desc="slides")
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
                "device": _device_description(device),
                "precision": precision,
                "loader_workers": n_workers,
                "torch_threads": torch.get_num_threads(),
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


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _encode_slide(
    source: TileSource,
    coords: np.ndarray,
    dest: Path,
    attrs: dict[str, Any],
    encoder: Any,
    model: Any,
    precision: str,
    device: torch.device,
    cfg: ExtractConfig,
    n_workers: int,
    progress: bool | None,
    autocast_context: Any,
) -> dict[str, Any]:
    from ..progress import progress_bar

    dataset = TileBatches(source, coords)
    sampler = BatchSampler(SequentialSampler(range(len(coords))), batch_size=cfg.batch_size, drop_last=False)
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=n_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if n_workers > 0 else None,
        persistent_workers=False,
    )
    read_s = model_s = 0.0
    n_skipped = 0
    bar = progress_bar(total=len(coords), desc=source.path.rsplit("/", 1)[-1], unit="tile", enable=progress)
    try:
        with BagWriter(dest, encoder.feature_dim, attrs, feature_dtype=cfg.feature_dtype) as writer:
            t_wait = time.perf_counter()
            for batch in loader:
                t_got = time.perf_counter()
                read_s += t_got - t_wait
                ok = batch["ok"].numpy()
                with torch.inference_mode(), autocast_context(device, precision):
                    x = encoder.transform(batch["tiles"], device=device)
                    feats = model(x)
                feats_np = feats.float().cpu().numpy()  # synchronises: honest model time
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
        dataset.close()
        del loader
    return {"n_tiles": int(len(coords) - n_skipped), "n_skipped": n_skipped, "read_s": read_s, "model_s": model_s}


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
