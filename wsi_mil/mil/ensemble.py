"""Temporal ensembling of the attention (the target alpha-tilde of the consistency cost L3).

``shared/method.md``: after each training epoch ``m``, for every training bag,
``A <- beta * A + (1 - beta) * alpha_epoch`` (the alpha of that epoch's training forward pass) and
``alpha_tilde = A / (1 - beta**(m + 1))``; alpha-tilde is a constant target during the next epoch. At
epoch 0 there is no target and ``omega = 0``; afterwards ``omega(m) = omega_max * exp(-5 (1 - min(m, R)/R)^2)``.

Storage is ragged: one float32 vector per bag key, in a fixed instance order (the bag's tile index).
Bias correction uses each tile's own update count ``u`` (``1 - beta**u``); when every tile of every bag
is seen every epoch, ``u = m + 1`` and this is exactly the formula above. With tile subsampling
(``max_instances``) only the tiles seen in an epoch are updated, and :meth:`TemporalEnsemble.target` for a
subset of tiles returns their corrected values renormalised to sum to 1 over that subset (the model's
alpha over the subset also sums to 1); tiles never seen yet take the mean of the seen ones.

Recorded values are staged during an epoch and committed by :meth:`TemporalEnsemble.end_epoch`, so a
target never changes within an epoch.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from wsi_mil.errors import CheckpointError, ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = ["TemporalEnsemble", "consistency_ramp"]


def consistency_ramp(epoch: int, omega_max: float, rampup_epochs: int) -> float:
    """``omega_max * exp(-5 * (1 - min(epoch, R) / R)**2)``; ``R = 0`` means no ramp (``omega_max``).

    This is the bare ramp; :meth:`TemporalEnsemble.weight` also forces ``omega = 0`` at epoch 0.
    """
    if epoch < 0:
        raise ConfigError(f"epoch must be >= 0, got {epoch}")
    if rampup_epochs <= 0:
        return float(omega_max)
    phase = 1.0 - min(epoch, rampup_epochs) / rampup_epochs
    return float(omega_max) * math.exp(-5.0 * phase * phase)


class TemporalEnsemble:
    """Per-bag exponential moving average of the attention, with bias correction and the omega ramp.

    Args:
        beta: EMA decay (0.6 in the paper).
        omega_max: maximum weight of the consistency cost (0 disables L3).
        rampup_epochs: R of the ramp.

    Attributes:
        epoch: the current epoch ``m`` (number of :meth:`end_epoch` calls so far).
    """

    def __init__(self, beta: float = 0.6, omega_max: float = 0.0, rampup_epochs: int = 0) -> None:
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"ema beta must be in [0, 1), got {beta}")
        if omega_max < 0:
            raise ConfigError(f"omega_max must be >= 0, got {omega_max}")
        if rampup_epochs < 0:
            raise ConfigError(f"rampup_epochs must be >= 0, got {rampup_epochs}")
        self.beta = float(beta)
        self.omega_max = float(omega_max)
        self.rampup_epochs = int(rampup_epochs)
        self.epoch = 0
        self._ema: dict[str, Tensor] = {}  # A, float32 [n_tiles]
        self._count: dict[str, Tensor] = {}  # updates per tile, int32 [n_tiles]
        self._staged: dict[str, tuple[Tensor, Tensor | None]] = {}

    # --- weights ----------------------------------------------------------------------------------
    def weight(self, epoch: int | None = None) -> float:
        """omega(m) for ``epoch`` (default: the current epoch); exactly 0 at epoch 0."""
        m = self.epoch if epoch is None else int(epoch)
        if m == 0:
            return 0.0
        return consistency_ramp(m, self.omega_max, self.rampup_epochs)

    # --- recording and targets ---------------------------------------------------------------------
    def record(self, key: str, attention: Tensor, tile_index: Tensor | None = None) -> None:
        """Stage this epoch's attention of bag ``key`` (detached, moved to CPU float32).

        ``tile_index`` gives the stored position of each value (``None``: the whole bag, in order).
        Committed by :meth:`end_epoch`; recording a bag twice in one epoch keeps the last values.
        """
        values = attention.detach().to("cpu", torch.float32).reshape(-1)
        index = None
        if tile_index is not None:
            index = tile_index.detach().to("cpu", torch.long).reshape(-1)
            if index.shape != values.shape:
                raise InputError(
                    f"bag {key!r}: {values.numel()} attention values but {index.numel()} tile indices"
                )
            if index.numel() and int(index.min()) < 0:
                raise InputError(f"bag {key!r}: negative tile index")
        elif key in self._ema and self._ema[key].numel() != values.numel():
            raise InputError(
                f"bag {key!r} had {self._ema[key].numel()} instances and now has {values.numel()}; "
                "pass tile_index when a bag is subsampled."
            )
        self._staged[key] = (values.clone(), index)

    def end_epoch(self) -> None:
        """Commit the staged attention of this epoch into the EMA and advance the epoch counter."""
        for key, (values, index) in self._staged.items():
            size = values.numel() if index is None else (int(index.max()) + 1 if index.numel() else 0)
            ema = self._ema.get(key)
            count = self._count.get(key)
            if ema is None or count is None:
                ema = torch.zeros(size, dtype=torch.float32)
                count = torch.zeros(size, dtype=torch.int32)
            elif ema.numel() < size:  # ragged growth when higher tile indices appear
                ema = torch.cat([ema, ema.new_zeros(size - ema.numel())])
                count = torch.cat([count, count.new_zeros(size - count.numel())])
            if index is None:
                ema.mul_(self.beta).add_(values, alpha=1.0 - self.beta)
                count.add_(1)
            else:
                ema[index] = self.beta * ema[index] + (1.0 - self.beta) * values
                count[index] += 1
            self._ema[key] = ema
            self._count[key] = count
        self._staged.clear()
        self.epoch += 1

    def target(self, key: str, tile_index: Tensor | None = None) -> Tensor | None:
        """alpha-tilde of bag ``key`` (CPU float32), or ``None`` at epoch 0 or for an unseen bag.

        With ``tile_index``, the values at those positions renormalised to sum to 1 (see module doc).
        """
        if self.epoch == 0 or key not in self._ema:
            return None
        ema, count = self._ema[key], self._count[key]
        if tile_index is None:
            if bool((count == 0).any()):
                return self._subset_target(ema, count)
            return ema / (1.0 - self.beta ** count.double()).float()
        index = tile_index.detach().to("cpu", torch.long).reshape(-1)
        if index.numel() and int(index.max()) >= ema.numel():  # tiles beyond the stored vector: unseen
            pad = int(index.max()) + 1 - ema.numel()
            ema = torch.cat([ema, ema.new_zeros(pad)])
            count = torch.cat([count, count.new_zeros(pad)])
        return self._subset_target(ema[index], count[index])

    def _subset_target(self, ema: Tensor, count: Tensor) -> Tensor | None:
        seen = count > 0
        if not bool(seen.any()):
            return None
        corrected = torch.zeros_like(ema)
        corrected[seen] = ema[seen] / (1.0 - self.beta ** count[seen].double()).float()
        if not bool(seen.all()):
            corrected[~seen] = corrected[seen].mean()
        return corrected / corrected.sum().clamp_min(torch.finfo(torch.float32).tiny)

    def __len__(self) -> int:
        return len(self._ema)

    def __contains__(self, key: object) -> bool:
        return key in self._ema

    # --- serialisation -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only (loads with ``torch.load(weights_only=True)``)."""
        if self._staged:
            logger.warning("temporal ensemble saved with %d staged bags not committed", len(self._staged))
        return {
            "beta": self.beta,
            "omega_max": self.omega_max,
            "rampup_epochs": self.rampup_epochs,
            "epoch": self.epoch,
            "keys": list(self._ema),
            "ema": [self._ema[k].clone() for k in self._ema],
            "count": [self._count[k].clone() for k in self._ema],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; staged (uncommitted) values are discarded."""
        try:
            keys, emas, counts = list(state["keys"]), list(state["ema"]), list(state["count"])
            if not len(keys) == len(emas) == len(counts):
                raise CheckpointError("temporal ensemble state has inconsistent lengths")
            self.beta = float(state["beta"])
            self.omega_max = float(state["omega_max"])
            self.rampup_epochs = int(state["rampup_epochs"])
            self.epoch = int(state["epoch"])
        except KeyError as exc:
            raise CheckpointError(f"temporal ensemble state lacks {exc}; was it saved by wsi-mil?") from exc
        self._ema = {str(k): e.to(torch.float32).clone() for k, e in zip(keys, emas, strict=True)}
        self._count = {str(k): c.to(torch.int32).clone() for k, c in zip(keys, counts, strict=True)}
        self._staged.clear()
