"""Benchmark: seconds and peak RSS of ``wsi-mil heatmap`` on one large slide (not a timed test).

Setup (cached, not timed): a generated 100,000 x 80,000 px slide at 0.25 µm/px (pyramidal TIFF, levels
1/4/16/64, JPEG), written tile by tile with a renderer, and a score file of 50,000 tiles on its tissue
(256 px at 0.25 µm/px, footprint 256 level-0 px) with smooth attention and probabilities.

The measurement runs in a fresh Python process: ``seconds`` is the wall time of
``run_heatmap([slide], scores, out)`` for that one slide - thumbnail read, canvas, tissue clip, figure,
HDF5, 2 x 8 tiles with contact sheets, GeoJSON of 50,000 tiles, records, manifest and review page -
with the imports done before the clock starts; ``peak MB`` is the process's ``VmHWM`` (imports included).

    .venv/bin/python benchmarks/heatmap.py [--repeats 3] [--out benchmarks/results/heatmap.txt]

Target on 2 CPU cores: under 5 s and under 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZE = (100_000, 80_000)
SLIDE_MPP = 0.25
N_TILES = 50_000
TILE_PX, TILE_MPP = 256, 0.25
TARGET_SECONDS, TARGET_RSS_MB = 5.0, 1536.0
COARSE_PX = 64  # level-0 px per cell of the generated tissue field


def _tissue_field(seed: int) -> np.ndarray:
    """Tissue probability on a coarse grid (1 cell = 64 level-0 px): a few large irregular pieces."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = SIZE[0] // COARSE_PX, SIZE[1] // COARSE_PX
    prob = np.zeros((h, w), np.float32)
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    for cx, cy, r in ((0.28, 0.33, 0.27), (0.7, 0.38, 0.25), (0.45, 0.72, 0.24), (0.84, 0.8, 0.15)):
        radius = np.ones_like(theta)
        for k in range(2, 8):
            radius += rng.uniform(0, 0.25 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        pts = np.stack([cx * w + r * h * radius * np.cos(theta), cy * h + r * h * radius * np.sin(theta)], 1)
        cv2.fillPoly(prob, [np.round(pts).astype(np.int32)], 1.0)
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 8)
    return cv2.GaussianBlur(prob, (0, 0), 3) * (0.8 + 2.5 * (noise - noise.mean()))


def write_slide(path: Path, seed: int = 0) -> Path:
    import cv2

    from wsi_mil.demo.pyramid import write_pyramid

    prob = _tissue_field(seed)
    rng = np.random.default_rng(seed + 1)
    texture = rng.normal(0, 9, (1024, 1024, 3)).astype(np.float32)
    glass = np.array([243, 242, 245], np.float32)
    eosin, haem = np.array([230, 150, 195], np.float32), np.array([125, 75, 165], np.float32)

    def render(downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        s = downsample / COARSE_PX
        m = np.array([[s, 0, (x + 0.5) * s - 0.5], [0, s, (y + 0.5) * s - 0.5]], np.float32)
        p = cv2.warpAffine(prob, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        t = np.clip(p[..., None] - 0.5, 0, 1)
        tissue = eosin * (1 - t) + haem * t + texture[y % 768: y % 768 + h, x % 768: x % 768 + w]
        out = np.where((p > 0.5)[..., None], tissue, glass)
        return np.clip(out, 0, 255).astype(np.uint8)

    tmp = path.with_name(f".tmp-{path.name}")
    write_pyramid(tmp, render, mpp=SLIDE_MPP, fmt="tif", size_px=SIZE, downsamples=(1, 4, 16, 64), quality=80)
    os.replace(tmp, path)
    return path


def write_bench_scores(path: Path, slide_id: str, seed: int = 0) -> Path:
    import cv2

    from wsi_mil.store.score_file import write_scores

    prob = _tissue_field(seed)
    fp = TILE_PX * TILE_MPP / SLIDE_MPP
    step = int(fp)
    ys, xs = np.mgrid[0: SIZE[1] - step + 1: step, 0: SIZE[0] - step + 1: step]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    centre = ((coords + fp / 2) / COARSE_PX).astype(int)
    p = prob[np.minimum(centre[:, 1], prob.shape[0] - 1), np.minimum(centre[:, 0], prob.shape[1] - 1)]
    if int((p > 0.5).sum()) < N_TILES:
        raise RuntimeError(f"only {int((p > 0.5).sum())} tissue tiles; need {N_TILES}")
    # The N_TILES most tissue-like cells (the tissue pieces, slightly eroded), in grid order.
    coords = coords[np.sort(np.argsort(-p, kind="stable")[:N_TILES])]
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.normal(0, 1, (SIZE[1] // 2048, SIZE[0] // 2048)).astype(np.float32), (0, 0), 2)
    f = field[np.minimum(coords[:, 1] // 2048, field.shape[0] - 1), np.minimum(coords[:, 0] // 2048, field.shape[1] - 1)]
    logits = 4 * (f - f.mean()) / (f.std() + 1e-6) + rng.normal(0, 0.3, len(f))
    att = np.exp(logits - logits.max())
    att /= att.sum()
    p1 = 1 / (1 + np.exp(-logits))
    return write_scores(
        path, slide_id=slide_id, coords=coords, attention=att, instance_probabilities=np.stack([1 - p1, p1], 1),
        class_names=["normal", "tumor"], bag_probabilities=[0.2, 0.8], tile_px=TILE_PX, mpp=TILE_MPP,
        footprint_px=fp, slide_mpp=SLIDE_MPP, label="tumor", encoder_name="generated",
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def worker(slide: str, scores: str, out: str) -> dict[str, object]:
    # Imports a batch pays once per process (the slide backends load lazily inside open_slide).
    import h5py  # noqa: F401
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import openslide  # noqa: F401
    import tiffslide  # noqa: F401
    from PIL import ImageFont  # noqa: F401

    from wsi_mil.config.heatmap import HeatmapConfig
    from wsi_mil.runs.heatmap import run_heatmap

    cfg = HeatmapConfig()
    baseline = _status_kb("VmRSS") / 1024
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = run_heatmap([Path(slide)], scores, out, cfg, progress=False)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    record = result.summary.records[0]
    if record["status"] != "done":
        raise RuntimeError(f"heatmap failed: {record}")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "timings": record.get("timings", {}),
        "n_tiles": record["n_tiles"],
        "canvas_mpp": record["canvas_mpp"],
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "geojson_mb": (Path(out) / Path(slide).stem / "tiles.geojson").stat().st_size / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-mil-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    sys.path.insert(0, str(REPO))
    args.cache.mkdir(parents=True, exist_ok=True)
    slide = args.cache / "heatmap_100000x80000_0.25mpp_v1.tif"
    setup = f"reusing {slide}"
    if not slide.exists():
        t = time.perf_counter()
        write_slide(slide)
        setup = f"wrote {slide} in {time.perf_counter() - t:.0f} s"
    setup += f" ({slide.stat().st_size / 2**20:.0f} MiB)"
    scores_dir = args.cache / "heatmap_predict_v1"
    score_file = scores_dir / "scores" / f"{slide.stem}.h5"
    if not score_file.exists():
        write_bench_scores(score_file, slide.stem)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    runs = []
    for _ in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="heatmap-bench-"))
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(slide), str(scores_dir), str(out)],
                capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        finally:
            keep = out
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if len(runs) < args.repeats:
            shutil.rmtree(keep, ignore_errors=True)
    seconds = statistics.median(float(r["seconds"]) for r in runs)
    peak = max(float(r["peak_rss_mb"]) for r in runs)
    stages = {k: statistics.median(float(r["timings"][k]) for r in runs) for k in runs[0]["timings"]}
    met = seconds < TARGET_SECONDS and peak < TARGET_RSS_MB
    lines = [
        "# wsi-mil benchmark: heatmap of one large slide (run_heatmap, default config)",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}  {platform.machine()}  "
        f"cpus available: {len(os.sched_getaffinity(0))}  repeats: {args.repeats} (median seconds, max peak RSS)",
        f"# setup (not timed): {setup}; {N_TILES} tiles of {TILE_PX} px at {TILE_MPP} µm/px",
        "# each run in a fresh process; seconds exclude imports; peak MB = VmHWM incl. imports",
        f"slide {SIZE[0]} x {SIZE[1]} px at {SLIDE_MPP} µm/px, {runs[0]['n_tiles']} tiles, canvas {runs[0]['canvas_mpp']} µm/px",
        f"seconds: {seconds:.2f}  (runs {[round(float(r['seconds']), 2) for r in runs]})",
        f"CPU seconds (user+sys of the process; what an idle core needs): "
        f"{statistics.median(float(r['cpu_seconds']) for r in runs):.2f}  "
        f"(runs {[round(float(r['cpu_seconds']), 2) for r in runs]})",
        f"machine load average before the runs: {load_before}",
        "stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()),
        f"peak RSS: {peak:.0f} MB (after imports {float(runs[0]['baseline_rss_mb']):.0f} MB)",
        f"GeoJSON: {float(runs[0]['geojson_mb']):.1f} MiB",
        f"outputs of the last run: {keep}",
        f"target < {TARGET_SECONDS:g} s and < {TARGET_RSS_MB:g} MB: {'MET' if met else 'NOT MET'}",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
