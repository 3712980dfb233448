"""Benchmark: does the attention find the lesions? Tile-level AUC against ground-truth lesion polygons.

On the sample cohort (``wsi-mil sample-data``: real H&E with pasted IHC lesions, ``annotations/<id>.geojson``
lesion polygons in level-0 px), features are extracted, ``loss_attention`` and ``abmil`` are trained with
the same cross-validation, and every slide is scored **out of fold** by the fold model that did not see it.
A tile is a lesion tile when at least 50 % of its level-0 footprint lies inside a lesion polygon
(polygons rasterised with ``cv2.fillPoly`` at 1/8 of the tile footprint per cell; no shapely).

Reported per model:

* ``attention AUC per slide``: ROC AUC of α within each tumour slide (lesion tiles vs the others), mean
  and range over the tumour slides - the figure of the issue (target >= 0.9);
* ``attention AUC pooled``: ROC AUC of n·α over the tiles of all tumour slides together;
* ``P(tumor) AUC pooled``: ROC AUC of each tile's own P(tumor) over the tiles of all slides (normal
  slides' tiles are negatives);
* the slide-level out-of-fold AUC of the training run, for context.

Given only the cohort folder it runs every step through the library; the equivalent commands are::

    wsi-mil sample-data COHORT                                   # when COHORT holds no cohort.json
    wsi-mil extract COHORT/slides --out WORK/extract
    wsi-mil train WORK/extract --labels COHORT/labels.csv --out WORK/train_<model> --model <model> --seed 0
    # per fold k, on the bags of its test slides (symlinked into WORK/oof_<model>/fold_<k>/features,
    # with that fold's rows of labels.csv):
    wsi-mil predict WORK/oof_<model>/fold_<k>/features --checkpoint WORK/train_<model>/fold_<k> \\
        --labels WORK/oof_<model>/fold_<k>/labels.csv --out WORK/oof_<model>/fold_<k>/predict
    wsi-mil heatmap COHORT/slides --scores WORK/oof_<model>/fold_<k>/predict --out WORK/heatmaps_<model>   # --heatmaps

    .venv/bin/python benchmarks/localization.py COHORT [--work DIR] [--heatmaps] \\
        [--out benchmarks/results/localization.txt]

Steps whose outputs exist in WORK are reused (extract resumes; delete WORK/train_<model> to retrain).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("loss_attention", "abmil")
TARGET_AUC = 0.9
MIN_OVERLAP = 0.5
CELLS_PER_TILE = 8


# --- ground truth ---------------------------------------------------------------------------------------
def lesion_polygons(path: Path) -> list[np.ndarray]:
    """Exterior rings (level-0 px) of the Polygon / MultiPolygon features of a GeoJSON file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rings: list[np.ndarray] = []
    for feature in data.get("features", []):
        geom = feature.get("geometry") or {}
        polys = [geom["coordinates"]] if geom.get("type") == "Polygon" else geom.get("coordinates", [])
        if geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        for poly in polys:
            rings.append(np.asarray(poly[0], np.float64))  # holes: none in the sample cohort
    return rings


def lesion_fraction(coords: np.ndarray, footprint_px: float, rings: list[np.ndarray]) -> np.ndarray:
    """Share of each tile's level-0 footprint inside the lesion polygons (coarse rasterisation)."""
    import cv2

    n = coords.shape[0]
    if n == 0 or not rings:
        return np.zeros(n)
    cell = footprint_px / CELLS_PER_TILE  # level-0 px per raster cell
    x_max = float(max(coords[:, 0].max() + footprint_px, max(r[:, 0].max() for r in rings)))
    y_max = float(max(coords[:, 1].max() + footprint_px, max(r[:, 1].max() for r in rings)))
    w, h = int(math.ceil(x_max / cell)) + 2, int(math.ceil(y_max / cell)) + 2
    mask = np.zeros((h, w), np.uint8)
    # cell (i, j) counts as lesion when its centre is inside: vertices in cell units minus half a cell,
    # with 4 fractional bits (shift=4) so that the polygon is not snapped to the cell grid
    pts = [np.round((r / cell - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2) for r in rings]
    cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    integral = cv2.integral(mask, sdepth=cv2.CV_64F)
    x0 = np.clip(np.round(coords[:, 0] / cell).astype(int), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / cell).astype(int), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + footprint_px) / cell).astype(int), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + footprint_px) / cell).astype(int), 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return np.asarray(inside / area)


# --- pipeline -------------------------------------------------------------------------------------------
def ensure_cohort(cohort: Path) -> None:
    if (cohort / "cohort.json").exists():
        return
    from wsi_mil.demo.cohort import build_sample_cohort

    print(f"building the sample cohort in {cohort} (wsi-mil sample-data)", flush=True)
    build_sample_cohort(cohort)


def extract(cohort: Path, work: Path) -> Path:
    from wsi_mil.runs.extract import run_extract
    from wsi_mil.runs.slide_loop import discover_slides

    out = work / "extract"
    t = time.perf_counter()
    summary = run_extract(discover_slides(cohort / "slides"), out, progress=False)
    print(f"extract: {summary.text()} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def train(features: Path, labels: Path, work: Path, model: str, seed: int) -> Path:
    from wsi_mil.config import load_config
    from wsi_mil.config.train import TrainConfig
    from wsi_mil.runs.train import run_train

    out = work / f"train_{model}"
    if (out / "metrics.json").exists():
        return out
    cfg = load_config(TrainConfig, None, {"model.name": model, "seed": seed, "training.device": "cpu"})
    t = time.perf_counter()
    run_train(features, labels, out, cfg, progress=False)
    print(f"train {model}: {time.perf_counter() - t:.0f} s", flush=True)
    return out


def predict_out_of_fold(features: Path, labels: Path, run: Path, work: Path, model: str) -> list[Path]:
    """Predict each fold's test slides with that fold's checkpoint; return the predict output folders."""
    from wsi_mil.runs.predict import run_predict

    by_fold: dict[str, list[str]] = {}
    with open(run / "splits.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "test":
                by_fold.setdefault(row["fold"], []).append(row["slide_id"])
    bag_dir = features / "features" if (features / "features").is_dir() else features
    outs = []
    for fold, ids in sorted(by_fold.items()):
        folder = work / f"oof_{model}" / f"fold_{fold}"
        feats = folder / "features"
        feats.mkdir(parents=True, exist_ok=True)
        for sid in ids:
            link = feats / f"{sid}.h5"
            if not link.exists():
                link.symlink_to((bag_dir / f"{sid}.h5").resolve())
        fold_labels = folder / "labels.csv"  # this fold's rows only (predict warns about labelled slides it lacks)
        with open(labels, newline="", encoding="utf-8-sig") as src, open(fold_labels, "w", newline="", encoding="utf-8") as dst:
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
            writer.writeheader()
            writer.writerows(r for r in reader if r["slide_id"] in set(ids))
        predict_dir = folder / "predict"
        run_predict(feats, [run / f"fold_{fold}"], predict_dir, labels_csv=fold_labels, progress=False)
        outs.append(predict_dir)
    return outs


# --- metrics --------------------------------------------------------------------------------------------
def evaluate(cohort: Path, predict_dirs: list[Path]) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from wsi_mil.store.score_file import find_scores, load_scores

    per_slide: dict[str, float] = {}
    pooled_att: list[np.ndarray] = []
    pooled_lab: list[np.ndarray] = []
    prob_all: list[np.ndarray] = []
    lab_all: list[np.ndarray] = []
    n_lesion_tiles = n_tiles = 0
    for pdir in predict_dirs:
        for sid, path in find_scores(pdir).items():
            s = load_scores(path)
            rings = lesion_polygons(cohort / "annotations" / f"{sid}.geojson")
            is_lesion = lesion_fraction(s.coords, s.footprint_px, rings) >= MIN_OVERLAP
            k = s.class_names.index("tumor")
            prob_all.append(s.instance_probabilities[:, k])
            lab_all.append(is_lesion)
            n_tiles += s.n_tiles
            n_lesion_tiles += int(is_lesion.sum())
            if s.label == "tumor" and 0 < is_lesion.sum() < s.n_tiles:
                per_slide[sid] = float(roc_auc_score(is_lesion, s.attention))
                pooled_att.append(s.attention * s.n_tiles)
                pooled_lab.append(is_lesion)
    aucs = np.array(list(per_slide.values()))
    return {
        "per_slide": per_slide,
        "auc_per_slide_mean": float(aucs.mean()) if aucs.size else math.nan,
        "auc_per_slide_min": float(aucs.min()) if aucs.size else math.nan,
        "auc_per_slide_max": float(aucs.max()) if aucs.size else math.nan,
        "auc_pooled_attention": float(roc_auc_score(np.concatenate(pooled_lab), np.concatenate(pooled_att)))
        if pooled_lab else math.nan,
        "auc_pooled_probability": float(roc_auc_score(np.concatenate(lab_all), np.concatenate(prob_all)))
        if lab_all and np.concatenate(lab_all).any() else math.nan,
        "n_tumor_slides": len(per_slide),
        "n_tiles": n_tiles,
        "n_lesion_tiles": n_lesion_tiles,
    }


def slide_auc(run: Path) -> str:
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "n/a"
    pooled = metrics.get("pooled_out_of_fold") or {}
    auc = pooled.get("auc") if isinstance(pooled, dict) else None
    if isinstance(auc, dict):
        return f"{auc.get('value', auc.get('estimate', math.nan)):.3f}"
    return f"{auc:.3f}" if isinstance(auc, float) else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cohort", type=Path, help="sample cohort folder (built when it holds no cohort.json)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default COHORT/../localization_work)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heatmaps", action="store_true", help="also render the out-of-fold heatmaps per model")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cohort = args.cohort.resolve()
    work = (args.work or cohort.parent / "localization_work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ensure_cohort(cohort)
    features = extract(cohort, work)
    labels = cohort / "labels.csv"
    results = {}
    for model in args.models:
        run = train(features, labels, work, model, args.seed)
        predict_dirs = predict_out_of_fold(features, labels, run, work, model)
        results[model] = {**evaluate(cohort, predict_dirs), "slide_auc": slide_auc(run)}
        if args.heatmaps:
            from wsi_mil.runs.heatmap import run_heatmap
            from wsi_mil.runs.slide_loop import discover_slides

            slides = discover_slides(cohort / "slides")
            for pdir in predict_dirs:
                ids = set(p.stem for p in (pdir / "scores").glob("*.h5"))
                run_heatmap([p for p in slides if p.stem in ids], pdir, work / f"heatmaps_{model}", progress=False)
    lines = [
        "# wsi-mil benchmark: lesion localisation by tile scores, out of fold (benchmarks/localization.py)",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}  {platform.machine()}  "
        f"cpus available: {len(os.sched_getaffinity(0))}  total {time.perf_counter() - t0:.0f} s",
        f"# cohort {cohort}; lesion tile: >= {MIN_OVERLAP:.0%} of its footprint inside a lesion polygon",
        f"{'model':<16} {'att AUC/slide mean [min, max]':>30} {'att AUC pooled':>15} {'P(tumor) AUC':>13} "
        f"{'tumour slides':>13} {'tiles':>7} {'lesion':>7} {'slide AUC (OOF)':>16}",
    ]
    for model, r in results.items():
        lines.append(
            f"{model:<16} {r['auc_per_slide_mean']:>12.3f} [{r['auc_per_slide_min']:.3f}, {r['auc_per_slide_max']:.3f}]"
            f" {r['auc_pooled_attention']:>15.3f} {r['auc_pooled_probability']:>13.3f} {r['n_tumor_slides']:>13}"
            f" {r['n_tiles']:>7} {r['n_lesion_tiles']:>7} {r['slide_auc']:>16}"
        )
    for model, r in results.items():
        lines.append(f"per slide ({model}): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["per_slide"].items())))
    la = results.get("loss_attention")
    if la is not None:
        met = la["auc_per_slide_mean"] >= TARGET_AUC
        lines.append(f"target: loss_attention attention AUC per slide >= {TARGET_AUC}: {'MET' if met else 'NOT MET'}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
