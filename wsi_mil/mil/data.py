"""Bags and bag datasets: the data interface of the trainer.

A bag dataset is anything with ``__len__`` and ``__getitem__(i) -> Bag`` (a ``Sequence``-like object).
The trainer only ever holds the bags of the current step, so a dataset can read each bag lazily from an
HDF5 file; :class:`InMemoryBagDataset` is the simple in-memory implementation used by tests and
benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from wsi_mil.errors import InputError

__all__ = ["Bag", "BagBatch", "BagDataset", "InMemoryBagDataset", "collate_bags"]


@dataclass(frozen=True)
class Bag:
    """One bag (a slide).

    Attributes:
        key: unique bag id (the slide id); keys the temporal ensemble.
        features: ``[n, d]`` float32 instance features (not copied by the trainer unless subsampled
            or padded into a batch).
        label: class index in ``[0, K)``, or ``None`` for unlabelled inference data.
        tile_index: ``[n]`` int64 position of each row in the bag's full, fixed tile order, when the
            dataset loads only some tiles; ``None`` means the rows are the whole bag in order.
    """

    key: str
    features: Tensor
    label: int | None
    tile_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 2:
            raise InputError(f"bag {self.key!r}: features must be [n, d], got {tuple(self.features.shape)}")
        if self.features.shape[0] == 0:
            raise InputError(f"bag {self.key!r} has no instances; drop it from the dataset.")
        if self.tile_index is not None and self.tile_index.shape != (self.features.shape[0],):
            raise InputError(
                f"bag {self.key!r}: tile_index shape {tuple(self.tile_index.shape)} does not match "
                f"{self.features.shape[0]} instances"
            )

    def __len__(self) -> int:
        return int(self.features.shape[0])


@runtime_checkable
class BagDataset(Protocol):
    """What the trainer needs from a dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Bag: ...


class InMemoryBagDataset(Sequence[Bag]):
    """A list of :class:`Bag` objects; keys must be unique."""

    def __init__(self, bags: Iterable[Bag]) -> None:
        self._bags = list(bags)
        keys = [bag.key for bag in self._bags]
        if len(set(keys)) != len(keys):
            raise InputError("bag keys must be unique (they key the temporal ensemble)")

    @classmethod
    def from_tensors(
        cls, features: Sequence[Tensor], labels: Sequence[int], keys: Sequence[str] | None = None
    ) -> InMemoryBagDataset:
        """Build from parallel lists of ``[n_i, d]`` tensors and labels (keys default to ``"0"``, ``"1"``...)."""
        if len(features) != len(labels):
            raise InputError(f"{len(features)} feature tensors but {len(labels)} labels")
        names = [str(i) for i in range(len(features))] if keys is None else list(keys)
        return cls(
            Bag(key=k, features=f, label=int(y)) for k, f, y in zip(names, features, labels, strict=True)
        )

    def __len__(self) -> int:
        return len(self._bags)

    def __getitem__(self, index: int) -> Bag:  # type: ignore[override]
        return self._bags[index]

    @property
    def labels(self) -> list[int | None]:
        return [bag.label for bag in self._bags]


@dataclass(frozen=True)
class BagBatch:
    """Bags stacked for one forward pass.

    ``features [B, n_max, d]``; ``mask [B, n_max]`` (True = real) or ``None`` when nothing is padded
    (always the case for one bag, which is a view without copy); ``tile_index``: per bag, the stored
    tile positions of its rows, or ``None`` when the rows are the whole bag in order.
    """

    keys: list[str]
    features: Tensor
    mask: Tensor | None
    labels: Tensor
    tile_index: list[Tensor | None]
    lengths: list[int]

    def to(self, device: torch.device | str) -> BagBatch:
        non_blocking = torch.device(device).type == "cuda"
        return BagBatch(
            keys=self.keys,
            features=self.features.to(device, non_blocking=non_blocking),
            mask=None if self.mask is None else self.mask.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            tile_index=self.tile_index,
            lengths=self.lengths,
        )


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pad bags to the longest one (zeros + mask). One bag, or equal lengths: no mask."""
    if not bags:
        raise InputError("cannot collate an empty list of bags")
    lengths = [len(bag) for bag in bags]
    dims = {bag.features.shape[1] for bag in bags}
    if len(dims) != 1:
        raise InputError(f"bags in one batch have different feature dimensions: {sorted(dims)}")
    labels = torch.tensor([-1 if bag.label is None else int(bag.label) for bag in bags], dtype=torch.long)
    if len(bags) == 1:
        features = bags[0].features.unsqueeze(0)
        mask = None
    elif len(set(lengths)) == 1:
        features = torch.stack([bag.features for bag in bags])
        mask = None
    else:
        n_max = max(lengths)
        first = bags[0].features
        features = first.new_zeros((len(bags), n_max, first.shape[1]))
        mask = torch.zeros((len(bags), n_max), dtype=torch.bool)
        for i, bag in enumerate(bags):
            features[i, : len(bag)] = bag.features
            mask[i, : len(bag)] = True
    return BagBatch(
        keys=[bag.key for bag in bags],
        features=features,
        mask=mask,
        labels=labels,
        tile_index=[bag.tile_index for bag in bags],
        lengths=lengths,
    )
