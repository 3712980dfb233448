"""``wsi-mil extract`` end to end against the encoder alone, fp32 against the default fast path, and memory.

Measured in one run on one machine, every measurement in a fresh process (``THP_MEM_ALLOC_ENABLE``
must be set before torch allocates), the settings interleaved over rounds, all with the same model,
batch size and torch threads:

1. efficiency = end-to-end tiles/s of ``wsi-mil extract`` on the sample cohort / tiles/s of the encoder
   alone at the same setting. Encoder alone = uint8 tiles of the cohort's tile size, made at random,
   through ``encoder.transform`` and the model under ``torch.inference_mode()`` (what the pipeline must
   do besides reading tiles). End to end = the batch phase recorded in ``run.json`` (every slide:
   tissue, QC, tiling, reading, model, writing; not interpreter start-up or model loading), and the
   command's whole wall time for reference.
2. speed: the default fast path (``--precision auto`` = bf16 autocast on CPUs with avx512_bf16,
   channels_last, ``THP_MEM_ALLOC_ENABLE=1``) against plain fp32 (no channels_last, no huge pages),
   encoder alone and end to end; and the per-tile cosine similarity of the fast path's features to
   fp32's on the cohort (minimum over tiles).
3. resident memory after the first and after the last slide of a 50-slide run (the manifest's
   ``rss_mb`` / ``peak_rss_mb`` columns).

4. ``--many-small``: 200 slides of about 60 tiles each in the CPU default and with tile-reading worker
   processes (``--workers 2``, as on a GPU node): end to end / encoder alone, the slide-boundary gap
   (median, p95) and resident memory after slide 10 vs the last (``benchmarks/_many_small.py``).

    HF_HUB_OFFLINE=1 python benchmarks/extract.py --out benchmarks/results/extract.txt
    python benchmarks/extract.py --variants   # also: loader in series (0 workers), 1 torch thread...
    python benchmarks/extract.py --many-small --out benchmarks/results/extract_many_small.txt
    python benchmarks/extract.py --many-small --slides 10   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: name -> (extra CLI flags, environment, channels_last) of an end-to-end setting
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"flags": ["--precision", "fp32", "--no-cpu-fusion"], "env": {"THP_MEM_ALLOC_ENABLE": "0"}, "channels_last": False},
    "fast": {"flags": [], "env": {"THP_MEM_ALLOC_ENABLE": "1"}, "channels_last": True},
}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, default=Path("/tmp/wsi_mil_bench/cohort"), help="built if missing")
    p.add_argument("--work", type=Path, default=Path("/tmp/wsi_mil_bench/extract"))
    p.add_argument("--encoder", default="resnet50_trunc")
    p.add_argument("--batch-size", type=int, default=8, help="8: the CPU default (batch_size: null)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--encoder-tiles", type=int, default=384, help="timed tiles of the encoder alone")
    p.add_argument("--compare-batch", type=int, default=32,
                   help="also time the encoder alone at this batch size (the issue's and CLAM's 32); 0: no")
    p.add_argument("--rss-slides", type=int, default=50)
    p.add_argument("--variants", action="store_true", help="also time pipeline variants (investigation)")
    p.add_argument("--many-small", action="store_true", help="only the many-small-slides benchmark (see 4.)")
    p.add_argument("--slides", type=int, default=200, help="--many-small: slides in the stream")
    p.add_argument("--scale", type=float, default=0.65, help="--many-small: sample-slide scale (0.65: about 60 tiles)")
    p.add_argument("--device", default="cpu", help="--many-small: cpu or cuda")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child-encoder", default="", help=argparse.SUPPRESS)  # internal: one encoder-alone run
    return p.parse_args(argv)


# --- children ---------------------------------------------------------------------------------------------
def _encoder_alone(args: argparse.Namespace) -> None:
    """In a fresh process: tiles/s of transform + model on random uint8 tiles (JSON on stdout)."""
    import numpy as np
    import torch

    from wsi_mil.features.encoders import create_encoder
    from wsi_mil.features.runtime import autocast_context, resolve_precision
    from wsi_mil.runs.extract import RANDOM_INIT_SEED

    setting = SETTINGS[args.child_encoder]
    torch.set_num_threads(args.threads)
    torch.manual_seed(RANDOM_INIT_SEED)
    enc = create_encoder(args.encoder, random_init=True, device="cpu")
    enc.set_channels_last(setting["channels_last"])
    precision = "fp32" if "--precision" in setting["flags"] else resolve_precision("auto", torch.device("cpu"))
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (args.batch_size, 256, 256, 3), dtype=np.uint8))
    model = enc.inference_model(precision, args.batch_size, cpu_fusion="--no-cpu-fusion" not in setting["flags"])  # type: ignore[arg-type]

    def step() -> None:
        with torch.inference_mode(), autocast_context(torch.device("cpu"), precision):  # type: ignore[arg-type]
            model(enc.transform(tiles)).float()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    n_batches = max(4, -(-args.encoder_tiles // args.batch_size))
    for _ in range(n_batches):
        step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"tiles_per_s": n_batches * args.batch_size / seconds, "precision": precision}))


def _run(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return r, time.perf_counter() - t0


def _env(args: argparse.Namespace, setting: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env.update(SETTINGS[setting]["env"])
    return env


def encoder_alone(args: argparse.Namespace, setting: str, batch_size: int | None = None) -> float:
    cmd = [sys.executable, __file__, "--child-encoder", setting, "--encoder", args.encoder,
           "--batch-size", str(batch_size or args.batch_size), "--threads", str(args.threads),
           "--encoder-tiles", str(args.encoder_tiles)]  # fmt: skip
    r, _ = _run(cmd, _env(args, setting))
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return float(json.loads(r.stdout.strip().splitlines()[-1])["tiles_per_s"])


def end_to_end(
    args: argparse.Namespace, setting: str, out: Path, slides: Path, extra: list[str] | None = None, threads: int | None = None
) -> dict[str, Any]:
    """One ``wsi-mil extract`` run into a fresh folder; its figures from run.json and the manifest."""
    if out.exists():
        import shutil

        shutil.rmtree(out)
    flags = list(SETTINGS[setting]["flags"])
    config = args.work / f"{setting}.yaml"
    config.write_text(f"channels_last: {str(SETTINGS[setting]['channels_last']).lower()}\n")
    cmd = [str(Path(sys.executable).parent / "wsi-mil"), "-q", "extract", str(slides), "--out", str(out),
           "--config", str(config), "--encoder", args.encoder, "--random-init", "--batch-size", str(args.batch_size),
           *flags, *(extra or [])]  # fmt: skip
    env = _env(args, setting)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    r, wall = _run(cmd, env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    tiles = run["totals"]["tiles"]
    return {
        "tiles": tiles,
        "tiles_per_s": tiles / run["totals"]["seconds"],
        "wall_tiles_per_s": tiles / wall,
        "read_s": sum(float(r["read_s"] or 0) for r in rows),
        "model_s": sum(float(r["model_s"] or 0) for r in rows),
        "batch_s": run["totals"]["seconds"],
        "precision": run["precision"],
        "workers": run["loader_workers"],
        "rows": rows,
    }


# --- figures ---------------------------------------------------------------------------------------------
def cosine_per_tile(a_dir: Path, b_dir: Path) -> tuple[float, float, int]:
    import h5py
    import numpy as np

    values = []
    for fa in sorted((a_dir / "features").glob("*.h5")):
        with h5py.File(fa) as ha, h5py.File(b_dir / "features" / fa.name) as hb:
            assert np.array_equal(ha["coords"][:], hb["coords"][:])
            x, y = ha["features"][:].astype(np.float64), hb["features"][:].astype(np.float64)
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        values.append(cos)
    allv = np.concatenate(values)
    return float(allv.min()), float(allv.mean()), int(allv.size)


def rss_run(args: argparse.Namespace, slides: list[Path]) -> dict[str, Any]:
    """50 slide ids (links to the cohort's files) through the default fast path; RSS per slide."""
    folder = args.work / "rss_slides"
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.rss_slides):
        src = slides[i % len(slides)]
        (folder / f"r{i:03d}_{src.stem}{src.suffix}").symlink_to(src)
    res = end_to_end(args, "fast", args.work / "rss_out", folder)
    rows = sorted(res["rows"], key=lambda r: r["slide_id"])  # processing order
    rss = [float(r["rss_mb"]) for r in rows]
    peak = [float(r["peak_rss_mb"]) for r in rows]
    return {"n": len(rows), "rss": rss, "peak": peak, "tiles_per_s": res["tiles_per_s"], "tiles": res["tiles"]}


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child_encoder:
        _encoder_alone(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.many_small:
        from _many_small import many_small

        load0 = os.getloadavg()[0]
        many_small(args, say)
        say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, load average "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other processes skew every figure)")  # fmt: skip
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
        return
    slides_dir = args.cohort / "slides"
    if not slides_dir.is_dir():
        r = subprocess.run([str(Path(sys.executable).parent / "wsi-mil"), "-q", "sample-data", str(args.cohort)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(r.stderr)
    slides = sorted(p for p in slides_dir.iterdir() if p.suffix in (".svs", ".tif"))
    load0 = os.getloadavg()
    say(f"wsi-mil extract benchmark: {args.encoder} (random init), batch {args.batch_size}, {args.threads} torch threads, "
        f"{len(slides)} sample-cohort slides, 256 px tiles at 0.5 µm/px")  # fmt: skip
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"load average at start {load0[0]:.1f}")  # fmt: skip
    enc: dict[str, list[float]] = {s: [] for s in SETTINGS}
    enc_cmp: dict[str, list[float]] = {s: [] for s in SETTINGS}  # encoder alone at --compare-batch
    e2e: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for setting in SETTINGS:  # interleaved: fp32 alone, fp32 e2e, fast alone, fast e2e
            enc[setting].append(encoder_alone(args, setting))
            if args.compare_batch:
                enc_cmp[setting].append(encoder_alone(args, setting, args.compare_batch))
            e2e[setting].append(end_to_end(args, setting, args.work / f"e2e_{setting}_{rnd}", slides_dir))
            say(f"  round {rnd + 1} {setting:>4}: encoder alone {enc[setting][-1]:6.1f} tiles/s, end to end "
                f"{e2e[setting][-1]['tiles_per_s']:6.1f} tiles/s (read {e2e[setting][-1]['read_s']:.1f} s waiting for "
                f"tiles, model {e2e[setting][-1]['model_s']:.1f} s)")  # fmt: skip

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    say()
    say("1. efficiency: end-to-end tiles/s / encoder-alone tiles/s (median over rounds)")
    for setting in SETTINGS:
        a = med(enc[setting])
        b = med([r["tiles_per_s"] for r in e2e[setting]])
        w = med([r["wall_tiles_per_s"] for r in e2e[setting]])
        say(f"   {setting:>4} ({e2e[setting][0]['precision']}): encoder alone {a:6.1f}, end to end {b:6.1f} -> "
            f"efficiency {b / a:.3f}   (whole command incl. start-up and model load: {w:6.1f} tiles/s, {w / a:.3f})")  # fmt: skip
    say()
    fast_enc, fp32_enc = med(enc["fast"]), med(enc["fp32"])
    fast_e2e = med([r["tiles_per_s"] for r in e2e["fast"]])
    say("2. speed: default fast path vs plain fp32")
    say(f"   encoder alone, batch {args.batch_size}: plain fp32 {fp32_enc:.1f} -> fast {fast_enc:.1f} tiles/s = "
        f"{fast_enc / fp32_enc:.2f}x")  # fmt: skip
    if args.compare_batch:
        c_fp32, c_fast = med(enc_cmp["fp32"]), med(enc_cmp["fast"])
        say(f"   encoder alone, batch {args.compare_batch}: plain fp32 {c_fp32:.1f} -> fast {c_fast:.1f} tiles/s = "
            f"{c_fast / c_fp32:.2f}x (the issue's setting; target >= 4x)")  # fmt: skip
        say(f"   default fast path (batch {args.batch_size}) vs plain fp32 at batch {args.compare_batch}: "
            f"{c_fp32:.1f} -> {fast_enc:.1f} tiles/s = {fast_enc / c_fp32:.2f}x")  # fmt: skip
        say(f"   (batch {args.batch_size} vs {args.compare_batch}: fp32 {fp32_enc / c_fp32:.2f}x, fast {fast_enc / c_fast:.2f}x: "
            "small batches keep activations in cache on this CPU)")  # fmt: skip
    say(f"   end to end: {med([r['tiles_per_s'] for r in e2e['fp32']]):.1f} -> {fast_e2e:.1f} tiles/s = "
        f"{fast_e2e / med([r['tiles_per_s'] for r in e2e['fp32']]):.2f}x; "
        f"fast end to end / fast encoder alone = {fast_e2e / fast_enc:.3f} (target >= 0.9)")  # fmt: skip
    cmin, cmean, n = cosine_per_tile(args.work / f"e2e_fp32_{args.rounds - 1}", args.work / f"e2e_fast_{args.rounds - 1}")
    say(f"   features, fast vs fp32, cosine similarity per tile over {n} tiles: min {cmin:.5f}, mean {cmean:.6f} "
        "(target min >= 0.999)")  # fmt: skip
    if args.variants:
        say()
        say("   variants of the fast path (one run each; the default reads tiles with a thread):")
        for name, extra, threads in (
            ("tiles read in series (--workers 0)", ["--workers", "0"], None),
            ("1 loader process (--workers 1)", ["--workers", "1"], None),
            ("reading thread (default), 1 torch thread", [], 1),
            ("OpenSlide reads everything (--backend openslide)", ["--backend", "openslide"], None),
        ):
            r = end_to_end(args, "fast", args.work / "variant", slides_dir, extra, threads)
            say(f"   {name:<52} {r['tiles_per_s']:6.1f} tiles/s = {r['tiles_per_s'] / fast_enc:.3f} of the encoder alone; "
                f"waiting for tiles {r['read_s']:.1f} s, model {r['model_s']:.1f} s")  # fmt: skip
    say()
    if args.rss_slides > 0:  # 0: no memory run
        rss = rss_run(args, slides)
        say(f"3. memory over a {rss['n']}-slide run (default fast path, {rss['tiles']} tiles, {rss['tiles_per_s']:.1f} tiles/s):")
        say(f"   RSS after slide 1: {rss['rss'][0]:.0f} MB, after slide {rss['n']}: {rss['rss'][-1]:.0f} MB "
            f"(min {min(rss['rss']):.0f}, max {max(rss['rss']):.0f}); peak RSS after slide 1: {rss['peak'][0]:.0f} MB, "
            f"after slide {rss['n']}: {rss['peak'][-1]:.0f} MB")  # fmt: skip
        say("   RSS by slide (MB): " + " ".join(f"{v:.0f}" for v in rss["rss"]))
        if rss["n"] >= 20:
            import numpy as np

            warm = 20  # allocator pools and kernels for each batch shape are made over the first slides
            slope = float(np.polyfit(np.arange(warm, rss["n"]), rss["rss"][warm:], 1)[0])
            say(f"   after the first {warm} slides (warm-up): RSS {rss['rss'][warm - 1]:.0f} MB after slide {warm}, "
                f"{rss['rss'][-1]:.0f} MB after slide {rss['n']}; trend over slides {warm + 1}-{rss['n']}: "
                f"{slope:+.2f} MB per slide (flat: |trend| < 1 MB per slide)")  # fmt: skip
    say()
    load1 = os.getloadavg()
    say(f"{time.perf_counter() - t_start:.0f} s in all; load average at the end {load1[0]:.1f} "
        "(other processes on the machine skew every figure)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
