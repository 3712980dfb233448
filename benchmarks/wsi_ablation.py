"""Whole-slide evidence for the loss-attention defaults: lambda x omega_max against the baselines.

Cohorts of real tissue (``wsi-mil sample-data``, H&E lesions of another tissue kind) at lesion shares of
about 10 %, 3 %, 1 % and 0.5 % of the tissue, 48 slides each, extracted once and cached
(``_wsi_cohorts.py``). On each, with case-grouped, label-stratified 5-fold cross-validation repeated over 5
seeds (``wsi_mil.cohort.splits.make_splits``, whose validation part of each training fold is used for
selection only), every method is trained in lock-step (``_lockstep.py``: the library's own models, each
replica exactly as if trained alone) and evaluated out of fold:

* slide AUC: each slide scored by the model of its seed that held it out, AUC over the cohort, per seed;
* localisation: per tumour slide, the AUC of the attention (rank) and of each tile's own P(tumor) from the
  shared classifier against the lesion tiles (a tile is a lesion tile when a quarter of its footprint lies
  in a lesion polygon), averaged over the tumour slides with both kinds of tile, per seed;
* the validation slide AUC of each replica on its fold's validation part: the only thing used to choose.

Methods: ``loss_attention`` on the grid lambda in {0, 0.1, 0.5, 1, 2} x omega_max in {0, 0.1, 1, 5} (the
objective of ``shared/method.md``, sum form, ramp over 10 epochs, beta 0.6), ``abmil`` plain and gated,
``mean`` and ``max``, all with the same MLP (128 hidden units, dropout 0.25), Adam (lr 2e-4, weight decay
1e-5), one bag per step and the model after the last epoch (no epoch is chosen on any test fold).
Matmuls use torch's "medium" float32 precision (bf16 inputs, float32 accumulation). Both choices are for
time: 25 replicas of a 1280 -> 512 MLP take 194 ms a lock-step on this 2-core machine, 1280 -> 128 takes
23 ms (both at medium precision; 494 and 57 ms at full float32), and the full grid is 96 cells of
48 bags x 30 epochs, which must fit 90 minutes. ``wsi-mil train`` defaults to 512 hidden units.

The default (lambda, omega_max) is the grid point with the highest validation slide AUC averaged over
the cohorts (nested: only the validation part of each training fold decides, never a test fold); the
report gives every grid point's test figures too, and each model's curve as the lesions shrink. A
colour-only baseline (mean RGB per tile, logistic regression on the training slides' tiles labelled with
their slide's label, slide score the mean of its top 5 tile probabilities, the same folds) says how hard
each cohort is: a cohort counts as hard where it is far from perfect.

Finished cells (one method on one cohort, every seed and fold) are cached and reused by a rerun with the
same settings and code (``_cells.py``)::

    .venv/bin/python benchmarks/wsi_ablation.py                  # full run
    .venv/bin/python benchmarks/wsi_ablation.py --quick          # smoke test, under 3 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cells  # noqa: E402
from _lockstep import LockstepReplicas, keep_freed_memory  # noqa: E402
from _wsi_cohorts import CohortData, CohortSpec, prepare  # noqa: E402

from wsi_mil.cohort.splits import make_splits  # noqa: E402
from wsi_mil.mil import TemporalEnsemble, create_model, mil_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARES = (0.10, 0.03, 0.01, 0.005)
LAMBDAS = (0.0, 0.1, 0.5, 1.0, 2.0)
OMEGAS = (0.0, 0.1, 1.0, 5.0)
BASELINES = {"abmil": ("abmil", {}), "abmil_gated": ("abmil", {"gated": True}), "mean": ("mean", {}),
             "max": ("max", {})}  # fmt: skip
TOP_K = 5


@dataclass(frozen=True)
class Method:
    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    recall_weight: float = 0.0
    consistency_max: float = 0.0


def methods(lambdas: tuple[float, ...] = LAMBDAS, omegas: tuple[float, ...] = OMEGAS) -> list[Method]:
    grid = [Method(f"la_l{lam:g}_w{om:g}", "loss_attention", {}, lam, om) for lam in lambdas for om in omegas]
    return grid + [Method(name, model, kwargs) for name, (model, kwargs) in BASELINES.items()]


STD = {"standardize_features": True}
#: the chosen loss_attention and the baselines again, on features z-scored with each replica's training-part
#: tile mean and s.d. (as ``wsi-mil train --standardize-features`` does per fold); ``--standardized``
STANDARDIZED = (Method("la_l1_w0_std", "loss_attention", STD, 1.0, 0.0), Method("abmil_std", "abmil", STD),
                Method("mean_std", "mean", STD), Method("max_std", "max", STD))  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Cross-validation (seeds x folds), then the model and optimiser of every method."""

    seeds: int = 5
    folds: int = 5
    val_fraction: float = 0.2
    hidden_dims: tuple[int, ...] = (128,)
    dropout: float = 0.25
    epochs: int = 30
    lr: float = 2e-4
    weight_decay: float = 1e-5
    rampup_epochs: int = 10
    ema_beta: float = 0.6


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def _splits(data: CohortData, settings: Settings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[folds, n_bags] part codes of one seed: 0 train, 1 validation, 2 test."""
    folds = make_splits(data.slide_ids, data.cases, data.labels.tolist(), n_folds=settings.folds,
                        val_fraction=settings.val_fraction, seed=seed)  # fmt: skip
    index = {s: i for i, s in enumerate(data.slide_ids)}
    parts = np.zeros((settings.folds, data.n_bags), np.int8)
    for f in folds:
        parts[f.fold, [index[s] for s in f.val]] = 1
        parts[f.fold, [index[s] for s in f.test]] = 2
    return parts, np.asarray([next(f.fold for f in folds if s in f.test) for s in data.slide_ids])


def run_cell(data: CohortData, method: Method, settings: Settings) -> dict[str, list[float]]:
    """Every seed x fold model of ``method`` on one cohort, trained in lock-step; per-seed figures."""
    seeds, folds = settings.seeds, settings.folds
    n_rep = seeds * folds
    split = [_splits(data, settings, seed) for seed in range(seeds)]
    part = np.concatenate([p for p, _ in split])  # [R, n_bags], replica r = seed * folds + fold
    train_mask = torch.from_numpy(part == 0)
    # the lock-step engine takes no buffers: standardisation is applied to each replica's input here instead
    kwargs = {k: v for k, v in method.kwargs.items() if k != "standardize_features"}
    scaling = _training_statistics(data, part == 0) if method.kwargs.get("standardize_features") else None
    models = []
    for r in range(n_rep):
        torch.manual_seed(1000 * (r // folds) + r % folds)
        models.append(create_model(method.model, data.features.shape[1], 2, hidden_dims=settings.hidden_dims,
                                   dropout=settings.dropout, **kwargs))  # fmt: skip
    engine = LockstepReplicas(models, lr=settings.lr, weight_decay=settings.weight_decay)
    ensembles = [
        TemporalEnsemble(settings.ema_beta, method.consistency_max, settings.rampup_epochs) for _ in range(n_rep)
    ]
    features = torch.from_numpy(data.features)
    labels = torch.from_numpy(data.labels).long()
    rng = np.random.default_rng(0)
    use_l3 = method.consistency_max > 0
    for epoch in range(settings.epochs):
        weight = ensembles[0].weight(epoch) if use_l3 else 0.0
        for i in rng.permutation(data.n_bags):
            active = train_mask[:, i]
            if not bool(active.any()):
                continue
            x = features[data.bag(i)]
            if scaling is None:
                out = engine.forward(x, shared_input=True, train=True)
            else:
                out = engine.forward((x - scaling[0]) / scaling[1], shared_input=False, train=True)
            target = valid = None
            if use_l3 and weight > 0:
                known = [ensembles[r].target(str(i)) for r in range(n_rep)]
                valid = torch.tensor([t is not None for t in known])
                target = torch.stack([t if t is not None else torch.zeros(x.shape[0]) for t in known])
            terms = mil_loss(out, labels[i].expand(n_rep), recall_weight=method.recall_weight,
                             consistency_weight=weight, attention_target=target, target_valid=valid,
                             reduction="none")  # fmt: skip
            engine.step(terms.total, active)
            if use_l3:
                for r in np.flatnonzero(active.numpy()):
                    ensembles[r].record(str(i), out.attention[r].detach())
        if use_l3:
            for ens in ensembles:
                ens.end_epoch()
    # evaluation: every replica on every bag
    bag_p = np.zeros((n_rep, data.n_bags))
    att: list[np.ndarray] = []
    tile_p: list[np.ndarray] = []
    with torch.no_grad():
        for i in range(data.n_bags):
            x = features[data.bag(i)]
            if scaling is None:
                out = engine.forward(x, shared_input=True, train=False)
            else:
                out = engine.forward((x - scaling[0]) / scaling[1], shared_input=False, train=False)
            bag_p[:, i] = out.bag_logits.softmax(-1)[:, 1].numpy()
            att.append(out.attention.numpy())
            assert out.instance_logits is not None
            tile_p.append(out.instance_logits.softmax(-1)[..., 1].numpy())
    return _figures(data, split, bag_p, att, tile_p, settings)


def _training_statistics(data: CohortData, train: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, 1, d]`` mean and s.d. of the tiles of each replica's training part (``train [R, n_bags]``),
    as ``MILModel.fit_feature_standardization`` computes them (float64, population s.d., a constant feature
    only centred)."""
    tile_slide = np.repeat(np.arange(data.n_bags), np.diff(data.offsets))
    means, sds = [], []
    for rows in train:
        h = data.features[rows[tile_slide]].astype(np.float64)
        mean, sd = h.mean(0), h.std(0)
        means.append(mean)
        sds.append(np.where(sd > 1e-6 * np.maximum(np.abs(mean), 1.0), sd, 1.0))
    return (torch.from_numpy(np.stack(means)).float().unsqueeze(1),
            torch.from_numpy(np.stack(sds)).float().unsqueeze(1))  # fmt: skip


def _figures(data: CohortData, split: list[tuple[np.ndarray, np.ndarray]], bag_p: np.ndarray, att: list[np.ndarray],
             tile_p: list[np.ndarray], settings: Settings) -> dict[str, list[float]]:  # fmt: skip
    y = data.labels
    lesion = data.lesion_tile
    out: dict[str, list[float]] = {"slide_auc": [], "loc_attention_auc": [], "loc_tile_p_auc": [], "val_auc": []}
    for seed, (part, test_fold) in enumerate(split):
        rows = seed * settings.folds + test_fold  # the replica that held each slide out
        oof = bag_p[rows, np.arange(data.n_bags)]
        out["slide_auc"].append(_auc(y, oof))
        val = [_auc(y[part[f] == 1], bag_p[seed * settings.folds + f, part[f] == 1]) for f in range(settings.folds)]
        out["val_auc"].append(float(np.nanmean(val)) if np.isfinite(val).any() else float("nan"))
        loc_a, loc_p = [], []
        for i in np.flatnonzero(y == 1):
            truth = lesion[data.bag(i)]
            if 0 < truth.sum() < len(truth):
                loc_a.append(_auc(truth, att[i][rows[i]]))
                loc_p.append(_auc(truth, tile_p[i][rows[i]]))
        out["loc_attention_auc"].append(float(np.mean(loc_a)) if loc_a else float("nan"))
        out["loc_tile_p_auc"].append(float(np.mean(loc_p)) if loc_p else float("nan"))
    return out


def colour_baseline(data: CohortData, settings: Settings) -> dict[str, list[float]]:
    """Mean RGB per tile -> logistic regression on the training slides' tiles (slide labels), slide score
    the mean of its top-5 tile probabilities; the same folds as the models."""
    from sklearn.linear_model import LogisticRegression

    out: dict[str, list[float]] = {"slide_auc": [], "loc_tile_p_auc": []}
    tile_slide = np.repeat(np.arange(data.n_bags), np.diff(data.offsets))
    for seed in range(settings.seeds):
        part, test_fold = _splits(data, settings, seed)
        scores = np.zeros(data.n_bags)
        tile_scores = np.zeros(len(tile_slide))
        for f in range(settings.folds):
            train = part[f][tile_slide] == 0
            clf = LogisticRegression(max_iter=1000).fit(data.rgb[train] / 255.0, data.labels[tile_slide[train]])
            test = np.flatnonzero(test_fold == f)
            for i in test:
                p = clf.predict_proba(data.rgb[data.bag(i)] / 255.0)[:, 1]
                tile_scores[data.bag(i)] = p
                scores[i] = np.sort(p)[-TOP_K:].mean()
        out["slide_auc"].append(_auc(data.labels, scores))
        loc = [_auc(data.lesion_tile[data.bag(i)], tile_scores[data.bag(i)]) for i in np.flatnonzero(data.labels == 1)]
        loc = [v for v in loc if np.isfinite(v)]
        out["loc_tile_p_auc"].append(float(np.mean(loc)) if loc else float("nan"))
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)])
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def choose_default(results: dict[tuple[float, str], dict[str, list[float]]], shares: tuple[float, ...],
                   grid: list[Method]) -> Method:  # fmt: skip
    """The grid point with the highest validation slide AUC averaged over the cohorts."""
    def score(m: Method) -> float:
        return float(np.nanmean([np.nanmean(results[(s, m.name)]["val_auc"]) for s in shares]))

    return max((m for m in grid if m.model == "loss_attention"), key=score)


def format_report(results: dict[tuple[float, str], dict[str, list[float]]], colour: dict[float, dict[str, list[float]]],
                  shares: tuple[float, ...], all_methods: list[Method], chosen: Method, realised: dict[float, float],
                  header: str) -> str:  # fmt: skip
    def cell(values: list[float]) -> str:
        m, se = _mean_se(values)
        return f"{m:.3f}±{se:.3f}" if np.isfinite(m) else "   n/a     "

    lines = [header, "", "lesion share asked (realised: lesion tiles / tiles of tumour slides):  "
             + "  ".join(f"{s:g} ({realised[s]:.3f})" for s in shares), ""]  # fmt: skip
    for metric, title in (("slide_auc", "out-of-fold slide AUC"), ("loc_attention_auc", "localisation AUC, attention"),
                          ("loc_tile_p_auc", "localisation AUC, tile P(tumor)"), ("val_auc", "validation slide AUC (selection)")):  # fmt: skip
        lines.append(f"== {title} (mean ± s.e. over seeds)")
        lines.append(f"{'method':<16}" + "".join(f"{f'share {s:g}':>16}" for s in shares))
        if metric in ("slide_auc", "loc_tile_p_auc"):
            lines.append(f"{'colour only':<16}" + "".join(f"{cell(colour[s][metric]):>16}" for s in shares))
        for m in all_methods:
            mark = " *" if m.name == chosen.name else ""
            lines.append(f"{m.name + mark:<16}" + "".join(f"{cell(results[(s, m.name)][metric]):>16}" for s in shares))
        lines.append("")
    lines.append(f"* chosen on validation: {chosen.name} (lambda {chosen.recall_weight:g}, omega_max {chosen.consistency_max:g})")
    names = {m.name for m in all_methods}
    pairs = [(m.name.removesuffix("_std"), m.name) for m in all_methods if m.name.endswith("_std")]
    if pairs:
        lines += ["", "== standardised features (z-scored with each training part's tile mean and s.d.) vs raw: "
                  "validation slide AUC averaged over the cohorts (the selection rule)"]  # fmt: skip
        for raw, std in pairs:
            if raw in names:
                v = [float(np.nanmean([np.nanmean(results[(s, n)]["val_auc"]) for s in shares])) for n in (raw, std)]
                lines.append(f"{raw:<16} raw {v[0]:.4f}   standardised {v[1]:.4f}   ({v[1] - v[0]:+.4f})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: two small cohorts, 2 seeds, a 2 x 2 grid, 3 epochs")
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "results" / "wsi_cohorts",
                   help="cohorts, features and their arrays (large; not committed)")
    p.add_argument("--output", type=Path, default=None, help="write the report here too")
    p.add_argument("--threads", type=int, default=2)
    _cells.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("medium")
    keep_freed_memory()
    t0 = time.perf_counter()
    if args.quick:
        shares, settings = (0.1, 0.03), Settings(seeds=2, folds=3, epochs=3)
        specs = {s: CohortSpec(s, n_slides=12, scale=0.3) for s in shares}
        grid = methods((0.0, 0.5), (0.0, 1.0))
        extra = list(STANDARDIZED[:1])
    else:
        shares, settings = SHARES, Settings()
        specs = {s: CohortSpec(s) for s in shares}
        grid = methods()
        extra = list(STANDARDIZED)
    cells = _cells.folder(args)
    data = {s: prepare(specs[s], args.cache) for s in shares}
    print(f"[{time.perf_counter() - t0:6.0f} s] cohorts ready", file=sys.stderr, flush=True)
    colour = {s: colour_baseline(data[s], settings) for s in shares}
    results: dict[tuple[float, str], dict[str, list[float]]] = {}
    for s in shares:
        for m in grid + extra:
            key = _cells.cell_key(Path(__file__), f"{specs[s].tag}-{m.name}", specs[s], m, settings)
            hit = _cells.load(cells, key)
            if hit is None:
                start = time.perf_counter()
                hit = run_cell(data[s], m, settings)
                hit["seconds"] = [time.perf_counter() - start]
                _cells.save(cells, key, hit)
            results[(s, m.name)] = hit
            print(f"[{time.perf_counter() - t0:6.0f} s] share {s:g} {m.name:<16} slide AUC "
                  f"{np.nanmean(hit['slide_auc']):.3f}  loc {np.nanmean(hit['loc_attention_auc']):.3f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    chosen = choose_default(results, shares, grid)
    realised = {s: float(data[s].realised_share[data[s].labels == 1].mean()) for s in shares}
    header = (f"wsi_ablation: {len(shares)} cohorts x {len(grid)} methods, {settings.seeds} seeds x {settings.folds} "
              f"folds, {settings.epochs} epochs, {specs[shares[0]].n_slides} slides, lesions '{specs[shares[0]].lesion_kind}'; "
              f"{time.perf_counter() - t0:.0f} s wall, {args.threads} threads, {os.cpu_count()} CPUs seen")  # fmt: skip
    report = format_report(results, colour, shares, grid + extra, chosen, realised, header)
    print(report)
    if args.output:
        args.output.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
