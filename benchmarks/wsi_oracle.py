"""Why the MIL models of the whole-slide ablation break at small lesion shares, and the ablation's curves.

* Oracle: a tile classifier trained *with the lesion labels* on the same cached features (logistic
  regression, class-balanced, C 0.1; 5 folds by slide, which here is by case: one slide per case; 3 seeds):
  its out-of-fold tile AUC for lesion tiles, and the slide AUC of the mean of each slide's top-3 tile
  probabilities. It says whether the features hold the lesion at all, apart from learning it from slide labels.
* ``--probe``: the chosen loss-attention (lambda 1, omega_max 0) on the 2 % cohort with one change each to
  the ablation's training (features standardised with the cohort's mean and s.d. (no labels used), lr 1e-3,
  100 epochs): 2 seeds x 5 folds, the ablation's own ``run_cell``. Not part of the choice of defaults.
* ``--curves``: ``results/wsi_ablation.png`` from the ablation's stored cells (no training): out-of-fold
  slide AUC and localisation AUC per model as the lesions shrink.

    .venv/bin/python benchmarks/wsi_oracle.py [--probe] [--curves]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cells  # noqa: E402
import wsi_ablation as W  # noqa: E402
from _wsi_cohorts import CohortSpec, prepare  # noqa: E402

CACHE = W.REPO / "benchmarks" / "results" / "wsi_cohorts"
CURVE_METHODS = ("la_l1_w0", "la_l0_w0", "la_l0.5_w5", "abmil", "abmil_gated", "max", "mean", "la_l1_w0_std", "abmil_std")


def oracle(data: W.CohortData, seeds: int = 3) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    lesion = data.lesion_tile.astype(int)
    tile_slide = np.repeat(np.arange(data.n_bags), np.diff(data.offsets))
    tile_auc, slide_auc = [], []
    for seed in range(seeds):
        tile_p, slide_p = np.zeros(len(lesion)), np.zeros(data.n_bags)
        for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(data.n_bags), data.labels):
            rows = np.isin(tile_slide, train)
            clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit(data.features[rows], lesion[rows])
            for i in test:
                p = clf.predict_proba(data.features[data.bag(i)])[:, 1]
                tile_p[data.bag(i)] = p
                slide_p[i] = np.sort(p)[-3:].mean()
        tile_auc.append(roc_auc_score(lesion, tile_p))
        slide_auc.append(roc_auc_score(data.labels, slide_p))
    return float(np.mean(tile_auc)), float(np.mean(slide_auc))


def probe(data: W.CohortData) -> list[str]:
    chosen = W.Method("la_l1_w0", "loss_attention", {}, 1.0, 0.0)
    base = W.Settings(seeds=2)
    mu, sd = data.features.mean(0), data.features.std(0) + 1e-6
    standardised = dataclasses.replace(data, features=((data.features - mu) / sd).astype(np.float32))
    variants = {
        "as in the ablation": (data, base),
        "features standardised": (standardised, base),
        "lr 1e-3": (data, dataclasses.replace(base, lr=1e-3)),
        "100 epochs": (data, dataclasses.replace(base, epochs=100)),
    }
    lines = []
    for name, (d, settings) in variants.items():
        t0 = time.perf_counter()
        r = W.run_cell(d, chosen, settings)
        lines.append(f"{name:<24} slide AUC {np.nanmean(r['slide_auc']):.3f}  validation AUC {np.nanmean(r['val_auc']):.3f}  "
                     f"attention loc. {np.nanmean(r['loc_attention_auc']):.3f}  tile P loc. {np.nanmean(r['loc_tile_p_auc']):.3f}"
                     f"  ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        print(lines[-1], flush=True)
    return lines


def curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, grid = W.Settings(), {m.name: m for m in (*W.methods(), *W.STANDARDIZED)}
    realised = {0.10: 0.128, 0.03: 0.046, 0.01: 0.020, 0.005: 0.012}  # from the ablation's report
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for i, name in enumerate(CURVE_METHODS):
        rows = []
        for share in W.SHARES:
            spec = CohortSpec(share)
            key = _cells.cell_key(Path(W.__file__), f"{spec.tag}-{name}", spec, grid[name], settings)
            cell = _cells.load(_cells.DEFAULT_DIR, key)
            if cell is None:
                raise SystemExit(f"no stored cell for {name} at share {share}: run benchmarks/wsi_ablation.py first")
            rows.append(cell)
        x = [100 * realised[s] for s in W.SHARES]
        for ax, metric in zip(axes, ("slide_auc", "loc_attention_auc", "loc_tile_p_auc"), strict=True):
            if metric == "loc_attention_auc" and name in ("max", "mean"):
                continue
            mean = [np.nanmean(c[metric]) for c in rows]
            se = [np.nanstd(c[metric], ddof=1) / np.sqrt(len(c[metric])) for c in rows]
            label = name.replace("la_l", "loss-att. λ").replace("_w", ", ω ").replace("_std", ", standardised")
            ax.errorbar(x, mean, yerr=se, marker="o", capsize=3, label=label, linewidth=2.5 if name == "la_l1_w0" else 1.2,
                        linestyle="--" if name.endswith("_std") else "-", color=f"C{i}")  # fmt: skip
    for ax, title in zip(axes, ("out-of-fold slide AUC", "localisation AUC, attention", "localisation AUC, tile P(tumour)"), strict=True):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([1.2, 2, 4.6, 13], ["1.2", "2.0", "4.6", "13"])
        ax.set_xlabel("lesion tiles, % of the tiles of tumour slides")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(title)
        ax.set_ylim(0.3, 1.02)
    axes[0].axhline(0.9, color="red", linewidth=0.8, linestyle="--")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Whole-slide ablation: 48 slides per cohort, 5 seeds x 5 folds, mean ± s.e. (benchmarks/wsi_ablation.py)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probe", action="store_true", help="also retrain the chosen model with one change each (2 % cohort)")
    p.add_argument("--curves", action="store_true", help="only draw results/wsi_ablation.png from the stored cells")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if args.curves:
        curves(W.REPO / "benchmarks" / "results" / "wsi_ablation.png")
        return 0
    lines = ["wsi_oracle: tiles classified with the lesion labels (an upper bound for learning from slide labels)"]
    for share in W.SHARES:
        data = prepare(CohortSpec(share), CACHE)
        tile_auc, slide_auc = oracle(data)
        n_lesion = int(data.lesion_tile.sum())
        lines.append(f"share {share:<6g} lesion tiles {n_lesion:5d} of {len(data.lesion_tile):6d}  oracle tile AUC {tile_auc:.3f}"
                     f"  slide AUC (top-3 tiles) {slide_auc:.3f}")  # fmt: skip
        print(lines[-1], flush=True)
    if args.probe:
        lines.append("")
        lines.append("probe: loss_attention lambda 1, omega_max 0 on the 2 % cohort (asked 1 %), 2 seeds x 5 folds")
        print(lines[-1], flush=True)
        torch_threads()
        lines += probe(prepare(CohortSpec(0.01), CACHE))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    return 0


def torch_threads() -> None:
    import torch

    torch.set_num_threads(2)
    torch.set_float32_matmul_precision("medium")


if __name__ == "__main__":
    raise SystemExit(main())
