"""Figures of a finished ``wsi-mil extract`` run, for ``gpu_check.sh`` and ``extract.py --many-small``.

Each command takes an extract output folder and reads what the run recorded (``config.yaml``: encoder,
batch size, channels_last, tile side; ``run.json``: device, precision, torch threads, the batch phase's
tiles and seconds; ``manifest.csv``: per-slide records), so a figure is always measured at the settings
the run used:

- ``encoder-alone RUN``: tiles/s of the encoder alone on that device at that batch size, precision and
  memory format, with random weights (speed does not depend on them) on random uint8 tiles of the run's
  tile side: ``encoder.transform`` (host -> device, resize, normalise) and the model under
  ``torch.inference_mode()`` and autocast, features copied back per batch as extraction does; in a fresh
  process. The run's end-to-end tiles/s (its batch phase: every slide's tissue, tiling, reading, model and
  writing; not start-up) over this is the pipeline's efficiency.
- ``reference RUN SLIDES --out DIR``: the same extraction on the CPU in float32 for ``SLIDES``, then the
  cosine similarity of the run's features to these per tile (same coords), minimum and mean.
- ``util CSV --run RUN``: GPU utilisation and memory sampled by ``nvidia-smi -lms`` during the step,
  summarised over the run's batch phase (from ``run.json``) and over the whole step.
- ``env``: torch, CUDA, the GPU and its driver, and the versions of torch, timm and wsi-mil's other
  dependencies that ran beside what ``constraints.txt`` pins (a lent GPU machine runs its own torch);
  ``summary RESULTS``: ``gpu_check.json`` and ``gpu_check.txt`` from what the other commands and
  ``gpu_check.sh`` wrote into ``RESULTS``.

Every command writes JSON (``--json FILE``, else stdout).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
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


def _emit(data: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(data, indent=1, default=str)
    if path is None:
        print(text)
    else:
        path.write_text(text + "\n")


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a finished extract run recorded: its resolved config, run.json and manifest rows."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    with open(run_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"config": cfg, "run": run, "rows": rows}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def end_to_end(run_dir: Path) -> dict[str, Any]:
    """The run's batch-phase figures, and its slide-boundary gaps when the records have them."""
    info = read_run(run_dir)
    run, rows = info["run"], info["rows"]
    done = [r for r in rows if r.get("status") == "done"]
    out: dict[str, Any] = {
        "device": run["device"],
        "precision": run["precision"],
        "loader": run["loader"],
        "loader_workers": run["loader_workers"],
        "torch_threads": run["torch_threads"],
        "batch_size": info["config"]["batch_size"],
        "slides_done": len(done),
        "tiles": run["totals"]["tiles"],
        "batch_s": run["totals"]["seconds"],
        "tiles_per_s": run["totals"]["tiles"] / max(run["totals"]["seconds"], 1e-9),
        "random_init": bool(info["config"].get("random_init")),
    }
    gaps = [float(r["gap_s"]) for r in done if r.get("gap_s") not in (None, "")]
    if gaps:
        out["gap_s"] = {"n": len(gaps), "median": statistics.median(gaps), "p95": percentile(gaps, 95), "max": max(gaps)}
    return out


# --- encoder alone ------------------------------------------------------------------------------------------
def encoder_alone(run_dir: Path, n_tiles: int, min_seconds: float) -> dict[str, Any]:
    """Tiles/s of the run's encoder alone at the run's device, batch, precision and memory format."""
    import numpy as np
    import torch

    from wsi_mil.features.encoders import create_encoder
    from wsi_mil.features.runtime import autocast_context

    info = read_run(run_dir)
    cfg, run = info["config"], info["run"]
    dev = torch.device(run["device"].split()[0])
    if dev.type == "cpu":
        torch.set_num_threads(int(run["torch_threads"]))
    torch.manual_seed(0)
    enc = create_encoder(cfg["encoder"], random_init=True, device=dev)
    enc.set_channels_last(bool(cfg["channels_last"]))
    batch, px, precision = int(cfg["batch_size"]), int(cfg["tiling"]["tile_px"]), run["precision"]
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (batch, px, px, 3), dtype=np.uint8))
    if dev.type == "cuda":
        tiles = tiles.pin_memory()
    # the model the run encoded with (a config from before cpu_fusion existed ran the eager model)
    model = enc.inference_model(precision, batch, cpu_fusion=bool(cfg.get("cpu_fusion", False)))

    def step() -> None:
        with torch.inference_mode(), autocast_context(dev, precision):
            model(enc.transform(tiles, device=dev)).float().cpu()  # the copy back synchronises

    for _ in range(3):
        step()
    done, t0 = 0, time.perf_counter()
    while done < n_tiles or time.perf_counter() - t0 < min_seconds:
        step()
        done += batch
    seconds = time.perf_counter() - t0
    alone = done / seconds
    e2e = end_to_end(run_dir)
    return {
        "encoder": cfg["encoder"], "device": str(dev), "precision": precision, "batch_size": batch, "tile_px": px,
        "channels_last": enc.channels_last, "torch_threads": torch.get_num_threads(), "timed_tiles": done,
        "encoder_alone_tiles_per_s": alone, "end_to_end": e2e, "efficiency": e2e["tiles_per_s"] / alone,
    }  # fmt: skip


# --- CPU float32 reference --------------------------------------------------------------------------------
def cosine_per_tile(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Per-tile cosine similarity of the bags two runs wrote for the same slides (coords must agree)."""
    import h5py
    import numpy as np

    values, slides = [], []
    for fb in sorted((b_dir / "features").glob("*.h5")):
        fa = a_dir / "features" / fb.name
        if not fa.exists():
            continue
        with h5py.File(fa) as ha, h5py.File(fb) as hb:
            if not np.array_equal(ha["coords"][:], hb["coords"][:]):
                raise SystemExit(f"{fb.name}: the two runs tiled the slide differently")
            x, y = ha["features"][:].astype(np.float64), hb["features"][:].astype(np.float64)
        cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
        values.append(cos)
        slides.append({"slide": fb.stem, "tiles": int(cos.size), "min": float(cos.min()), "mean": float(cos.mean())})
    if not values:
        raise SystemExit(f"no slide has bags in both {a_dir} and {b_dir}")
    allv = np.concatenate(values)
    return {"tiles": int(allv.size), "min": float(allv.min()), "mean": float(allv.mean()), "slides": slides}


def reference(run_dir: Path, slides: Path, out_dir: Path) -> dict[str, Any]:
    """Extract ``slides`` again on the CPU in float32 with the run's encoder and weights; cosine per tile."""
    import yaml

    cfg = read_run(run_dir)["config"]
    cfg.update(device="cpu", precision="fp32", batch_size=None, channels_last=False, compile=False, workers=-1)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ref_cfg = out_dir.parent / f"{out_dir.name}.yaml"
    ref_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "wsi_mil", "-q", "extract", str(slides), "--out", str(out_dir), "--config", str(ref_cfg)]
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keeps a site folder
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    result = cosine_per_tile(run_dir, out_dir)
    result.update(reference="cpu fp32", reference_s=round(time.perf_counter() - t0, 1), run_precision=read_run(run_dir)["run"]["precision"])
    return result


# --- GPU utilisation ----------------------------------------------------------------------------------------
def util(csv_path: Path, run_dir: Path | None) -> dict[str, Any]:
    """Summary of ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits``."""
    samples = []
    for line in csv_path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f"), float(parts[1]), float(parts[2])))
        except (ValueError, IndexError):
            continue
    if not samples:
        return {"samples": 0}

    def summary(rows: list[tuple[dt.datetime, float, float]]) -> dict[str, Any]:
        u = [r[1] for r in rows]
        return {"samples": len(rows), "util_mean": statistics.fmean(u), "util_p50": statistics.median(u),
                "util_p90": percentile(u, 90), "memory_max_mib": max(r[2] for r in rows)}  # fmt: skip

    out = {"whole_step": summary(samples)}
    if run_dir is not None and (run_dir / "run.json").exists():
        run = json.loads((run_dir / "run.json").read_text())
        end = dt.datetime.strptime(run["finished"], "%Y-%m-%dT%H:%M:%S%z").astimezone().replace(tzinfo=None)
        start = end - dt.timedelta(seconds=float(run["totals"]["seconds"]))
        inside = [s for s in samples if start - dt.timedelta(seconds=1) <= s[0] <= end + dt.timedelta(seconds=1)]
        if inside:
            out["batch_phase"] = summary(inside)
    return out


# --- environment and summary --------------------------------------------------------------------------------
#: distributions whose versions a GPU check records: the ones that compute first, then the rest of wsi-mil's
PACKAGES = (
    "torch", "torchvision", "timm", "numpy", "safetensors", "huggingface-hub", "h5py", "opencv-python-headless",
    "scikit-image", "scikit-learn", "scipy", "pillow", "tifffile", "imagecodecs", "openslide-python",
    "openslide-bin", "tiffslide", "zarr", "pydantic", "pydantic-core", "typing-extensions", "pyyaml", "click",
    "matplotlib", "tqdm",
)  # fmt: skip


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def package_versions(names: tuple[str, ...] = PACKAGES, constraints: Path = ROOT / "constraints.txt") -> dict[str, Any]:
    """``{name: {"version": installed or None, "pinned": constraints.txt's version or None}}``."""
    from importlib import metadata

    pinned: dict[str, str] = {}
    if constraints.exists():
        for line in constraints.read_text().splitlines():
            name, sep, version = line.split("#", 1)[0].strip().partition("==")
            if sep:
                pinned[_canonical(name)] = version.strip()
    out: dict[str, Any] = {}
    for name in names:
        try:
            version: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        out[name] = {"version": version, "pinned": pinned.get(_canonical(name))}
    return out


def versions_line(packages: dict[str, Any]) -> str:
    """torch, torchvision and timm always, then every other package not at its pinned version."""
    parts = []
    for name, v in packages.items():
        differs = v["version"] is None or (v["pinned"] and v["version"].split("+")[0] != v["pinned"])
        if name in ("torch", "torchvision", "timm") or differs:
            pin = f" (constraints.txt: {v['pinned']})" if v["pinned"] and differs else ""
            parts.append(f"{name} {v['version'] or 'missing'}{pin}")
    return ", ".join(parts)


def env(device: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "requested_device": device,
        "cpu": platform.processor() or platform.machine(), "executable": sys.executable,
        "packages": package_versions(),
    }  # fmt: skip
    if torch.cuda.is_available():
        out.update(
            gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            bf16=torch.cuda.is_bf16_supported(), arch_list=torch.cuda.get_arch_list(), gpu_count=torch.cuda.device_count(),
        )  # fmt: skip
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["nvidia_smi"] = f"unavailable ({exc})"
    return out


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(results: Path) -> dict[str, Any]:
    """gpu_check.json / gpu_check.txt from the step table and the JSON files of one gpu_check.sh run."""
    with open(results / "steps.tsv", newline="") as fh:
        steps = list(csv.DictReader(fh, delimiter="\t"))
    meta = _load(results / "meta.json") or {}
    data: dict[str, Any] = {"meta": meta, "env": _load(results / "env.json"), "steps": steps, "encoders": {}}
    lines = [f"wsi-mil GPU check ({meta.get('mode', '?')} mode), {meta.get('started', '')}", ""]
    e = data["env"] or {}
    lines.append(f"device: {e.get('gpu') or e.get('cpu')}; driver/nvidia-smi: {e.get('nvidia_smi', '-')}; torch "
                 f"{e.get('torch')} (CUDA {e.get('torch_cuda')}, archs {','.join(e.get('arch_list', []) or ['-'])})")  # fmt: skip
    if e.get("packages"):
        lines.append(f"ran with: {versions_line(e['packages'])}")
    if meta.get("python_from"):
        wheels = f"; {meta['wheels']} wheels from .whl installed" if meta.get("wheels") else ""
        lines.append(f"python: {e.get('executable') or meta.get('python')} ({meta['python_from']}{wheels}); "
                     f"PYTHONPATH {meta.get('pythonpath', '-')}")  # fmt: skip
    lines += ["", "steps (seconds, status):"]
    total = 0.0
    for s in steps:
        total += float(s["seconds"] or 0)
        lines.append(f"  {s['step']:<16} {float(s['seconds'] or 0):7.1f} s  {s['status']}{' (' + s['note'] + ')' if s['note'] else ''}")
    lines.append(f"  {'all steps':<16} {total:7.1f} s (budget {meta.get('budget_s', '?')} s)")
    pip_check = next((s for s in steps if s["step"] == "pip_check"), None)
    if pip_check and pip_check["status"] != "ok":
        try:
            found = (results / "logs" / "pip_check.log").read_text().splitlines()
        except OSError:
            found = []
        data["pip_check"] = found
        lines += ["", f"pip check of the image with the wheels ({len(found)} lines, logs/pip_check.log):"]
        lines += [f"  {x}" for x in found[:12]] + (["  ..."] if len(found) > 12 else [])
    for key in ("cnn", "vit"):
        label = f"{meta.get(key, key)} ({'weights: ' + str(meta.get(key + '_weights', '?'))})"
        fig = {"alone": _load(results / f"alone_{key}.json"), "cosine": _load(results / f"cosine_{key}.json"),
               "util": _load(results / f"util_{key}.json")}  # fmt: skip
        data["encoders"][label] = fig
        lines += ["", f"{label}:"]
        a = fig["alone"]
        if a:
            ee = a["end_to_end"]
            lines.append(f"  end to end {ee['tiles_per_s']:.1f} tiles/s ({ee['tiles']} tiles, {ee['slides_done']} slides, "
                         f"{ee['batch_s']:.1f} s batch phase; {ee['precision']}, batch {ee['batch_size']}, tiles read by "
                         f"{ee['loader']} x{ee['loader_workers']}{', random weights' if ee['random_init'] else ''})")  # fmt: skip
            lines.append(f"  encoder alone {a['encoder_alone_tiles_per_s']:.1f} tiles/s -> efficiency {a['efficiency']:.3f} "
                         "(target >= 0.9)")  # fmt: skip
            if "gap_s" in ee:
                g = ee["gap_s"]
                lines.append(f"  slide-boundary gap: median {g['median']:.3f} s, p95 {g['p95']:.3f} s over {g['n']} slides")
        else:
            lines.append("  no encoder-alone figure (see steps)")
        u = fig["util"]
        if u and u.get("samples", 1):
            for phase in ("batch_phase", "whole_step"):
                if phase in u:
                    p = u[phase]
                    lines.append(f"  GPU utilisation ({phase.replace('_', ' ')}): mean {p['util_mean']:.0f} %, p50 "
                                 f"{p['util_p50']:.0f} %, p90 {p['util_p90']:.0f} %; memory max {p['memory_max_mib']:.0f} MiB")  # fmt: skip
        c = fig["cosine"]
        if c:
            lines.append(f"  cosine to {c['reference']} over {c['tiles']} tiles ({len(c['slides'])} slides): min {c['min']:.5f}, "
                         f"mean {c['mean']:.6f} (target min >= 0.999; run at {c['run_precision']})")  # fmt: skip
    lines.append("")
    for name in ("train", "predict", "heatmap"):
        s = next((x for x in steps if x["step"] == name), None)
        if s:
            lines.append(f"{name}: {s['status']} in {float(s['seconds'] or 0):.1f} s{' (' + s['note'] + ')' if s['note'] else ''}")
        metrics = _load(results / "train_metrics.json") if name == "train" else None
        if metrics:  # a check that training ran, not a result: a few small slides, few epochs
            pooled = metrics.get("pooled_out_of_fold", {})
            data["train_metrics"] = pooled
            auc = (pooled.get("auc") or {}).get("value")
            lines.append(f"  pooled out-of-fold AUC {'-' if auc is None else f'{auc:.3f}'} over {pooled.get('n_slides', '?')} slides")
    (results / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("encoder-alone")
    a.add_argument("run", type=Path)
    a.add_argument("--tiles", type=int, default=2048, help="timed tiles (at least)")
    a.add_argument("--min-seconds", type=float, default=5.0)
    r = sub.add_parser("reference")
    r.add_argument("run", type=Path)
    r.add_argument("slides", type=Path)
    r.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("util")
    u.add_argument("csv", type=Path)
    u.add_argument("--run", type=Path, default=None)
    e = sub.add_parser("env")
    e.add_argument("--device", default="cuda")
    s = sub.add_parser("summary")
    s.add_argument("results", type=Path)
    for q in (a, r, u, e, s):
        q.add_argument("--json", type=Path, default=None, help="write here instead of stdout")
    args = p.parse_args(argv)
    if args.command == "encoder-alone":
        _emit(encoder_alone(args.run, args.tiles, args.min_seconds), args.json)
    elif args.command == "reference":
        _emit(reference(args.run, args.slides, args.out), args.json)
    elif args.command == "util":
        _emit(util(args.csv, args.run), args.json)
    elif args.command == "env":
        _emit(env(args.device), args.json)
    else:
        _emit(summary(args.results), args.json or args.results / "gpu_check.json")


if __name__ == "__main__":
    main()
