"""Multiple-instance learning: models (registry), the loss-attention objective, the temporal ensemble
and the training engine. See ``shared/method.md`` for the method, term by term."""

from wsi_mil.mil.data import Bag, BagBatch, BagDataset, InMemoryBagDataset, collate_bags
from wsi_mil.mil.ensemble import TemporalEnsemble, consistency_ramp
from wsi_mil.mil.losses import BAG_CE_ONLY, LossTerms, ObjectiveSettings, mil_loss, resolve_objective
from wsi_mil.mil.models import (
    ABMIL,
    LossAttentionMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    MILModel,
    MILOutput,
    create_model,
    list_models,
    register_model,
)
from wsi_mil.mil.trainer import (
    BagPrediction,
    FitResult,
    Trainer,
    TrainerCallback,
    TrainerConfig,
    TrainingError,
    classification_metrics,
    seed_everything,
)

__all__ = [
    "ABMIL",
    "BAG_CE_ONLY",
    "Bag",
    "BagBatch",
    "BagDataset",
    "BagPrediction",
    "FitResult",
    "InMemoryBagDataset",
    "LossAttentionMIL",
    "LossTerms",
    "MILModel",
    "MILOutput",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "ObjectiveSettings",
    "TemporalEnsemble",
    "Trainer",
    "TrainerCallback",
    "TrainerConfig",
    "TrainingError",
    "classification_metrics",
    "collate_bags",
    "consistency_ramp",
    "create_model",
    "list_models",
    "mil_loss",
    "register_model",
    "resolve_objective",
    "seed_everything",
]
