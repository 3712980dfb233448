"""Shared helpers for the ``extract`` tests: small slide cohorts, fast encoder settings, a CLI runner.

Kept out of ``conftest.py`` (owned elsewhere); the fixtures built on these are in ``extract_fixtures``.
Every run uses ``test_convnext`` (timm's tiny test network, 64-d, 160 px input; its LayerNorms give
O(1) features that differ between tiles, unlike the tiny BatchNorm nets) with seeded random weights, 128 px tiles and batches of 8, so a slide takes well under a second on one core.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
from conftest import tissue_image

from wsi_mil.config import ExtractConfig
from wsi_mil.demo.pyramid import write_pyramid

FAST_ENCODER = "test_convnext"
#: CLI flags of the fast test setting (fp32: comparisons across processes are exact to ~1e-6)
FAST_ARGS = (
    "--encoder", FAST_ENCODER, "--random-init", "--device", "cpu", "--batch-size", "8", "--tile-px", "128",
    "--precision", "fp32",
)


def fast_config(**updates: Any) -> ExtractConfig:
    """The :data:`FAST_ARGS` setting as a config (``workers=0`` unless given)."""
    base: dict[str, Any] = {
        "encoder": FAST_ENCODER,
        "random_init": True,
        "device": "cpu",
        "batch_size": 8,
        "precision": "fp32",
        "workers": 0,
        "tiling": {"tile_px": 128},
    }
    base.update(updates)
    return ExtractConfig.model_validate(base)


def write_slide(
    path: Path,
    *,
    size: tuple[int, int] = (2048, 1536),
    mpp: float = 0.5,
    seed: int = 0,
    blank: bool = False,
    upscale: int = 1,
) -> Path:
    """A pyramidal ``.svs`` or ``.tif`` (by suffix) with pink tissue blobs on glass.

    ``upscale`` draws the image at ``size`` and enlarges it (a cheap way to a finer scan of the same
    tissue: ``size=(2048, 1536), mpp=0.25, upscale=2`` is the same tissue as ``mpp=0.5`` at 4096 x 3072 px).
    """
    img, _ = tissue_image(*size, seed=seed)
    if blank:
        img = np.full_like(img, 244)
    if upscale > 1:
        img = cv2.resize(img, (size[0] * upscale, size[1] * upscale), interpolation=cv2.INTER_LINEAR)
    fmt = "svs" if path.suffix == ".svs" else "tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pyramid(path, img, mpp=mpp, fmt=fmt)  # type: ignore[arg-type]


def make_cohort(folder: Path, n: int = 4, *, size: tuple[int, int] = (2048, 1536), start_seed: int = 1) -> list[Path]:
    """``n`` slides alternating ``.tif`` at 0.5 µm/px and ``.svs`` at 0.25 µm/px (read at level 0 and resized)."""
    paths = []
    for i in range(n):
        if i % 2 == 0:
            paths.append(write_slide(folder / f"s{i:02d}.tif", size=size, mpp=0.5, seed=start_seed + i))
        else:
            paths.append(write_slide(folder / f"s{i:02d}.svs", size=size, mpp=0.25, seed=start_seed + i, upscale=2))
    return paths


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # one torch thread: the tests share two cores, and OpenMP threads that spin on a busy machine are
    # many times slower than one
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_mil", *args]


def run_cli(*args: str, timeout: float = 180, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env or cli_env(), **kw)


def start_cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env(), **kw
    )


def wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[str] | None = None, poll: float = 0.005) -> bool:
    """Poll ``predicate()`` until true; False on timeout or when ``proc`` ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def group_members(pgid: int) -> list[str]:
    """Processes of process group ``pgid`` still running (zombies left out), as ``pid (name)``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        head, rest = text.rsplit(")", 1)
        fields = rest.split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{stat.parent.name} ({head.split('(', 1)[1]})")
    return found


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".tmp-*")) if folder.is_dir() else []


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def signal_mid_slide(
    proc: subprocess.Popen[str], features: Path, sig: int, settle_s: float = 0.05, timeout: float = 120
) -> str:
    """Send ``sig`` to ``proc`` while one of its bags is being written, and return that slide's id.

    A test slide takes a few tenths of a second, so a signal sent on seeing a temp file can land after
    the slide (or the whole run) has finished. Instead, ``settle_s`` after the temp file appears (past
    the file's creation, into the tile loop), the process is frozen (SIGSTOP) and the same temp file
    checked again; only then is ``sig`` sent, delivered when the process continues (SIGCONT).
    """
    import signal

    end = time.monotonic() + timeout
    while wait_for(lambda: temp_files(features), end - time.monotonic(), proc) and proc.poll() is None:
        first = temp_files(features)
        time.sleep(settle_s)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: _stopped(proc.pid), 10), "the process did not stop"
            writing = [p for p in first if p.exists()]
            if writing:
                os.kill(proc.pid, sig)
                return writing[0].name.split(".h5.")[0].removeprefix(".tmp-")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    raise AssertionError(f"no bag was being written to signal in: {proc.communicate()}")


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        return np.asarray(f["features"][:]), np.asarray(f["coords"][:]), dict(f.attrs)


def manifest(out: Path) -> dict[str, dict[str, str]]:
    import csv

    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def assert_same_features(out_a: Path, out_b: Path, ids: Sequence[str], atol: float = 1e-5) -> None:
    for sid in ids:
        fa, ca, _ = read_h5(out_a / "features" / f"{sid}.h5")
        fb, cb, _ = read_h5(out_b / "features" / f"{sid}.h5")
        np.testing.assert_array_equal(ca, cb, err_msg=sid)
        np.testing.assert_allclose(fa, fb, atol=atol, rtol=1e-5, err_msg=sid)
