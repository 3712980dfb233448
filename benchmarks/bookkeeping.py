"""Benchmark: per-slide bookkeeping (record + manifest) with 10 vs 10,000 records already in the folder.

What a batch command pays for bookkeeping (:mod:`wsi_mil.store.records`):

* per slide: ``RecordStore.write`` (the record, written atomically, and its change marker);
* per run: ``RecordStore.write_manifest`` (merge the slides written since the last update into
  ``manifest.csv``), here after a run of ``--run-slides`` slides;
* for comparison, the full rebuild that every run ended with before (``rebuild_manifest``: reads every
  record file).

Two folders are prepared (not timed): 10 and 10,000 records with a merged manifest. Then, in rounds
that alternate between the folders (so that load from other processes hits both alike), a run of
``--run-slides`` slides is written (each write timed; new slides in the first round, the same slides
again later, so each folder keeps its size) and the manifest is updated (timed). Figures are medians;
ratios are 10,000 / 10.

    .venv/bin/python benchmarks/bookkeeping.py [--rounds 10] [--run-slides 20] [--bags 50] [--dir /scratch] [--out FILE]

Also ``train``'s bag inspection (``scan_bags``) over ``--bags`` small bags written by ``BagWriter``: trusting
the writer's ``values_checked="finite"`` (the default) vs ``--recheck`` (a NaN/Inf scan of every value). The
bags are fresh in the page cache, so the scan's cost here is decoding and checking, not disk reads.

Target (wsi-mil issue 19): per-slide cost ratio <= 1.5. ``--dir`` puts the folders on the storage to
measure (a network file system, say); the default is the system's temp folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_mil.store.records import RecordStore  # noqa: E402

COLUMNS = (
    "slide_id", "path", "status", "error_class", "error", "n_tiles", "n_skipped_tiles", "slide_mpp", "mpp",
    "footprint_px", "seconds", "tiles_per_s", "read_s", "model_s",
)
SIZES = (10, 10_000)
TARGET_RATIO = 1.5


def _record(slide_id: str, i: int) -> dict[str, Any]:
    """A record shaped like one of ``extract``'s."""
    return {
        "slide_id": slide_id, "path": f"/cohort/slides/{slide_id}.svs", "source_bytes": 1_500_000_000 + i,
        "source_mtime_ns": 1_700_000_000_000_000_000 + i, "config_hash": "3f9a1c0d2b7e4f58",
        "status": "failed" if i % 50 == 0 else "done",
        "error_class": "SlideReadError" if i % 50 == 0 else None,
        "error": "corrupt JPEG tile at level-0 (40960, 12288): re-scan the slide" if i % 50 == 0 else None,
        "n_tiles": 5000 + i % 3000, "n_skipped_tiles": 0, "slide_mpp": 0.2527, "mpp": 0.5, "footprint_px": 507,
        "seconds": 61.234 + i % 17, "tiles_per_s": 81.7, "read_s": 12.5, "model_s": 47.9,
    }


def _prepare(root: Path, n: int) -> RecordStore:
    """``n`` records (written directly: setup, not timed) and the manifest built from them."""
    out = root / f"records_{n}"
    (out / ".records").mkdir(parents=True)
    for i in range(n):
        sid = f"TCGA-{i:06d}"
        (out / ".records" / f"{sid}.json").write_text(json.dumps(_record(sid, i), indent=2) + "\n", encoding="utf-8")
    store = RecordStore(out, COLUMNS)
    store.rebuild_manifest()
    return store


def _bag_inspection(root: Path, n_bags: int, tiles: int, dim: int, repeats: int) -> list[str]:
    """Median seconds of ``scan_bags`` over ``n_bags`` bags, trusting their writer vs rechecking every value."""
    import numpy as np

    from wsi_mil.cohort.datasets import discover_features, scan_bags
    from wsi_mil.store.bag_file import BagWriter

    rng = np.random.default_rng(0)
    folder = root / "features"
    for i in range(n_bags):
        with BagWriter(folder / f"bag{i:03d}.h5", dim, {"slide_id": f"bag{i:03d}", "encoder_name": "bench"}) as w:
            w.append(rng.standard_normal((tiles, dim), dtype=np.float32), np.zeros((tiles, 2), np.int64))
    sources = list(discover_features(folder).sources.values())
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for recheck in (False, True):
            t = time.perf_counter()
            scan = scan_bags(sources, progress=False, recheck=recheck)
            seconds[recheck].append(time.perf_counter() - t)
            assert len(scan.infos) == n_bags and len(scan.trusted) == (0 if recheck else n_bags)
    trusted, rechecked = (1000.0 * statistics.median(seconds[k]) for k in (False, True))
    mb = n_bags * tiles * dim * 4 / 1e6
    return [
        f"train's bag inspection, {n_bags} bags of {tiles} x {dim} float32 ({mb:.0f} MB), median of {repeats}:",
        f"  trusting the writer (default) {trusted:.1f} ms, --recheck {rechecked:.1f} ms "
        f"({rechecked / trusted:.1f}x; {trusted / n_bags:.2f} vs {rechecked / n_bags:.2f} ms per bag)",
    ]


def _ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="runs per folder (default 10)")
    parser.add_argument("--run-slides", type=int, default=20, help="slides per run (default 20: 10,000 slides in 500 tasks)")
    parser.add_argument("--rebuilds", type=int, default=3, help="timed full rebuilds per folder (default 3)")
    parser.add_argument("--bags", type=int, default=50, help="bags for the inspection timing (default 50; 0: skip)")
    parser.add_argument("--bag-tiles", type=int, default=2000, help="tiles per bag (default 2000)")
    parser.add_argument("--bag-dim", type=int, default=1024, help="features per tile (default 1024)")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the folders (default: temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wsi-mil-bookkeeping-", dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        stores = {n: _prepare(root, n) for n in SIZES}
        setup_s = time.perf_counter() - t0
        per_slide: dict[int, list[float]] = {n: [] for n in SIZES}
        per_run: dict[int, list[float]] = {n: [] for n in SIZES}
        rebuild: dict[int, list[float]] = {n: [] for n in SIZES}
        for r in range(args.rounds):
            for n, store in stores.items():
                for k in range(args.run_slides):  # new slides in the first run, rewritten (a rerun) later
                    t = time.perf_counter()
                    store.write(_record(f"RUN-{k:04d}", r * args.run_slides + k))
                    per_slide[n].append(time.perf_counter() - t)
                t = time.perf_counter()
                store.write_manifest()
                per_run[n].append(time.perf_counter() - t)
        for _ in range(args.rebuilds):
            for n, store in stores.items():
                t = time.perf_counter()
                store.rebuild_manifest()
                rebuild[n].append(time.perf_counter() - t)
        rows = {n: len((store.out_dir / "manifest.csv").read_text(encoding="utf-8").splitlines()) - 1
                for n, store in stores.items()}
        bag_lines = _bag_inspection(root, args.bags, args.bag_tiles, args.bag_dim, 3) if args.bags else []

    small, large = SIZES
    slide_ratio = _ms(per_slide[large]) / _ms(per_slide[small])
    run_ratio = _ms(per_run[large]) / _ms(per_run[small])
    amortised = {n: _ms(per_slide[n]) + _ms(per_run[n]) / args.run_slides for n in SIZES}
    lines = [
        f"bookkeeping: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"folders under {args.dir or tempfile.gettempdir()}; setup {setup_s:.1f} s; manifests {rows[small]} and "
        f"{rows[large]} rows after the runs",
        f"{args.rounds} runs of {args.run_slides} slides per folder (new in the first run, rewritten later), alternating folders; medians",
        "",
        f"{'records in folder before the runs':<44}{small:>12,}{large:>12,}{'ratio':>9}",
        f"{'per slide: record + marker (ms)':<44}{_ms(per_slide[small]):>12.3f}{_ms(per_slide[large]):>12.3f}"
        f"{slide_ratio:>9.2f}",
        f"{'per run: manifest update (ms)':<44}{_ms(per_run[small]):>12.3f}{_ms(per_run[large]):>12.3f}"
        f"{run_ratio:>9.2f}",
        f"{'per slide incl. its share of the update (ms)':<44}{amortised[small]:>12.3f}{amortised[large]:>12.3f}"
        f"{amortised[large] / amortised[small]:>9.2f}",
        f"{'before: full rebuild at every run end (ms)':<44}{_ms(rebuild[small]):>12.3f}{_ms(rebuild[large]):>12.3f}"
        f"{_ms(rebuild[large]) / _ms(rebuild[small]):>9.2f}",
        "",
        f"per-slide ratio {slide_ratio:.2f} (target <= {TARGET_RATIO}): {'met' if slide_ratio <= TARGET_RATIO else 'NOT met'}; "
        f"at 10,000 records the run-end update costs {_ms(per_run[large]) / _ms(rebuild[large]):.3f} of a full rebuild",
        *([""] + bag_lines if bag_lines else []),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
