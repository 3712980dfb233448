"""Benchmark: tile latency and memory of ``wsi-mil view`` on a 100,000 x 80,000 px slide (not a timed test).

Setup (cached, not timed): the slide and the 50,000-tile score file of ``benchmarks/heatmap.py`` (levels
1/4/16/64, JPEG, 0.25 µm/px), the score file pinned to the slide by its fingerprint, and the run records
the viewer reads (``extract/manifest.csv``, ``predict/``).

Each measurement starts a fresh viewer process (``--serve``, default config, bound to 127.0.0.1) and
requests 254-px deep-zoom tiles over HTTP/1.1 keep-alive from 1, 8 and 32 concurrent clients (threads,
one connection each), on tiles over the scored tissue at full resolution and at two coarser levels:

* ``cold``: each tile the first time (the server has no tile cached; the first requests also open the
  slide handles); the operating system's file cache is not dropped (it is shared with other users);
* ``warm``: the same tiles again (served from the server's bounded tile cache);
* ``new``: other tiles of the same slide on the warm server (handles open, tiles not cached: panning).

for the slide JPEG, the overlay JPEG (evidence colours over the slide; what the issue measures) and the
overlay PNG (the transparent layer the browser draws). Latency is per request, send to last byte. Request
counts are fixed and every phase has a deadline. A last run pans one client along three full-width
sweeps of the slide at full resolution (slide and overlay tiles, about 2,400 requests) and a zoom out
and in, sampling the server's resident memory (VmRSS) every 0.2 s.

    .venv/bin/python benchmarks/viewer.py [--out benchmarks/results/viewer.txt] [--quick]

Targets on 2 CPU cores: warm p95 < 50 ms at 8 clients; no error at 32 clients; memory flat while panning.
``--quick`` (a smoke test) uses a small generated slide and a few requests.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from wsi_mil.slide.deepzoom import DeepZoomGrid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLIENTS = (1, 8, 32)
KINDS = ("slide", "overlay_jpeg", "overlay_png")
PHASE_DEADLINE_S = 120.0
TARGET_WARM_P95_MS = 50.0


# --- the run the viewer serves ---------------------------------------------------------------------------
def prepare_run(cache: Path, quick: bool) -> tuple[Path, str]:
    """A run folder with the large slide (or a small one with ``quick``) and its scores; (folder, setup text)."""
    import h5py

    from wsi_mil.slide import open_slide

    if quick:
        from wsi_mil.demo.pyramid import write_pyramid
        from wsi_mil.store.score_file import write_scores

        run = cache / "viewer_run_quick_v1"
        slide = run / "slides" / "quick.tif"
        if not slide.exists():
            slide.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(0)
            img = np.clip(rng.normal((215, 130, 190), 12, (3072, 4096, 3)), 0, 255).astype(np.uint8)
            write_pyramid(slide, img, mpp=0.25, downsamples=(1, 4, 16))
            ys, xs = np.mgrid[0:3072 - 256:256, 0:4096 - 256:256]
            coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
            att = rng.random(len(coords))
            p1 = rng.random(len(coords))
            write_scores(run / "predict" / "scores" / "quick.h5", slide_id="quick", coords=coords, attention=att / att.sum(),
                         instance_probabilities=np.stack([1 - p1, p1], 1), class_names=["normal", "tumor"],
                         bag_probabilities=[0.3, 0.7], tile_px=256, mpp=0.25, footprint_px=256, slide_mpp=0.25)
        setup = f"small generated slide {slide} (4096 x 3072 px)"
    else:
        from heatmap import write_bench_scores, write_slide

        slide = cache / "heatmap_100000x80000_0.25mpp_v1.tif"  # the slide of benchmarks/heatmap.py, shared
        t, made = time.perf_counter(), not slide.exists()
        if made:
            write_slide(slide)
        how = f"wrote in {time.perf_counter() - t:.0f} s" if made else "reused"
        setup = f"{slide} ({how}, {slide.stat().st_size / 2**20:.0f} MiB)"
        run = cache / "viewer_run_v1"
        score = run / "predict" / "scores" / f"{slide.stem}.h5"
        if not score.exists():
            write_bench_scores(score, slide.stem)
    sid = slide.stem
    score = run / "predict" / "scores" / f"{sid}.h5"
    with open_slide(slide) as s, h5py.File(score, "a") as fh:
        fh.attrs["slide_fingerprint"] = s.fingerprint().to_json()
        n_tiles = int(fh["coords"].shape[0])
    (run / "extract").mkdir(parents=True, exist_ok=True)
    with open(run / "extract" / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["slide_id", "path", "status"], [sid, str(slide), "done"]])
    with open(run / "predict" / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["slide_id", "label", "prob_normal", "prob_tumor", "predicted", "n_tiles", "scored_by"],
                                  [sid, "tumor", 0.2, 0.8, "tumor", n_tiles, "ensemble:5"]])
    (run / "predict" / "predict.json").write_text(json.dumps({"classes": ["normal", "tumor"]}))
    return run, setup + f"; {n_tiles} scored tiles"


# --- the server, in its own process ----------------------------------------------------------------------
def serve(run: str, port_file: str) -> None:
    from wsi_mil.config.view import ViewConfig
    from wsi_mil.viewer import Catalog, ViewerServer

    server = ViewerServer(Catalog.open(run), ViewConfig(host="127.0.0.1", port=0))
    Path(port_file).write_text(str(server.port))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server._server, "should_exit", True))
    server.run()


class Server:
    """A fresh viewer process on 127.0.0.1; its VmRSS/VmHWM read from /proc."""

    def __init__(self, run: Path) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="viewer-bench-")
        port_file = Path(self._dir.name) / "port"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(run), str(port_file)],
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                     stderr=open(Path(self._dir.name) / "log", "w"))  # noqa: SIM115
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the viewer did not start: " + (Path(self._dir.name) / "log").read_text()[-2000:])
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        while True:  # the port file is written just before uvicorn starts listening on the bound socket
            try:
                status, _ = fetch(http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), "/api/ping")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the viewer does not answer")
            time.sleep(0.05)

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MB."""
        values = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._dir.cleanup()


def fetch(conn: http.client.HTTPConnection, path: str) -> tuple[int, int]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, len(resp.read())


# --- clients ---------------------------------------------------------------------------------------------
def tile_paths(info: dict, coords: np.ndarray, footprint: float, n: int, seed: int) -> list[tuple[int, int, int]]:
    """``n`` distinct (level, col, row) over scored tissue: 3/4 at full resolution, 1/4 at the two coarser levels."""
    rng = np.random.default_rng(seed)
    top, tile = int(info["max_level"]), int(info["tile_size"])
    out: set[tuple[int, int, int]] = set()
    order = rng.permutation(len(coords))
    k = 0
    while len(out) < n and k < 50 * n:
        x, y = coords[order[k % len(coords)]] + footprint / 2
        level = top if k % 4 else top - 1 - (k // 4) % 2
        ds = 2 ** (top - level)
        out.add((level, int(x / ds) // tile, int(y / ds) // tile))
        k += 1
    return sorted(out, key=lambda t: rng.random())


def url(kind: str, sid: str, level: int, col: int, row: int) -> str:
    if kind == "slide":
        return f"/tiles/{sid}/{level}/{col}_{row}.jpeg"
    fmt = "jpeg" if kind == "overlay_jpeg" else "png"
    return f"/overlay/{sid}/probability/{level}/{col}_{row}.{fmt}"


def hammer(port: int, paths: list[str], clients: int) -> dict[str, object]:
    """Fetch ``paths`` split over ``clients`` threads (one keep-alive connection each); latencies in ms."""
    shares = [paths[i::clients] for i in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    deadline = time.monotonic() + PHASE_DEADLINE_S

    def client(share: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        barrier.wait()
        for path in share:
            if time.monotonic() > deadline:
                with lock:
                    errors.append("deadline")
                break
            t0 = time.perf_counter()
            try:
                status, size = fetch(conn, path)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append((time.perf_counter() - t0) * 1000)
            if status != 200 or size == 0:
                with lock:
                    errors.append(f"HTTP {status}")
        conn.close()
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PHASE_DEADLINE_S + 60)
    wall = time.perf_counter() - t0
    arr = np.array(latencies) if latencies else np.array([np.nan])
    return {"n": len(latencies), "median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)),
            "errors": len(errors), "error_kinds": sorted(set(errors)), "tiles_per_s": len(latencies) / wall}


def measure(run: Path, per_client: dict[int, int]) -> tuple[list[dict[str, object]], dict]:
    from wsi_mil.store.score_file import find_scores, load_scores

    scores = load_scores(next(iter(find_scores(run / "predict").values())))
    rows: list[dict[str, object]] = []
    info: dict = {}
    for clients in CLIENTS:
        server = Server(run)
        try:
            sid = scores.slide_id
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", f"/api/slide/{sid}")
            info = json.loads(conn.getresponse().read())
            conn.close()
            n = per_client[clients] * clients
            tiles = tile_paths(info, scores.coords, scores.footprint_px, 2 * n, seed=clients)
            first, other = tiles[:n], tiles[n:]
            for kind in KINDS:
                for phase, chosen in (("cold", first), ("warm", first), ("new", other)):
                    result = hammer(server.port, [url(kind, sid, *t) for t in chosen], clients)
                    rows.append({"clients": clients, "kind": kind, "phase": phase, **result})
            rows[-1]["server_rss_mb"], rows[-1]["server_hwm_mb"] = server.memory_mb()
        finally:
            server.stop()
    return rows, info


def pan(run: Path, info: dict, sweeps: int, quick: bool) -> dict[str, object]:
    """One client pans full-width sweeps at full resolution, then zooms out and in; server memory sampled."""
    server = Server(run)
    samples: list[tuple[int, float]] = []
    done = [0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((done[0], server.memory_mb()[0]))
            time.sleep(0.2)

    sid = next(iter(find_ids(run)))
    top, tile = int(info["max_level"]), int(info["tile_size"])
    cols, rows = -(-int(info["width"]) // tile), -(-int(info["height"]) // tile)
    path: list[str] = []
    for k in range(sweeps):
        row = (k + 1) * rows // (sweeps + 1)
        cs = range(cols) if k % 2 == 0 else range(cols - 1, -1, -1)
        path += [url(kind, sid, top, c, row) for c in cs for kind in ("slide", "overlay_png")]
    grid = DeepZoomGrid(int(info["width"]), int(info["height"]))
    for level in [*range(top - 1, top - 8, -1), *range(top - 6, top + 1)]:  # zoom out, then back in at the centre
        ds, (nc, nr) = 2 ** (top - level), grid.tile_count(level)
        cx, cy = int(info["width"]) // 2 // ds // tile, int(info["height"]) // 2 // ds // tile
        path += [url("slide", sid, level, min(nc - 1, max(0, cx + dc)), min(nr - 1, max(0, cy + dr)))
                 for dc in (-1, 0, 1) for dr in (-1, 0, 1)]
    t = threading.Thread(target=sampler)
    t.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    errors = 0
    t0 = time.perf_counter()
    try:
        for p in path:
            if time.perf_counter() - t0 > (60 if quick else 600):
                break
            status, _ = fetch(conn, p)
            errors += status != 200
            done[0] += 1
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        t.join()
        rss_end, hwm = server.memory_mb()
        conn.close()
        server.stop()
    first = [rss for n, rss in samples if n <= len(path) // 10] or [samples[0][1]]
    later = [rss for n, rss in samples if n >= len(path) // 2] or [rss_end]
    return {"requests": done[0], "seconds": wall, "errors": errors, "rss_first_10pct_mb": max(first),
            "rss_second_half_max_mb": max(later), "rss_end_mb": rss_end, "peak_mb": hwm,
            "growth_second_half_mb": max(later) - min(later)}


def find_ids(run: Path) -> list[str]:
    with open(run / "extract" / "manifest.csv", newline="", encoding="utf-8") as fh:
        return [r["slide_id"] for r in csv.DictReader(fh)]


def report(rows: list[dict[str, object]], panned: dict[str, object], setup: str, load_before: str, quick: bool) -> tuple[str, bool]:
    def row(clients: int, kind: str, phase: str) -> dict[str, object]:
        return next(r for r in rows if r["clients"] == clients and r["kind"] == kind and r["phase"] == phase)

    lines = [
        "# wsi-mil benchmark: `wsi-mil view` tile latency and memory (benchmarks/viewer.py" + (" --quick)" if quick else ")"),
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}  {platform.machine()}  "
        f"cpus available: {len(os.sched_getaffinity(0))}  machine load average before: {load_before}",
        f"# setup (not timed): {setup}",
        "# a fresh server process per client count, bound to 127.0.0.1; clients are threads of this process with one",
        "# keep-alive connection each; latency = send to last byte; 254-px deep-zoom tiles over scored tissue (3/4 at",
        "# full resolution); cold = first request of each tile, warm = the same again, new = other tiles, warm server",
        f"{'clients':>7} {'tile':<13}" + "".join(f" {p + ' median/p95 ms':>24}" for p in ("cold", "warm", "new"))
        + f" {'tiles':>6} {'errors':>6}",
    ]
    for clients in CLIENTS:
        for kind in KINDS:
            cells = [row(clients, kind, p) for p in ("cold", "warm", "new")]
            lines.append(
                f"{clients:>7} {kind:<13}" + "".join(f" {float(c['median_ms']):>11.1f} / {float(c['p95_ms']):>9.1f}" for c in cells)
                + f" {sum(int(c['n']) for c in cells):>6} {sum(int(c['errors']) for c in cells):>6}"
            )
    for clients in CLIENTS:
        last = [r for r in rows if r["clients"] == clients and "server_hwm_mb" in r][0]
        lines.append(f"server after the {clients}-client run: RSS {float(last['server_rss_mb']):.0f} MB, "
                     f"peak {float(last['server_hwm_mb']):.0f} MB")
    lines.append(
        f"pan ({panned['requests']} requests in {float(panned['seconds']):.0f} s, {panned['errors']} errors): server RSS "
        f"{float(panned['rss_first_10pct_mb']):.0f} MB in the first tenth, at most {float(panned['rss_second_half_max_mb']):.0f} MB "
        f"in the second half (range {float(panned['growth_second_half_mb']):.0f} MB), {float(panned['rss_end_mb']):.0f} MB "
        f"at the end; peak {float(panned['peak_mb']):.0f} MB"
    )
    warm8 = max(float(row(8, k, "warm")["p95_ms"]) for k in KINDS)
    errors32 = sum(int(r["errors"]) for r in rows if r["clients"] == 32)
    met = warm8 < TARGET_WARM_P95_MS and errors32 == 0 and int(panned["errors"]) == 0
    lines.append(f"targets: warm p95 at 8 clients {warm8:.1f} ms (< {TARGET_WARM_P95_MS:g}), errors at 32 clients "
                 f"{errors32} (0): {'MET' if met else 'NOT MET'}")
    return "\n".join(lines) + "\n", met


def emit(text: str, out: Path | None) -> None:
    """Print the report, and keep it in ``out`` when given."""
    sys.stdout.write(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-mil-bench")
    ap.add_argument("--quick", action="store_true", help="a small slide and a few requests (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    run, setup = prepare_run(args.cache, args.quick)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    per_client = {1: 8, 8: 3, 32: 1} if args.quick else {1: 120, 8: 30, 32: 10}
    rows, info = measure(run, per_client)
    panned = pan(run, info, sweeps=1 if args.quick else 3, quick=args.quick)
    text, met = report(rows, panned, setup, load_before, args.quick)
    emit(text, args.out)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
