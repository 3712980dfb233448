"""The training engine: one bag per optimiser step (or padded mini-batches), the loss-attention
objective with its temporal ensemble, early stopping on validation data, prediction for heatmaps.

Usage (what ``wsi-mil train`` does with lazily loaded bags)::

    seed_everything(0)
    model = create_model("loss_attention", in_dim=1024, n_classes=2)
    trainer = Trainer(model, TrainerConfig(epochs=50, early_stopping_patience=10))
    result = trainer.fit(train_bags, val_bags)       # restores the best validation state
    predictions = trainer.predict(test_bags)         # bag probs, attention, tile probs per bag

The library never prints: it logs and calls :class:`TrainerCallback` hooks (a CLI's progress bars, files).

Mini-batches: with ``batch_size = B > 1`` bags are zero-padded to the longest bag with a mask; the
padded instances get attention 0 and add nothing to any loss term, so the batch loss and its gradient
equal the **mean over the B bags** of the single-bag losses and gradients (tested). One optimiser step
is taken per batch, so ``batch_size = B`` follows the paper's one-bag-per-step schedule only for B = 1.

One module because the fit loop, its callbacks, early stopping and prediction share the
trainer's state (model, optimiser, temporal ensemble); models and losses are separate modules.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from wsi_mil.errors import CheckpointError, ConfigError, InputError, WsiMilError
from wsi_mil.mil.data import Bag, BagBatch, BagDataset, collate_bags
from wsi_mil.mil.ensemble import TemporalEnsemble
from wsi_mil.mil.losses import OBJECTIVE_KEYS, LossTerms, ObjectiveSettings, mil_loss, resolve_objective
from wsi_mil.mil.models import MILModel, MILOutput

logger = logging.getLogger(__name__)

__all__ = [
    "BagPrediction",
    "FitResult",
    "Trainer",
    "TrainerCallback",
    "TrainerConfig",
    "TrainingError",
    "seed_everything",
]

Monitor = Literal["val_loss", "val_bag_ce", "val_auc", "val_accuracy"]
_MAXIMISE = {"val_auc", "val_accuracy"}


class TrainingError(WsiMilError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA). Call it before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainerConfig:
    """Training settings (validated; invalid values raise :class:`~wsi_mil.errors.ConfigError`).

    ``recall_weight`` (lambda), ``consistency_max`` (omega_max, ramped over ``rampup_epochs``, 0 at the
    first epoch) and ``ema_beta`` are options of ``loss_attention`` only (sum form, :mod:`~wsi_mil.mil.losses`);
    ``None`` is the model's default: :class:`~wsi_mil.mil.losses.ObjectiveSettings`, as in ``wsi-mil train``,
    for ``loss_attention``, no such term for other models (the :class:`Trainer` refuses them there).
    ``max_instances`` subsamples that many tiles per bag and training step (``None``: all tiles);
    validation and prediction always use every tile. ``monitor`` picks the best epoch and drives early
    stopping; ``val_loss`` is ``bag_ce + recall`` on the validation bags (they have no consistency target).
    ``amp_bf16`` runs the instance MLP under bf16 autocast; the classifier, attention and losses stay
    float32. ``seed`` seeds the bag order, tile subsampling and, at the start of a fresh :meth:`Trainer.fit`,
    torch's global RNG (dropout); build the model after :func:`seed_everything` for a reproducible start.
    ``deterministic`` switches on ``torch.use_deterministic_algorithms`` in ``fit``; ``num_workers > 0``
    loads bags in DataLoader worker processes (lazy HDF5 datasets).
    """

    epochs: int = 50
    batch_size: int = 1
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip_norm: float | None = None
    recall_weight: float | None = None
    consistency_max: float | None = None
    rampup_epochs: int | None = None
    ema_beta: float | None = None
    class_weights: tuple[float, ...] | None = None
    max_instances: int | None = None
    early_stopping_patience: int | None = None
    monitor: Monitor = "val_loss"
    min_delta: float = 0.0
    restore_best: bool = True
    seed: int = 0
    deterministic: bool = False
    device: str = "cpu"
    amp_bf16: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(
            self.optimizer in ("adam", "adamw"),
            f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}",
        )
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}",
        )
        ObjectiveSettings(**{k: getattr(self, k) for k in OBJECTIVE_KEYS if getattr(self, k) is not None})  # ranges
        need(
            self.max_instances is None or self.max_instances >= 1,
            f"max_instances must be >= 1 or None, got {self.max_instances}",
        )
        need(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience}",
        )
        need(
            self.monitor in ("val_loss", "val_bag_ce", "val_auc", "val_accuracy"),
            f"monitor must be one of val_loss, val_bag_ce, val_auc, val_accuracy; got {self.monitor!r}",
        )
        need(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(
            self.class_weights is None or all(w > 0 for w in self.class_weights),
            "class_weights must all be > 0",
        )
        try:
            device_type = torch.device(self.device).type
        except RuntimeError as exc:
            raise ConfigError(f"invalid device {self.device!r}: use 'cpu' or 'cuda[:i]'") from exc
        need(device_type in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda[:i]', got {self.device!r}")


class TrainerCallback:
    """Hooks called by :class:`Trainer`; override what you need. Set ``trainer.stop_requested = True``
    in a hook to stop after the current epoch."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch of :meth:`Trainer.fit`."""

    def on_epoch_start(self, trainer: Trainer, epoch: int, n_steps: int) -> None:
        """Before each epoch; ``n_steps`` optimiser steps follow."""

    def on_batch_end(self, trainer: Trainer, step: int, n_bags: int) -> None:
        """After each optimiser step (``step`` counts from 1; ``n_bags`` bags in this step)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        """After each epoch with its history record (also in ``trainer.history``)."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """After training, once the best state is restored."""


@dataclass(frozen=True)
class FitResult:
    """Summary of :meth:`Trainer.fit`; ``best_epoch`` is ``None`` without validation data."""

    history: list[dict[str, float]]
    best_epoch: int | None
    best_metric: float | None
    monitor: str
    stopped_early: bool
    epochs_run: int


@dataclass(frozen=True)
class BagPrediction:
    """Per-bag outputs for reports and heatmaps (NumPy, CPU): ``bag_probabilities [K]``; ``attention [n]``
    (sums to 1); ``instance_probabilities [n, K]`` (softmax of each tile's own logits) or ``None``;
    ``tile_index [n]`` as in the input bag."""

    key: str
    label: int | None
    bag_probabilities: np.ndarray
    attention: np.ndarray
    instance_probabilities: np.ndarray | None
    tile_index: np.ndarray | None = None


@dataclass
class _Accumulator:
    """Bag-weighted sums of the loss terms, kept on the device until the epoch ends."""

    n_bags: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)

    def add(self, terms: LossTerms, n_bags: int) -> None:
        for name, value in (
            ("loss", terms.total),
            ("bag_ce", terms.bag_ce),
            ("recall", terms.recall),
            ("consistency", terms.consistency),
        ):
            weighted = value.detach() * n_bags
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.n_bags += n_bags

    def means(self, prefix: str) -> dict[str, float]:
        if self.n_bags == 0:
            return {}
        return {f"{prefix}{name}": float(total) / self.n_bags for name, total in self.sums.items()}


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy and AUC (binary: of class 1; multi-class: macro one-vs-rest); AUC NaN when undefined."""
    from sklearn.metrics import roc_auc_score  # heavy import, only when metrics are needed

    accuracy = float((probabilities.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
    auc = float("nan")
    if len(np.unique(labels)) > 1:
        try:
            if probabilities.shape[1] == 2:
                auc = float(roc_auc_score(labels, probabilities[:, 1]))
            else:
                auc = float(
                    roc_auc_score(
                        labels, probabilities, multi_class="ovr", labels=list(range(probabilities.shape[1]))
                    )
                )
        except ValueError as exc:
            logger.debug("AUC undefined: %s", exc)
    return {"auc": auc, "accuracy": accuracy}


class Trainer:
    """Train a :class:`~wsi_mil.mil.models.MILModel` on a bag dataset (see the module docstring).

    Args:
        model: any registered MIL model (moved to ``config.device``).
        config: :class:`TrainerConfig`.
        callbacks: :class:`TrainerCallback` objects, called in order.

    ``objective``: the resolved :class:`~wsi_mil.mil.losses.ObjectiveSettings` (``ConfigError`` for one set
    for a model other than ``loss_attention``)."""

    def __init__(
        self,
        model: MILModel,
        config: TrainerConfig | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.config = config or TrainerConfig()
        cfg = self.config
        self.objective = resolve_objective(model.name, **{key: getattr(cfg, key) for key in OBJECTIVE_KEYS})
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use device='cpu'.")
        if cfg.class_weights is not None and len(cfg.class_weights) != model.n_classes:
            raise ConfigError(
                f"{len(cfg.class_weights)} class weights given for a model with {model.n_classes} classes"
            )
        self.model = model.to(self.device)
        optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_cls(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        obj = self.objective
        self.ensemble = TemporalEnsemble(obj.ema_beta, obj.consistency_max, obj.rampup_epochs)
        self.callbacks = list(callbacks)
        self.history: list[dict[str, float]] = []
        self.epoch = 0
        self.stop_requested = False
        self.best_epoch: int | None = None
        self.best_metric: float | None = None
        self._best_state: dict[str, Tensor] | None = None
        self._bad_epochs = 0
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._seeded = False
        self._class_weights = (
            None
            if cfg.class_weights is None
            else torch.tensor(cfg.class_weights, dtype=torch.float32, device=self.device)
        )

    # --- public API -------------------------------------------------------------------------------
    def fit(self, train: BagDataset, val: BagDataset | None = None) -> FitResult:
        """Train until ``config.epochs`` (or early stopping); resumes from ``self.epoch``.

        With ``val``: validation metrics every epoch, the best state on ``config.monitor`` is kept and
        restored at the end (``config.restore_best``), and training stops early after
        ``config.early_stopping_patience`` epochs without improvement.
        """
        cfg = self.config
        if len(train) == 0:
            raise InputError("the training set has no bags")
        if cfg.early_stopping_patience is not None and val is None:
            raise ConfigError("early stopping needs a validation set; pass val= or unset the patience.")
        if not self._seeded and self.epoch == 0:
            torch.manual_seed(cfg.seed)  # dropout and any other global-RNG draw during training
            self._seeded = True
        if self.model.standardizes_features and self.epoch == 0:  # training bags only, before any step
            n_tiles = self.model.fit_feature_standardization(train[i].features for i in range(len(train)))
            logger.info("features standardised on the %d tiles of %d training bags", n_tiles, len(train))
        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            if self.device.type == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
                raise ConfigError(
                    "deterministic mode on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment "
                    "before start-up; export it or turn deterministic off."
                )
            torch.use_deterministic_algorithms(True)
        stopped_early = False
        self.stop_requested = False
        try:
            for callback in self.callbacks:
                callback.on_fit_start(self)
            while self.epoch < cfg.epochs:
                record = self._run_epoch(train, val)
                self.history.append(record)
                logger.debug(  # one line per epoch: callbacks put it in a progress bar or a file
                    "epoch %d: %s",
                    int(record["epoch"]),
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"),
                )
                for callback in self.callbacks:
                    callback.on_epoch_end(self, record)
                patience = cfg.early_stopping_patience
                if val is not None and patience is not None and self._bad_epochs >= patience:
                    stopped_early = True
                    logger.info(
                        "early stopping after epoch %d (best epoch %s)", self.epoch - 1, self.best_epoch
                    )
                    break
                if self.stop_requested:
                    logger.info("stop requested by a callback after epoch %d", self.epoch - 1)
                    break
        finally:
            if cfg.deterministic:
                torch.use_deterministic_algorithms(previous_deterministic)
        if val is not None and cfg.restore_best and self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        result = FitResult(
            history=list(self.history),
            best_epoch=self.best_epoch,
            best_metric=self.best_metric,
            monitor=cfg.monitor,
            stopped_early=stopped_early,
            epochs_run=len(self.history),
        )
        for callback in self.callbacks:
            callback.on_fit_end(self, result)
        return result

    def evaluate(self, dataset: BagDataset) -> dict[str, float]:
        """``loss`` (= bag_ce + recall), ``bag_ce``, ``recall``, ``auc``, ``accuracy``; eval mode."""
        accumulator = _Accumulator()
        labels: list[int] = []
        probabilities: list[np.ndarray] = []
        for bag, output in self._inference(dataset):
            if bag.label is None:
                raise InputError(f"bag {bag.key!r} has no label; evaluate() needs labelled bags")
            terms = mil_loss(
                output,
                bag.label,
                recall_weight=self.objective.recall_weight,
                class_weights=self._class_weights,
            )
            accumulator.add(terms, 1)
            labels.append(int(bag.label))
            probabilities.append(output.bag_probabilities().cpu().numpy())
        if not labels:
            raise InputError("cannot evaluate an empty dataset")
        means = accumulator.means("")
        metrics = {
            "loss": means["bag_ce"] + means["recall"],
            "bag_ce": means["bag_ce"],
            "recall": means["recall"],
        }
        metrics.update(classification_metrics(np.asarray(labels), np.stack(probabilities)))
        return metrics

    def predict(self, dataset: BagDataset, *, return_instances: bool = True) -> list[BagPrediction]:
        """Per bag: bag probabilities, attention and (``return_instances``) tile probabilities."""
        predictions = []
        for bag, output in self._inference(dataset):
            instance_probs = output.instance_probabilities() if return_instances else None
            predictions.append(
                BagPrediction(
                    key=bag.key,
                    label=bag.label,
                    bag_probabilities=output.bag_probabilities().cpu().numpy(),
                    attention=output.attention.float().cpu().numpy(),
                    instance_probabilities=None if instance_probs is None else instance_probs.cpu().numpy(),
                    tile_index=None if bag.tile_index is None else bag.tile_index.cpu().numpy(),
                )
            )
        return predictions

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimiser, ensemble, history, best state, RNG states."""
        return {
            "config": asdict(self.config),
            "objective": asdict(self.objective),
            "model_hparams": dict(self.model.hparams),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ensemble": self.ensemble.state_dict(),
            "epoch": self.epoch,
            "history": [dict(r) for r in self.history],
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "best_state": self._best_state,
            "bad_epochs": self._bad_epochs,
            "generator": self._generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the model must have the same hparams) to resume training."""
        try:
            if dict(state["model_hparams"]) != dict(self.model.hparams):
                raise CheckpointError(
                    f"checkpoint model {state['model_hparams']} differs from {self.model.hparams}; "
                    "rebuild the model with create_model(**hparams) from the checkpoint."
                )
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.ensemble.load_state_dict(state["ensemble"])
            self.epoch = int(state["epoch"])
            self.history = [dict(r) for r in state["history"]]
            self.best_epoch = state["best_epoch"]
            self.best_metric = state["best_metric"]
            self._best_state = state["best_state"]
            self._bad_epochs = int(state["bad_epochs"])
            self._generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        except KeyError as exc:
            raise CheckpointError(
                f"trainer state lacks {exc}; was it saved by Trainer.state_dict()?"
            ) from exc
        self._seeded = True

    # --- internals --------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp_bf16)

    def _batches(self, dataset: BagDataset, indices: list[int], batch_size: int) -> Iterator[list[Bag]]:
        chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        if self.config.num_workers == 0:
            for chunk in chunks:
                yield [dataset[i] for i in chunk]
            return
        loader: torch.utils.data.DataLoader[Bag] = torch.utils.data.DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_sampler=chunks,
            collate_fn=list,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        yield from loader

    def _subsample(self, bag: Bag) -> tuple[Bag, Tensor | None]:
        """Random ``max_instances`` rows (kept in order); returns the bag and its stored tile positions."""
        limit = self.config.max_instances
        if limit is None or len(bag) <= limit:
            return bag, bag.tile_index
        rows = torch.randperm(len(bag), generator=self._generator)[:limit].sort().values
        tiles = rows if bag.tile_index is None else bag.tile_index[rows]
        return Bag(key=bag.key, features=bag.features[rows], label=bag.label, tile_index=tiles), tiles

    def _targets(self, batch: BagBatch, tiles: list[Tensor | None]) -> tuple[Tensor | None, Tensor | None]:
        """alpha-tilde as a ``[B, n_max]`` tensor (0 on padding) and the ``[B]`` bags that have one."""
        found = [self.ensemble.target(key, tile) for key, tile in zip(batch.keys, tiles, strict=True)]
        if all(t is None for t in found):
            return None, None
        target = torch.zeros(batch.features.shape[:2], dtype=torch.float32)
        valid = torch.zeros(len(found), dtype=torch.bool)
        for i, values in enumerate(found):
            if values is not None:
                if values.numel() != batch.lengths[i]:
                    raise InputError(
                        f"bag {batch.keys[i]!r} has {batch.lengths[i]} instances but its stored attention has "
                        f"{values.numel()}; give the bag a tile_index or keep its instances fixed."
                    )
                target[i, : batch.lengths[i]] = values
                valid[i] = True
        return target.to(self.device), valid.to(self.device)

    def _run_epoch(self, train: BagDataset, val: BagDataset | None) -> dict[str, float]:
        cfg = self.config
        start_s = time.perf_counter()
        epoch = self.epoch
        omega = self.ensemble.weight(epoch)
        use_ensemble = self.objective.uses_ensemble
        order = torch.randperm(len(train), generator=self._generator).tolist()
        n_steps = math.ceil(len(order) / cfg.batch_size)
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch, n_steps)
        self.model.train()
        accumulator = _Accumulator()
        for step, raw_bags in enumerate(self._batches(train, order, cfg.batch_size), start=1):
            bags, tiles = [], []
            for raw in raw_bags:
                if raw.label is None:
                    raise InputError(f"training bag {raw.key!r} has no label")
                bag, tile = self._subsample(raw)
                bags.append(bag)
                tiles.append(tile)
            batch = collate_bags(bags).to(self.device)
            target, valid = self._targets(batch, tiles) if use_ensemble and omega > 0 else (None, None)
            with self._autocast():
                output = self.model(batch.features, batch.mask)
            terms = mil_loss(
                output,
                batch.labels,
                recall_weight=self.objective.recall_weight,
                consistency_weight=omega,
                attention_target=target,
                target_valid=valid,
                mask=batch.mask,
                class_weights=self._class_weights,
            )
            if not bool(torch.isfinite(terms.total)):
                raise TrainingError(
                    f"the loss became {float(terms.total.detach())} at epoch {epoch}, step {step} (bags {batch.keys}); "
                    "lower the learning rate, set grad_clip_norm, or check the features for NaN."
                )
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
            self.optimizer.step()
            accumulator.add(terms, len(bags))
            if use_ensemble:
                self._record_attention(batch, output, tiles)
            for callback in self.callbacks:
                callback.on_batch_end(self, step, len(bags))
        if use_ensemble:
            self.ensemble.end_epoch()
        record: dict[str, float] = {"epoch": float(epoch)}
        record.update(accumulator.means("train_"))
        record["consistency_weight"] = omega
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if val is not None:
            record.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
            self._update_best(record[cfg.monitor], epoch)
        self.epoch += 1
        record["epoch_seconds"] = time.perf_counter() - start_s
        return record

    def _record_attention(self, batch: BagBatch, output: MILOutput, tiles: list[Tensor | None]) -> None:
        attention = output.attention.detach()
        if attention.dim() == 1:
            attention = attention.unsqueeze(0)
        for i, key in enumerate(batch.keys):
            self.ensemble.record(key, attention[i, : batch.lengths[i]], tiles[i])

    def _update_best(self, value: float, epoch: int) -> None:
        cfg = self.config
        improved = False
        if math.isfinite(value):
            if self.best_metric is None:
                improved = True
            elif cfg.monitor in _MAXIMISE:
                improved = value > self.best_metric + cfg.min_delta
            else:
                improved = value < self.best_metric - cfg.min_delta
        if improved:
            self.best_metric = value
            self.best_epoch = epoch
            self._best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
            self._bad_epochs = 0
        else:
            self._bad_epochs += 1

    def _inference(self, dataset: BagDataset) -> Iterator[tuple[Bag, MILOutput]]:
        was_training = self.model.training
        self.model.eval()
        try:
            for bags in self._batches(dataset, list(range(len(dataset))), 1):
                bag = bags[0]
                features = bag.features.to(self.device, non_blocking=self.device.type == "cuda")
                with torch.inference_mode(), self._autocast():
                    output = self.model(features)
                yield bag, output
        finally:
            self.model.train(was_training)
