"""Training epoch time and peak RSS on a generated cohort read lazily from HDF5 (issue 5).

    .venv/bin/python benchmarks/train.py [--slides 500 --tiles 10000 --dim 1024] [--cache DIR] [--keep]

Writes ``slides`` feature files of ``tiles x dim`` (wsi-mil layout, float32, or float16 when the disk
lacks room for float32; the choice is printed) once into ``--cache``, then trains ``loss_attention``
and ``abmil`` for ``--epochs`` epochs each (80% train / 20% val, one bag per step, the default config
otherwise), each model in a fresh process so that its peak RSS (``ru_maxrss``) is its own. Reported
per epoch: wall seconds, process CPU seconds (robust to other load on a shared machine) and the
seconds spent reading bags. Epoch 0 of loss-attention has no consistency term (omega = 0), so the
comparison uses the last epoch. The generated files are deleted at the end unless ``--keep``.
Targets: loss-attention epoch time within 1.2x of abmil's; peak RSS < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def generate(folder: Path, n_slides: int, n_tiles: int, dim: int, dtype: str, seed: int = 0) -> float:
    """Write the cohort (slides alternate labels; positives hold 2% tiles shifted along one direction)."""
    from wsi_mil.store.bag_file import BagWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    coords = np.stack([np.arange(n_tiles) % 100, np.arange(n_tiles) // 100], axis=1).astype(np.int64) * 512
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n_slides):
        slide_id = f"bench{i:04d}"
        label = i % 2
        labels.append((slide_id, "tumor" if label else "normal"))
        dest = folder / f"{slide_id}.h5"
        if dest.is_file():
            continue
        x = rng.standard_normal((n_tiles, dim), dtype=np.float32)
        if label:
            x[: n_tiles // 50] += 2.0 * direction
        attrs = {
            "slide_id": slide_id, "encoder_name": "bench", "feature_dim": dim, "weights_sha256": "random",
            "mpp": 0.5, "tile_px": 256, "footprint_px": 512, "slide_mpp": 0.25, "wsi_mil_version": "bench",
        }
        with BagWriter(dest, dim, attrs, feature_dtype=dtype, chunk_rows=1024) as writer:
            writer.append(x, coords)
    with open(folder.parent / "labels.csv", "w") as fh:
        fh.write("slide_id,label\n" + "".join(f"{s},{lab}\n" for s, lab in labels))
    return time.perf_counter() - t0


def worker(model_name: str, folder: Path, epochs: int, threads: int) -> dict:
    """Train one model on the cohort; print a JSON line with per-epoch timings and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from wsi_mil.cohort.datasets import LazyBagDataset, discover_features, scan_bags
    from wsi_mil.config.train import TrainConfig
    from wsi_mil.mil import Trainer, TrainerCallback, TrainerConfig, create_model, seed_everything

    class TimedDataset(LazyBagDataset):
        read_s = 0.0

        def __getitem__(self, index):  # type: ignore[override]
            t = time.perf_counter()
            try:
                return super().__getitem__(index)
            finally:
                TimedDataset.read_s += time.perf_counter() - t

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_epoch_start(self, trainer, epoch, n_steps):  # type: ignore[override]
            self.t_wall, self.t_cpu, self.t_read = time.perf_counter(), time.process_time(), TimedDataset.read_s

        def on_epoch_end(self, trainer, record):  # type: ignore[override]
            self.rows.append(
                {
                    "epoch": int(record["epoch"]),
                    "wall_s": round(time.perf_counter() - self.t_wall, 2),
                    "cpu_s": round(time.process_time() - self.t_cpu, 2),
                    "read_s": round(TimedDataset.read_s - self.t_read, 2),
                    "train_loss": round(record["train_loss"], 4),
                    "train_consistency": record.get("train_consistency"),
                    "val_auc": record.get("val_auc"),
                }
            )

    defaults = TrainConfig()
    folder_info = discover_features(folder)
    scan = scan_bags(list(folder_info.sources.values()), check_finite=False, progress=False)
    ids = sorted(scan.infos)
    labels = {s: int(s[-4:]) % 2 for s in ids}
    n_val = len(ids) // 5
    train_ids, val_ids = ids[n_val:], ids[:n_val]

    def dataset(part: list[str]) -> TimedDataset:
        return TimedDataset([scan.infos[s].source for s in part], [labels[s] for s in part], n_tiles=[scan.infos[s].n_tiles for s in part])

    opt = defaults.training
    seed_everything(0)
    dim = scan.infos[ids[0]].spec.feature_dim
    model = create_model(model_name, dim, 2, hidden_dims=tuple(defaults.model.hidden_dims), dropout=defaults.model.dropout)
    clock = Clock()
    trainer = Trainer(
        model,
        TrainerConfig(
            epochs=epochs, lr=opt.lr, weight_decay=opt.weight_decay, recall_weight=opt.recall_weight,
            consistency_max=opt.consistency_max, rampup_epochs=opt.rampup_epochs, ema_beta=opt.ema_beta, device="cpu",
        ),
        [clock],
    )
    trainer.fit(dataset(train_ids), dataset(val_ids))
    return {
        "model": model_name,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "epochs": clock.rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_train_bench")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16"], default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.txt")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.cache / "features"
    if args.worker:
        print(json.dumps(worker(args.worker, folder, args.epochs, args.threads)))
        return

    need32_gb = args.slides * args.tiles * args.dim * 4 * 1.01 / 1e9
    args.cache.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.cache).free / 1e9
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if free_gb > need32_gb + 20 else "float16"
    lines = [
        f"# benchmarks/train.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f} at start",
        f"cohort: {args.slides} slides x {args.tiles} tiles x {args.dim} features, {dtype} HDF5 "
        f"({need32_gb / (1 if dtype == 'float32' else 2):.1f} GB; {free_gb:.0f} GB free before), in {folder}",
    ]
    print(lines[-1], flush=True)
    gen_s = generate(folder, args.slides, args.tiles, args.dim, dtype)
    lines.append(f"generation: {gen_s:.0f} s")
    results = {}
    try:
        for name in ("loss_attention", "abmil"):
            print(f"training {name} ...", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--cache", str(args.cache), "--epochs", str(args.epochs), "--threads", str(args.threads)],
                check=True, capture_output=True, text=True,
            )
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[name]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.cache, ignore_errors=True)
            lines.append(f"generated files deleted ({args.cache})")
    lines.append("")
    lines.append(f"{'model':<16}{'epoch':>6}{'wall s':>9}{'cpu s':>9}{'read s':>9}{'train loss':>12}{'peak RSS MB':>13}")
    for name, res in results.items():
        for row in res["epochs"]:
            lines.append(
                f"{name:<16}{row['epoch']:>6}{row['wall_s']:>9.1f}{row['cpu_s']:>9.1f}{row['read_s']:>9.1f}"
                f"{row['train_loss']:>12.4f}{res['peak_rss_mb']:>13.0f}"
            )
    la, ab = results["loss_attention"]["epochs"][-1], results["abmil"]["epochs"][-1]
    ratio_wall, ratio_cpu = la["wall_s"] / ab["wall_s"], la["cpu_s"] / ab["cpu_s"]
    peak = max(r["peak_rss_mb"] for r in results.values())
    lines += [
        "",
        f"last epoch (with the consistency term for loss_attention): loss_attention / abmil = {ratio_wall:.2f}x wall, "
        f"{ratio_cpu:.2f}x CPU time (target <= 1.2x): {'PASS' if ratio_cpu <= 1.2 else 'FAIL'}",
        f"peak RSS: {peak:.0f} MB (target < 4096 MB): {'PASS' if peak < 4096 else 'FAIL'}",
        f"load average at end: {os.getloadavg()[0]:.1f}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
