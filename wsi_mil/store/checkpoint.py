"""Self-describing MIL checkpoints: safetensors weights plus a JSON sidecar.

A checkpoint is a folder (``RUN/fold_<k>/``) holding

``model.safetensors``
    the model's ``state_dict`` (no pickle anywhere);
``model.json``
    written after the weights, so its presence marks a complete checkpoint::

        {"format": "wsi-mil-mil-checkpoint", "format_version": 1,
         "model": {"name": "loss_attention", "hparams": {"name": ..., "in_dim": 1024, "n_classes": 2, ...}},
         "classes": ["normal", "tumor"],                 # class index -> name
         "feature_spec": {"encoder_name": ..., "feature_dim": 1024, "mpp": 0.5, "tile_px": 256,
                          "weights_sha256": ..., "wsi_mil_version": ...,
                          "pooling": "cls" | "cls+mean" | "avg" | null},    # of the training features
         "weights_file": "model.safetensors", "weights_sha256": "<sha256 of that file>",
         "wsi_mil_version": "<of the trainer>", "training": {...fold, best epoch, monitor...}}

Weights in a ``.pt``/``.pth`` file (with a sidecar beside it) are loaded only with
``torch.load(weights_only=True)`` (R23): a file that carries any pickled object other than tensors is
refused and nothing in it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsi_mil import __version__
from wsi_mil.errors import CheckpointError, ConfigError
from wsi_mil.mil.models import MILModel, create_model
from wsi_mil.store import atomic_path, atomic_write_json
from wsi_mil.store.bag_file import FeatureSpec

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "SIDECAR_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "load_checkpoint",
    "resolve_checkpoints",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "wsi-mil-mil-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
SIDECAR_NAME = "model.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, CPU) and its sidecar."""

    model: MILModel
    meta: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta["classes"]]

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.from_json(self.meta["feature_spec"])

    @property
    def model_name(self) -> str:
        return str(self.meta["model"]["name"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    folder: str | os.PathLike[str],
    model: MILModel,
    classes: Sequence[str],
    feature_spec: FeatureSpec,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``folder`` (both atomically); returns the sidecar."""
    from safetensors.torch import save_file

    if len(classes) != model.n_classes:
        raise CheckpointError(f"{len(classes)} class names for a model with {model.n_classes} classes")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": f"wsi-mil {__version__}"})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": model.hparams["name"], "hparams": dict(model.hparams)},
        "classes": [str(c) for c in classes],
        "feature_spec": feature_spec.to_json(),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": _sha256(weights),
        "wsi_mil_version": __version__,
        "training": dict(training or {}),
    }
    return atomic_write_json(out / SIDECAR_NAME, meta)


def _sidecar_for(path: Path) -> Path:
    if path.is_dir():
        return path / SIDECAR_NAME
    if path.suffix.lower() == ".json":
        return path
    beside = path.with_suffix(".json")
    return beside if beside.is_file() else path.parent / SIDECAR_NAME


def resolve_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Sidecar paths for each argument: a ``model.json``/``model.safetensors``/``.pt`` file, a fold
    folder holding ``model.json``, or a training run folder (all its ``fold_*/model.json``).

    Raises:
        CheckpointError: a path that holds no checkpoint.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not (p / SIDECAR_NAME).is_file():
            folds = sorted(p.glob(f"fold_*/{SIDECAR_NAME}"), key=lambda q: (len(q.parent.name), q.parent.name))
            if not folds:
                raise CheckpointError(
                    f"{p} holds no checkpoint: expected {SIDECAR_NAME} + {WEIGHTS_NAME}, or fold_*/ folders of a "
                    "`wsi-mil train` run."
                )
            found.extend(folds)
        elif p.exists():
            sidecar = _sidecar_for(p)
            if not sidecar.is_file():
                raise CheckpointError(
                    f"{p}: no sidecar {sidecar.name} beside it; wsi-mil needs the model name, classes and feature "
                    "spec that `wsi-mil train` writes next to the weights."
                )
            found.append(sidecar)
        else:
            raise CheckpointError(f"checkpoint {p} does not exist.")
    unique: list[Path] = []
    for s in found:
        if s.resolve() not in {u.resolve() for u in unique}:
            unique.append(s)
    return unique


def _load_state(weights: Path) -> dict[str, torch.Tensor]:
    suffix = weights.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(weights), device="cpu"))
        except Exception as exc:
            raise CheckpointError(f"{weights}: unreadable safetensors file ({exc}).") from exc
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{weights}: refused to load (weights_only=True): it carries pickled objects other than tensors, "
            f"which could run code. Re-save only the state_dict, ideally as safetensors. Detail: {exc}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{weights}: unreadable checkpoint ({type(exc).__name__}: {exc}).") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{weights}: expected a state_dict of tensors, found {type(obj).__name__}.")
    return dict(obj)


def load_checkpoint(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> Checkpoint:
    """Load a checkpoint by its sidecar, weights file or folder; the model is rebuilt from the sidecar.

    Raises:
        CheckpointError: missing or malformed sidecar, weights that do not match its checksum or the
            model, an unsafe ``.pt`` file (R23).
    """
    p = Path(path)
    sidecar = _sidecar_for(p)
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint sidecar {sidecar} does not exist.") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{sidecar} is not a wsi-mil checkpoint sidecar (format {CHECKPOINT_FORMAT!r}).")
    try:
        hparams = dict(meta["model"]["hparams"])
        classes = list(meta["classes"])
        FeatureSpec.from_json(meta["feature_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{sidecar}: incomplete sidecar ({type(exc).__name__}: {exc}).") from exc
    if weights is not None:
        weights_path = Path(weights)
    elif p.is_file() and p.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin"):
        weights_path = p
    else:
        name = str(meta.get("weights_file", WEIGHTS_NAME))
        if Path(name).name != name:
            raise CheckpointError(f"{sidecar}: weights_file must be a file name beside it, got {name!r}.")
        weights_path = sidecar.parent / name
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights {weights_path} do not exist (sidecar {sidecar}).")
    expected_sha = meta.get("weights_sha256")
    if expected_sha and weights_path.name == meta.get("weights_file") and _sha256(weights_path) != expected_sha:
        raise CheckpointError(
            f"{weights_path} does not match the checksum in {sidecar} (modified or from another run)."
        )
    state = _load_state(weights_path)
    name = hparams.pop("name", meta["model"].get("name"))
    try:
        model = create_model(str(name), int(hparams.pop("in_dim")), int(hparams.pop("n_classes")), **hparams)
        model.load_state_dict(state, strict=True)
    except (ConfigError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: weights do not fit the model in {sidecar} ({exc}).") from exc
    if model.n_classes != len(classes):
        raise CheckpointError(f"{sidecar}: {len(classes)} class names for a model with {model.n_classes} outputs.")
    model.eval()
    return Checkpoint(model=model, meta=meta, path=sidecar)
