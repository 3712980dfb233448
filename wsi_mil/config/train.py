"""Validated configs of ``wsi-mil train`` and ``wsi-mil predict`` (defaults in ``configs/train.yaml``
and ``configs/predict.yaml``; unknown keys are rejected, R26).

Loss weights follow the paper's sum form (``shared/method.md``): ``recall_weight`` is lambda,
``consistency_max`` is omega_max, ramped up over ``rampup_epochs`` (0 at the first epoch). They and
``ema_beta`` are options of ``loss_attention`` only: ``null`` (the default) means the model's default,
which for ``loss_attention`` is :class:`wsi_mil.mil.losses.ObjectiveSettings` (their one source) and for
every other model no recall or consistency term; a value given for another model is refused at validation,
naming the key and the model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from wsi_mil.config import StrictModel

__all__ = [
    "LabelColumns",
    "LabelsConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "PredictConfig",
    "SplitsConfig",
    "TrainConfig",
]


class LabelColumns(StrictModel):
    """Columns of the label CSV."""

    id_col: str = Field("slide_id", min_length=1)
    label_col: str = Field("label", min_length=1)
    case_col: str = Field("case_id", min_length=1, description="absent column: each slide is its own case")


class LabelsConfig(LabelColumns):
    """Label CSV columns; ``classes``: the allowed labels in class-index order (``None``: the labels
    found, sorted; numerically when they are all integers)."""

    classes: list[str] | None = Field(None, min_length=2)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"classes must be unique, got {value}")
        return value


class ModelConfig(StrictModel):
    """The MIL model (a name of ``wsi_mil.mil.list_models()``) and its hyperparameters."""

    name: str = "loss_attention"
    hidden_dims: list[int] = Field(default_factory=lambda: [512])
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    standardize_features: bool = Field(
        False, description="z-score each feature with the mean and s.d. of each fold's training tiles (kept "
        "in the checkpoint; predict and heatmap apply them)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="extra model arguments, e.g. abmil: {attention_dim: 128, gated: true}"
    )


class OptimConfig(StrictModel):
    """Settings handed to the MIL core's ``TrainerConfig``."""

    epochs: int = Field(50, ge=1, le=10_000)
    batch_size: int = Field(1, ge=1, le=1024, description="bags per optimiser step (the paper: 1)")
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    # loss_attention only; None: the model's default (wsi_mil.mil.losses.ObjectiveSettings for loss_attention)
    recall_weight: float | None = Field(None, ge=0.0, description="lambda of the recall regulariser L2")
    consistency_max: float | None = Field(None, ge=0.0, description="omega_max of the consistency cost L3")
    rampup_epochs: int | None = Field(None, ge=0, description="epochs of the omega ramp-up")
    ema_beta: float | None = Field(None, ge=0.0, lt=1.0, description="decay of the attention's temporal ensemble")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="None, 'balanced' (inverse class frequency of each training part) or one per class"
    )
    max_instances: int | None = Field(
        None, ge=1, description="tiles read per training bag and step (random, sorted); None: all"
    )
    early_stopping_patience: int | None = Field(10, ge=1)
    monitor: Literal["val_loss", "val_bag_ce", "val_auc", "val_accuracy"] = "val_loss"
    min_delta: float = Field(0.0, ge=0.0)
    device: str = Field("auto", description="auto (cuda when available), cpu or cuda[:i]")
    amp_bf16: bool = False
    num_workers: int = Field(0, ge=0, le=64, description="bag-reading worker processes")
    deterministic: bool = False


class SplitsConfig(StrictModel):
    """Case-grouped, label-stratified k-fold; ``val_fraction`` of each training part (by case) is held
    out for validation (early stopping and model selection only)."""

    folds: int = Field(5, ge=2, le=100)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)


class MetricsConfig(StrictModel):
    n_bootstrap: int = Field(1000, ge=0, le=100_000, description="bootstrap resamples for the CIs (0: none)")
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)


class TrainConfig(StrictModel):
    """``wsi-mil train``."""

    seed: int = Field(0, ge=0)
    strict: bool = Field(False, description="unmatched slides (R18) and NaN/Inf bags (R16) are errors")
    check_finite: bool = Field(
        True, description="scan bags for NaN/Inf before training (one read pass; bags whose writer checked them are trusted)"
    )
    recheck: bool = Field(
        False, description="also scan the bags whose writer checked every value was finite (values_checked=finite)"
    )
    labels: LabelsConfig = LabelsConfig()
    model: ModelConfig = ModelConfig()
    splits: SplitsConfig = SplitsConfig()
    training: OptimConfig = OptimConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _recheck_needs_the_scan(self) -> TrainConfig:
        if self.recheck and not self.check_finite:
            raise ValueError("recheck: true scans every bag for NaN/Inf, but check_finite: false turns the scan off")
        return self

    @model_validator(mode="after")
    def _objective_settings_only_for_loss_attention(self) -> TrainConfig:
        opt = self.training
        if any(v is not None for v in (opt.recall_weight, opt.consistency_max, opt.rampup_epochs, opt.ema_beta)):
            from wsi_mil.mil import list_models  # torch: only when a setting is given
            from wsi_mil.mil.losses import resolve_objective

            if self.model.name in list_models():  # an unknown model is named by `wsi-mil train` itself
                resolve_objective(
                    self.model.name,
                    recall_weight=opt.recall_weight,
                    consistency_max=opt.consistency_max,
                    rampup_epochs=opt.rampup_epochs,
                    ema_beta=opt.ema_beta,
                    key_prefix="training.",
                )
        return self


class PredictConfig(StrictModel):
    """``wsi-mil predict``."""

    device: str = Field("auto", description="auto (cuda when available), cpu or cuda[:i]")
    strict: bool = Field(False, description="NaN/Inf bags are errors instead of skipped slides")
    ignore_slide_identity: bool = Field(
        False, description="a bag whose slide differs from the one the run recorded under its id is scored as that slide"
    )
    labels: LabelColumns = LabelColumns()
    metrics: MetricsConfig = MetricsConfig()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
