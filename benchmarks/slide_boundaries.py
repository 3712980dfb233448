"""Slide boundaries in ``wsi-mil extract``: tiles/s over many small slides, and how long the model waits
between one slide's last batch and the next slide's first batch.

Many small slides make the boundaries matter: whatever a slide change costs (starting loader processes,
reopening and re-checking the slide, preparing it) is paid once per slide whatever its size. Each
setting runs in a fresh interpreter (``run_extract`` in process, so that the batches can be timed) into a
fresh folder, the settings interleaved over rounds. The gaps are measured here, independently of the
``gap_s`` column the manifest may have, so the figures of older versions (run this file with their
``PYTHONPATH``) compare with newer ones: batch arrival is when ``_encode_slide`` enters the precision
context for a batch, the model's end when the batch is appended to the bag file.

    HF_HUB_OFFLINE=1 python benchmarks/slide_boundaries.py --slides 10 --rounds 1
    HF_HUB_OFFLINE=1 PYTHONPATH=/path/to/older/checkout python benchmarks/slide_boundaries.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: name -> ``workers`` of a setting
SETTINGS = {"processes": 2, "thread": -1, "series": 0}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/wsi_mil_bench/boundaries"))
    p.add_argument("--slides", type=int, default=10)
    p.add_argument("--size", type=int, nargs=2, default=(3072, 2048), metavar=("W", "H"), help="level-0 px at 0.5 µm/px")
    p.add_argument("--encoder", default="test_convnext", help="timm's tiny test network: reading dominates")
    p.add_argument("--tile-px", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=["processes"], choices=sorted(SETTINGS))
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: one timed run
    return p.parse_args(argv)


def _make_slides(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` pyramidal TIFFs with pink tissue blobs on glass (written once, reused)."""
    import cv2
    import numpy as np

    from wsi_mil.demo.pyramid import write_pyramid

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        path = folder / f"b{i:02d}.tif"
        if not path.exists():
            rng = np.random.default_rng(100 + i)
            mask = np.zeros((h, w), np.uint8)
            for _ in range(3):
                centre = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
                axes = (int(rng.integers(w // 10, w // 5)), int(rng.integers(h // 10, h // 5)))
                cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            noise = rng.normal(0, 12, (h, w, 3))
            img = np.clip(np.where(mask[..., None] > 0, np.array([200.0, 120.0, 190.0]) + noise, 243.0), 0, 255)
            write_pyramid(path, img.astype(np.uint8), mpp=0.5, fmt="tif")
        paths.append(path)
    return paths


def _child(args: argparse.Namespace) -> None:
    """In a fresh process: one ``run_extract`` with batch arrivals and model ends timed (JSON on stdout)."""
    import contextlib

    import torch

    from wsi_mil.config import ExtractConfig
    from wsi_mil.runs import extract as extract_mod

    spec = json.loads(args.child)
    events: list[tuple[str, str, float]] = []  # (slide, "got" | "done", perf_counter)
    current = {"slide": ""}
    real_autocast = extract_mod.autocast_context
    real_append = extract_mod.BagWriter.append
    real_init = extract_mod.BagWriter.__init__

    def init(self: Any, dest: Any, *a: Any, **k: Any) -> None:
        current["slide"] = Path(dest).stem
        real_init(self, dest, *a, **k)

    def autocast(*a: Any, **k: Any) -> Any:
        events.append((current["slide"], "got", time.perf_counter()))
        return real_autocast(*a, **k)

    def append(self: Any, *a: Any, **k: Any) -> None:
        real_append(self, *a, **k)
        events.append((current["slide"], "done", time.perf_counter()))

    extract_mod.BagWriter.__init__ = init  # type: ignore[method-assign]
    extract_mod.autocast_context = autocast  # type: ignore[assignment]
    extract_mod.BagWriter.append = append  # type: ignore[method-assign]
    cfg = ExtractConfig.model_validate({
        "encoder": spec["encoder"], "random_init": True, "device": "cpu", "batch_size": spec["batch_size"],
        "precision": "fp32", "workers": spec["workers"], "tiling": {"tile_px": spec["tile_px"]},
    })  # fmt: skip
    out = Path(spec["out"])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = extract_mod.run_extract([Path(p) for p in spec["slides"]], out, cfg, progress=False,
                                          threads=spec["threads"])  # fmt: skip
    wall = time.perf_counter() - t0
    gaps: list[float] = []
    last_done: float | None = None
    seen: set[str] = set()
    for slide, kind, t in events:
        if kind == "got" and slide not in seen:
            seen.add(slide)
            if last_done is not None:
                gaps.append(t - last_done)
        if kind == "done":
            last_done = t
    run = json.loads((out / "run.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((out / ".records").glob("*.json"))]
    print(json.dumps({
        "exit_code": summary.exit_code,
        "tiles": run["totals"]["tiles"],
        "batch_s": run["totals"]["seconds"],
        "wall_s": wall,
        "gaps_s": gaps,
        "recorded_gap_s": [r.get("gap_s") for r in records],
        "torch": torch.__version__,
    }))  # fmt: skip


def _run_setting(args: argparse.Namespace, slides: list[Path], name: str, rnd: int) -> dict[str, Any]:
    import shutil

    out = args.work / f"out_{name}_{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    spec = {
        "encoder": args.encoder, "batch_size": args.batch_size, "tile_px": args.tile_px, "workers": SETTINGS[name],
        "threads": args.threads, "out": str(out), "slides": [str(p) for p in slides],
    }  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env,
                       timeout=1800)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        _child(args)
        return
    slides = _make_slides(args.work / "slides", args.slides, tuple(args.size))
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    import wsi_mil

    say(f"slide boundaries: {args.slides} slides of {args.size[0]} x {args.size[1]} px, {args.encoder} (random init), "
        f"{args.tile_px} px tiles, batch {args.batch_size}, {args.threads} torch thread(s); wsi_mil from "
        f"{Path(wsi_mil.__file__).parent}")  # fmt: skip
    say(f"machine: {os.cpu_count()} CPUs visible, load average at start {os.getloadavg()[0]:.1f}")
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in args.settings}
    for rnd in range(args.rounds):
        for name in args.settings:
            res = _run_setting(args, slides, name, rnd)
            results[name].append(res)
            gaps = res["gaps_s"]
            say(f"  round {rnd + 1} {name:>9}: {res['tiles']} tiles, {res['tiles'] / res['batch_s']:6.1f} tiles/s "
                f"(batch phase {res['batch_s']:.2f} s); model idle between slides: median {statistics.median(gaps):.3f} s, "
                f"p95 {_p95(gaps):.3f} s, max {max(gaps):.3f} s, sum {sum(gaps):.2f} s over {len(gaps)} boundaries")  # fmt: skip
            say(f"      gaps (s): {' '.join(f'{g:.3f}' for g in gaps)}")
            recorded = [g for g in res["recorded_gap_s"] if g is not None]
            if recorded:
                say(f"      gap_s recorded by extract: {' '.join(f'{g:.3f}' for g in recorded)}")
    say(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on the machine skew every figure)")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
