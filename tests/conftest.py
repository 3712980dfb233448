"""Shared fixtures: small pyramidal slides generated with tifffile (nothing large is committed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsi_mil.demo.pyramid import write_pyramid  # noqa: E402

TISSUE_RGB = (200, 120, 190)


def tissue_image(width: int, height: int, seed: int = 0, blobs: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """An RGB slide image with irregular pink/purple tissue on white glass, and its tissue mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(blobs):
        cx, cy = rng.integers(width // 4, 3 * width // 4), rng.integers(height // 4, 3 * height // 4)
        axes = (int(rng.integers(width // 10, width // 5)), int(rng.integers(height // 10, height // 5)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    img = np.full((height, width, 3), 243, np.uint8)
    noise = rng.normal(0, 12, (height, width, 3))
    tissue = np.clip(np.array(TISSUE_RGB, float) + noise, 0, 255).astype(np.uint8)
    img[mask > 0] = tissue[mask > 0]
    glass = np.clip(243 + rng.normal(0, 2, (height, width, 3)), 0, 255).astype(np.uint8)
    img[mask == 0] = glass[mask == 0]
    return img, mask.astype(bool)


SlideFactory = Callable[..., Path]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest, and much faster on a shared, busy CPU. A module uses it
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def make_slide(slide_dir: Path) -> SlideFactory:
    """``make_slide(name, fmt='tif', mpp=0.5, size=(2048, 1536), seed=0, blank=False)`` -> cached path."""
    cache: dict[tuple[object, ...], Path] = {}

    def factory(
        name: str = "slide",
        fmt: str = "tif",
        mpp: float | None = 0.5,
        size: tuple[int, int] = (2048, 1536),
        seed: int = 0,
        blank: bool = False,
        downsamples: tuple[int, ...] = (1, 4, 16),
    ) -> Path:
        key = (name, fmt, mpp, size, seed, blank, downsamples)
        if key not in cache:
            img, _ = tissue_image(*size, seed=seed)
            if blank:
                img = np.full_like(img, 244)
            cache[key] = write_pyramid(slide_dir / f"{name}.{fmt}", img, mpp=mpp, fmt=fmt, downsamples=downsamples)  # type: ignore[arg-type]
        return cache[key]

    return factory
