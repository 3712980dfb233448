"""``benchmarks/extract.py --many-small``: a stream of small slides, where per-slide costs show first.

200 slides of about 60 tissue tiles each (the sample cohort's slides at ``--scale 0.65``, built once and
kept in ``benchmarks/results/many_small/``, ignored by git) go through ``wsi-mil extract`` in each
setting, every run in a fresh process into a fresh folder:

- ``cpu_default``: the CPU default (tiles read by a thread, ``workers: -1``);
- ``workers_2``: tile-reading worker processes (``--workers 2``), the configuration a GPU node uses.

Per setting: end-to-end tiles/s of the batch phase (``run.json``; start-up and model loading excluded),
the encoder alone at the same settings (device, batch, precision, torch threads, channels_last: measured
by ``_run_figures.py encoder-alone`` on the run's own records, in a fresh process), their ratio (target
>= 0.9), the slide-boundary gap and the resident memory after slide 10 and after the last slide (target
<= 1.1 x). The gap is the records' ``gap_s`` (the model's idle time between the last batch of one slide
and the first batch of the next) when they have it; otherwise the figure printed is each slide's time
outside the model (``seconds - model_s``: waiting for its preparation and its tiles, and writing its
bag), an upper bound of the gap, said so in the report. RSS is the main process's (``rss_mb``, recorded
after each slide); worker processes are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "results" / "many_small"

#: setting name -> extra ``wsi-mil extract`` flags
MODES: dict[str, list[str]] = {"cpu_default": [], "workers_2": ["--workers", "2"]}


def build_slides(n: int, scale: float) -> Path:
    """The cached cohort of ``n`` small sample slides (built on first use); its slides folder."""
    from wsi_mil.demo.cohort import build_sample_cohort

    out = CACHE / f"cohort_{n}_s{scale:g}"
    info = build_sample_cohort(out, n_slides=n, seed=0, scale=scale)
    print(f"  slides: {info.n_slides} in {out / 'slides'} ({'built' if info.built else 'cached'}, {info.seconds:.0f} s)",
          flush=True)  # fmt: skip
    return out / "slides"


def _percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_mode(args: argparse.Namespace, slides: Path, mode: str) -> dict[str, Any]:
    """One ``wsi-mil extract`` of the whole stream in ``mode``, then the encoder alone at its settings."""
    out = args.work / f"many_small_{mode}"
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "THP_MEM_ALLOC_ENABLE": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "wsi_mil", "-q", "extract", str(slides), "--out", str(out), "--encoder", args.encoder,
           "--random-init", "--batch-size", str(args.batch_size), "--device", args.device, *MODES[mode]]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    fig = [sys.executable, str(ROOT / "benchmarks" / "_run_figures.py"), "encoder-alone", str(out),
           "--tiles", str(args.encoder_tiles)]  # fmt: skip
    a = subprocess.run(fig, capture_output=True, text=True, env=env, timeout=1800)
    if a.returncode != 0:
        raise RuntimeError(f"{' '.join(fig)} failed ({a.returncode}):\n{a.stderr[-3000:]}")
    return {"mode": mode, "wall_s": wall, "alone": json.loads(a.stdout)["encoder_alone_tiles_per_s"], **stream_figures(out)}


def stream_figures(out: Path) -> dict[str, Any]:
    """End-to-end tiles/s, slide-boundary gaps and RSS by slide from an extract folder's records."""
    import csv

    run = json.loads((out / "run.json").read_text())
    with open(out / "manifest.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda row: row["slide_id"])  # slides are taken in id order
    done = [row for row in rows if row["status"] == "done"]
    has_gap = bool(done) and "gap_s" in done[0] and all(row["gap_s"] not in ("", None) for row in done[1:])
    if has_gap:
        gaps = [float(row["gap_s"]) for row in done[1:]]  # the first slide has no slide before it
    else:
        gaps = [float(row["seconds"]) - float(row["model_s"]) for row in done]
    rss = [float(row["rss_mb"]) for row in done if row.get("rss_mb")]
    tiles, batch_s = run["totals"]["tiles"], run["totals"]["seconds"]
    return {
        "loader": f"{run['loader']} x{run['loader_workers']}", "precision": run["precision"],
        "threads": run["torch_threads"], "slides": len(done), "tiles": tiles, "batch_s": batch_s,
        "e2e": tiles / batch_s, "gap_is_recorded": has_gap,
        "gap_median": statistics.median(gaps) if gaps else float("nan"),
        "gap_p95": _percentile(gaps, 95) if gaps else float("nan"),
        "non_model_per_slide": (batch_s - sum(float(row["model_s"]) for row in done)) / max(len(done), 1),
        "rss_10": rss[min(9, len(rss) - 1)] if rss else float("nan"), "rss_last": rss[-1] if rss else float("nan"),
        "rss": rss,
    }  # fmt: skip


def many_small(args: argparse.Namespace, say: Any) -> None:
    """The ``--many-small`` benchmark: every mode over one stream of ``args.slides`` small slides."""
    args.work.mkdir(parents=True, exist_ok=True)
    say(f"many small slides: {args.slides} sample slides at scale {args.scale:g} (about 60 tiles each), "
        f"{args.encoder} (random init), batch {args.batch_size}, {args.threads} torch threads, device {args.device}")  # fmt: skip
    slides = build_slides(args.slides, args.scale)
    results = [run_mode(args, slides, mode) for mode in MODES]
    say(f"  {'setting':<12} {'tiles read by':<14} {'slides':>6} {'tiles':>6} {'e2e t/s':>8} {'alone t/s':>9} {'ratio':>6} "
        f"{'gap med':>8} {'gap p95':>8} {'RSS@10':>7} {'RSS@end':>8} {'ratio':>6}")  # fmt: skip
    for r in results:
        say(f"  {r['mode']:<12} {r['loader']:<14} {r['slides']:>6} {r['tiles']:>6} {r['e2e']:>8.1f} {r['alone']:>9.1f} "
            f"{r['e2e'] / r['alone']:>6.3f} {r['gap_median']:>7.3f}s {r['gap_p95']:>7.3f}s {r['rss_10']:>6.0f}M "
            f"{r['rss_last']:>7.0f}M {r['rss_last'] / r['rss_10']:>6.3f}")  # fmt: skip
    say("  targets: end to end / encoder alone >= 0.9; RSS after the last slide <= 1.1 x RSS after slide 10")
    if all(r["gap_is_recorded"] for r in results):
        say("  gap: the records' gap_s, the model's idle time between the last batch of a slide and the first of the next")
    else:
        say("  gap: the records have no gap_s; shown instead is each slide's time outside the model (seconds - model_s:")
        say("  waiting for its preparation and tiles, writing its bag), an upper bound of the slide-boundary gap")
    for r in results:
        say(f"  {r['mode']}: time outside the model per slide over the whole batch phase {r['non_model_per_slide']:.3f} s; "
            f"wall {r['wall_s']:.0f} s; RSS by slide (MB): " + " ".join(f"{v:.0f}" for v in r["rss"][:: max(1, len(r['rss']) // 40)]))  # fmt: skip
