"""The loss-based attention objective, term by term (``shared/method.md``, "Objective").

Per bag ``i`` with label ``k``, attention ``alpha``, instance logits ``z_t`` and bag logits ``Z``::

    L_i = L1 + L2 + L3
    L1  = w_k * CE(Z, k)                               bag cross-entropy (w = class weights, default 1)
    L2  = lambda * sum_t alpha_t * CE(z_t, k)          recall regulariser, every bag, negatives too
    L3  = omega  * sum_t (alpha_t - alpha_tilde_t)^2   consistency with the temporal ensemble

The sums run over the **real** instances of the bag (padding is excluded) and ``alpha`` is never
detached, so L2 and L3 also train the attention (for ``loss_attention`` that is the instance MLP and the
shared classifier). A batch of bags is reduced with the **mean over bags** of ``L_i``, so the loss and
gradient of a padded batch equal the mean of the single-bag losses and gradients.

Sum form versus mean form: this is the paper's sum form. The authors' reference code averages L2 and L3
over the ``n`` instances of the bag instead, which equals the sum form with ``lambda / n`` and
``omega / n``. To reproduce a setting given in the mean form (e.g. MNIST-bags ``lambda = 2`` with bags of
about 10 instances) use ``lambda_sum = lambda_mean / n``. Because ``sum_t alpha_t = 1``, L2 in the sum form
is an attention-weighted mean cross-entropy and does not grow with the bag size.

Models without instance logits get ``recall = 0``; with ``lambda = 0`` the recall term is exactly 0 for
every model, and with ``omega = 0`` or no target the consistency term is exactly 0.

Which model trains with which terms, and with which settings, is decided in one place,
:func:`resolve_objective`: ``loss_attention`` trains with all three terms and the settings of
:class:`ObjectiveSettings` (whose defaults are the only defaults of lambda, omega_max, the ramp and beta in
wsi-mil; the trainer, ``wsi-mil train`` and ``configs/train.yaml`` take them from there); every other
model (``abmil``, ``mean``, ``max``) trains with the bag cross-entropy L1 alone, and giving it one of those
settings is a :class:`~wsi_mil.errors.ConfigError` that names the setting and the model.
:func:`mil_loss` itself only computes the terms it is given weights for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_mil.errors import ConfigError, InputError
from wsi_mil.mil.models import MILOutput, _upcast

__all__ = [
    "BAG_CE_ONLY",
    "OBJECTIVE_KEYS",
    "OBJECTIVE_MODELS",
    "LossTerms",
    "ObjectiveSettings",
    "mil_loss",
    "resolve_objective",
]

Reduction = Literal["mean", "sum", "none"]

#: The settings that exist only for the recall regulariser L2 and the consistency cost L3.
OBJECTIVE_KEYS = ("recall_weight", "consistency_max", "rampup_epochs", "ema_beta")

#: The models that train with L2 and L3 (and so take the settings in ``OBJECTIVE_KEYS``).
OBJECTIVE_MODELS = ("loss_attention",)


@dataclass(frozen=True)
class ObjectiveSettings:
    """The settings of the loss-attention objective; its defaults are wsi-mil's only defaults of them.

    Attributes:
        recall_weight: lambda of the recall regulariser L2 (sum form).
        consistency_max: omega_max of the consistency cost L3 (sum form); 0 switches L3 and the temporal
            ensemble off.
        rampup_epochs: R of the ramp ``omega(m) = omega_max * exp(-5 (1 - min(m, R)/R)^2)``.
        ema_beta: beta of the temporal ensemble of the attention (the paper's 0.6).
    """

    # Chosen on whole-slide evidence (benchmarks/wsi_ablation.py, README "Whole-slide ablation"): on four
    # cohorts of 48 slides (lesions of 13, 5, 2 and 1 % of the tissue), lambda in {0, 0.1, 0.5, 1, 2} x
    # omega_max in {0, 0.1, 1, 5}, the highest validation slide AUC averaged over the cohorts (the validation
    # part of each training fold only, 5 seeds x 5 folds) was lambda 1, omega_max 0. The consistency cost
    # (omega_max > 0) lowered the mean validation AUC at every lambda, so it is off by default and remains an option;
    # the ramp R = 10 and beta = 0.6 (the paper's) apply when it is on. Change them here only, with evidence.
    recall_weight: float = 1.0
    consistency_max: float = 0.0
    rampup_epochs: int = 10
    ema_beta: float = 0.6

    def __post_init__(self) -> None:
        if not (self.recall_weight >= 0 and math.isfinite(self.recall_weight)):
            raise ConfigError(f"recall_weight must be >= 0, got {self.recall_weight}")
        if not (self.consistency_max >= 0 and math.isfinite(self.consistency_max)):
            raise ConfigError(f"consistency_max must be >= 0, got {self.consistency_max}")
        if self.rampup_epochs < 0:
            raise ConfigError(f"rampup_epochs must be >= 0, got {self.rampup_epochs}")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"ema_beta must be in [0, 1), got {self.ema_beta}")

    @property
    def uses_ensemble(self) -> bool:
        """Whether L3 is on (then the trainer keeps the temporal ensemble of the attention)."""
        return self.consistency_max > 0


#: The objective of every model outside ``OBJECTIVE_MODELS``: the bag cross-entropy L1 alone.
BAG_CE_ONLY = ObjectiveSettings(recall_weight=0.0, consistency_max=0.0, rampup_epochs=0, ema_beta=0.0)


def resolve_objective(
    model_name: str,
    *,
    recall_weight: float | None = None,
    consistency_max: float | None = None,
    rampup_epochs: int | None = None,
    ema_beta: float | None = None,
    key_prefix: str = "",
) -> ObjectiveSettings:
    """The objective ``model_name`` trains with; ``None`` settings mean "the model's default".

    ``loss_attention``: :class:`ObjectiveSettings` with the given settings in place of its defaults.
    Any other model: :data:`BAG_CE_ONLY`.

    Raises:
        ConfigError: a setting is given for a model outside ``OBJECTIVE_MODELS`` (the message names the
            setting, as ``key_prefix + name``, and the model), or a setting is out of range.
    """
    values: tuple[Any, ...] = (recall_weight, consistency_max, rampup_epochs, ema_beta)
    given = {key: value for key, value in zip(OBJECTIVE_KEYS, values, strict=True) if value is not None}
    if model_name not in OBJECTIVE_MODELS:
        if given:
            keys = [f"{key_prefix}{key}" for key in given]
            owners = " and ".join(OBJECTIVE_MODELS)
            subject = f"{keys[0]} is an option" if len(keys) == 1 else f"{', '.join(keys)} are options"
            raise ConfigError(
                f"{subject} of {owners} only; model {model_name!r} trains with the bag cross-entropy alone "
                f"(no recall regulariser, no consistency cost): remove {'the key' if len(keys) == 1 else 'them'}."
            )
        return BAG_CE_ONLY
    try:
        return replace(ObjectiveSettings(), **given)
    except ConfigError as exc:
        raise ConfigError(f"{key_prefix}{exc}") from None


@dataclass(frozen=True)
class LossTerms:
    """The objective's terms, each already multiplied by its weight, and their total.

    Scalars for ``reduction="mean"``/``"sum"``; ``[B]`` per-bag values for ``reduction="none"`` on a batch
    (0-d for a single bag).
    ``total`` carries the gradient; call :meth:`as_floats` for logging.
    """

    total: Tensor
    bag_ce: Tensor
    recall: Tensor
    consistency: Tensor

    def as_floats(self) -> dict[str, float]:
        """Detached Python floats (scalar reductions only), e.g. for a history record."""
        return {
            "loss": float(self.total.detach()),
            "bag_ce": float(self.bag_ce.detach()),
            "recall": float(self.recall.detach()),
            "consistency": float(self.consistency.detach()),
        }


def mil_loss(
    output: MILOutput,
    labels: Tensor | int,
    *,
    recall_weight: float = 0.0,
    consistency_weight: float = 0.0,
    attention_target: Tensor | None = None,
    target_valid: Tensor | None = None,
    mask: Tensor | None = None,
    class_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> LossTerms:
    """Compute L1, L2, L3 and their total for one bag or a padded batch of bags.

    Args:
        output: a model's :class:`MILOutput` for one bag (``[K]``, ``[n, K]``, ``[n]``) or a batch
            (``[B, K]``, ``[B, n, K]``, ``[B, n]``).
        labels: the bag label (int or 0-d tensor) or ``[B]`` labels.
        recall_weight: lambda of L2 (sum form).
        consistency_weight: omega of L3 for this epoch (sum form), usually
            :meth:`~wsi_mil.mil.ensemble.TemporalEnsemble.weight`.
        attention_target: alpha-tilde, same shape as ``output.attention`` (values on padding are ignored).
            ``None`` means no target (first epoch): L3 is 0.
        target_valid: ``[B]`` booleans, the bags that have a target; others get L3 = 0.
        mask: ``[n]`` or ``[B, n]``, True on real instances (``None`` = no padding).
        class_weights: ``[K]`` weights of the bag cross-entropy per true class (``None`` = 1).
        reduction: ``"mean"`` over bags (default), ``"sum"`` over bags, or ``"none"`` (``[B]``).
    """
    if recall_weight < 0 or consistency_weight < 0:
        raise ConfigError("recall_weight and consistency_weight must be >= 0")
    bag_logits = _upcast(output.bag_logits)
    attention = _upcast(output.attention)
    instance_logits = output.instance_logits
    single = bag_logits.dim() == 1
    labels_t = torch.as_tensor(labels, device=bag_logits.device).long()
    if single:
        bag_logits = bag_logits.unsqueeze(0)
        attention = attention.unsqueeze(0)
        labels_t = labels_t.reshape(1)
        instance_logits = None if instance_logits is None else instance_logits.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
        attention_target = None if attention_target is None else attention_target.unsqueeze(0)
        target_valid = None if target_valid is None else target_valid.reshape(1)
    if labels_t.shape != bag_logits.shape[:1]:
        raise InputError(f"labels shape {tuple(labels_t.shape)} does not match {bag_logits.shape[0]} bags")

    bag_ce = F.cross_entropy(bag_logits, labels_t, reduction="none")  # [B]
    if class_weights is not None:
        bag_ce = bag_ce * class_weights.to(bag_ce)[labels_t]

    zero = bag_ce.new_zeros(bag_ce.shape)
    recall = zero
    if recall_weight > 0 and instance_logits is not None:
        n_classes = instance_logits.shape[-1]
        per_instance_ce = F.cross_entropy(
            _upcast(instance_logits).reshape(-1, n_classes),
            labels_t.unsqueeze(1).expand(attention.shape).reshape(-1),
            reduction="none",
        ).reshape(attention.shape)  # [B, n]
        weighted = attention * per_instance_ce
        if mask is not None:
            weighted = weighted.masked_fill(~mask, 0.0)
        recall = recall_weight * weighted.sum(dim=1)

    consistency = zero
    if consistency_weight > 0 and attention_target is not None:
        if attention_target.shape != attention.shape:
            raise InputError(
                f"attention target shape {tuple(attention_target.shape)} does not match attention "
                f"{tuple(attention.shape)}"
            )
        squared = (attention - attention_target.to(attention)).square()
        if mask is not None:
            squared = squared.masked_fill(~mask, 0.0)
        consistency = consistency_weight * squared.sum(dim=1)
        if target_valid is not None:
            valid = target_valid.to(device=consistency.device, dtype=torch.bool)
            consistency = torch.where(valid, consistency, torch.zeros_like(consistency))

    total = bag_ce + recall + consistency
    if reduction == "none":
        if single:  # one bag in, 0-d terms out
            return LossTerms(total[0], bag_ce[0], recall[0], consistency[0])
        return LossTerms(total=total, bag_ce=bag_ce, recall=recall, consistency=consistency)
    if reduction == "mean":
        return LossTerms(total.mean(), bag_ce.mean(), recall.mean(), consistency.mean())
    if reduction == "sum":
        return LossTerms(total.sum(), bag_ce.sum(), recall.sum(), consistency.sum())
    raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
