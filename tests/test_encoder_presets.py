"""Encoder presets (wsi_mil.features.presets / architectures): every record builds, pools and preprocesses as it says.

Large architectures are built full size on the meta device (no memory, no compute: shapes only) and at a
reduced depth, on the same code path, to check the pooling numerically. Offline, CPU, random weights.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from wsi_mil.features.architectures import attach_pooling, build_trunk, feature_dim, uses_fused_attention
from wsi_mil.features.presets import get_preset, list_presets
from wsi_mil.features.transforms import preset_transform

skimage_data = pytest.importorskip("skimage.data")

PRESETS = [p.name for p in list_presets()]
#: register tokens by hand, from each model card (class token + these come before the patch tokens)
REGISTERS = {"uni2_h": 8, "virchow2": 4, "h_optimus_0": 4, "h_optimus_1": 4, "h0_mini": 4, "kaiko_vitl14": 4}
REQUIRED = {
    "resnet50_trunc", "tf_efficientnet_lite0", "uni", "uni2_h", "virchow", "virchow2", "h_optimus_0", "h_optimus_1",
    "h0_mini", "prov_gigapath", "phikon", "phikon_v2", "kaiko_vits16", "kaiko_vits8", "kaiko_vitb16", "kaiko_vitb8",
    "kaiko_vitl14", "midnight", "lunit_vits8", "ctranspath",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def _is_vit(name: str) -> bool:
    return get_preset(name).arch.startswith("vit_")


def _small(name: str) -> torch.nn.Module:
    """The preset's model with random weights; transformers cut to one block (same code path)."""
    torch.manual_seed(0)
    preset = get_preset(name)
    return attach_pooling(preset, build_trunk(preset, depth=1 if _is_vit(name) else None)).eval()


def test_the_table_covers_the_issue_and_every_record_is_complete() -> None:
    assert REQUIRED <= set(PRESETS) and len(PRESETS) >= 18
    for p in list_presets():
        assert p.pooling in ("cls", "cls+mean", "avg"), p.name
        assert p.licence and p.weights.page.startswith("https://"), p.name
        assert p.tile_mpp > 0 and p.tile_px >= p.preprocessing.input_px - 32, p.name
        assert p.preprocessing.resize_px >= p.preprocessing.input_px, p.name
        assert set(p.precision) == {"cuda", "cpu"}, p.name
        assert (p.weights.kind == "file") == (p.weights.location is None), p.name
    # values the issue states
    assert get_preset("ctranspath").tile_mpp == 1.0 and get_preset("ctranspath").weights.kind == "file"
    assert get_preset("prov_gigapath").preprocessing.resize_px == 256 and get_preset("prov_gigapath").preprocessing.input_px == 224
    for name in ("h_optimus_0", "h_optimus_1"):
        pre = get_preset(name).preprocessing
        assert pre.mean == (0.707223, 0.578729, 0.703617) and pre.std == (0.211883, 0.230117, 0.177517)
    for name in ("kaiko_vits16", "kaiko_vitl14", "midnight"):
        assert get_preset(name).preprocessing.mean == (0.5, 0.5, 0.5) == get_preset(name).preprocessing.std
    assert {p.name for p in list_presets() if p.gated} == {
        "uni", "uni2_h", "virchow", "virchow2", "h_optimus_0", "h_optimus_1", "h0_mini", "prov_gigapath"
    }  # fmt: skip


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_architecture_on_meta_has_the_stated_dimension(name: str) -> None:
    preset = get_preset(name)
    model = attach_pooling(preset, build_trunk(preset, device="meta"))
    px = preset.preprocessing.input_px
    out = model(torch.empty(2, 3, px, px, device="meta"))
    assert tuple(out.shape) == (2, preset.feature_dim) and feature_dim(model) == preset.feature_dim
    if preset.arch.startswith(("vit_", "swin_")):
        assert uses_fused_attention(model), "attention must run through scaled_dot_product_attention"
    trunk = getattr(model, "trunk", model)
    if _is_vit(name):
        assert trunk.num_prefix_tokens == 1 + REGISTERS.get(name, 0)
        assert len(trunk.blocks) == preset.arch_kwargs.get("depth", len(trunk.blocks))


@pytest.mark.parametrize("name", PRESETS)
def test_pooling_by_hand(name: str) -> None:
    preset = get_preset(name)
    model = _small(name)
    px = preset.preprocessing.input_px
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    trunk = getattr(model, "trunk", model)
    with torch.inference_mode():
        pooled = model(x)
        features = trunk.forward_features(x)
    assert pooled.shape == (2, preset.feature_dim)
    if preset.pooling == "avg":
        dims = (1, 2) if preset.arch.startswith("swin_") else (2, 3)  # Swin is NHWC, CNNs NCHW
        expected = features.mean(dims)
    else:
        cls = features[:, 0]
        assert features.shape[1] == 1 + REGISTERS.get(name, 0) + (px // trunk.patch_embed.patch_size[0]) ** 2
        if preset.pooling == "cls":
            expected = cls
        else:  # class token, then the mean of the patch tokens computed separately, registers left out
            first_patch = 1 + REGISTERS.get(name, 0)
            patches = torch.stack([features[:, i] for i in range(first_patch, features.shape[1])], dim=1)
            expected = torch.cat([cls, patches.sum(1) / patches.shape[1]], dim=-1)
            if REGISTERS.get(name):
                with_registers = torch.cat([cls, features[:, 1:].mean(1)], dim=-1)
                assert not torch.allclose(pooled, with_registers, atol=1e-4), "registers must not enter the mean"
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)


# --- preprocessing ----------------------------------------------------------------------------------------
def _kernel(name: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if name == "bilinear":
        return np.clip(1.0 - x, 0.0, None)
    a = -0.5  # Keys' cubic with a = -0.5, as PIL and torch's antialiased bicubic
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _int_weights(n_in: int, n_out: int, name: str) -> tuple[np.ndarray, int]:
    """Antialiased resampling weights (PIL's scheme) as 16-bit fixed point with the most bits that fit."""
    support = (1.0 if name == "bilinear" else 2.0) * max(n_in / n_out, 1.0)
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = _kernel(name, (np.arange(lo, hi) - centre + 0.5) / max(scale, 1.0))
        w[i, lo:hi] = taps / taps.sum()
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    v = w * (1 << bits)
    return np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64), bits


def _hand_resize(tile: np.ndarray, side: int, name: str) -> np.ndarray:
    """Resize a uint8 tile by hand: horizontal then vertical pass, each rounded to uint8 (as PIL does)."""
    out = tile.astype(np.int64)
    for axis in (1, 0):
        if out.shape[axis] == side:
            continue
        w, bits = _int_weights(out.shape[axis], side, name)
        summed = np.einsum("kj,ijc->ikc", w, out) if axis == 1 else np.einsum("ij,jkc->ikc", w, out)
        out = np.clip((summed + (1 << (bits - 1))) >> bits, 0, 255)
    return out


def _hand_transform(tile: np.ndarray, pre) -> np.ndarray:  # type: ignore[no-untyped-def]
    img = _hand_resize(tile, pre.resize_px, pre.interpolation) if tile.shape[0] != pre.resize_px else tile
    top = int(round((img.shape[0] - pre.input_px) / 2.0))
    img = img[top : top + pre.input_px, top : top + pre.input_px].astype(np.float64) / 255.0
    return ((img - np.array(pre.mean)) / np.array(pre.std)).transpose(2, 0, 1)


@pytest.mark.parametrize("name", PRESETS)
def test_transform_equals_a_hand_computed_resize_crop_normalise(name: str) -> None:
    pre = get_preset(name).preprocessing
    img = skimage_data.immunohistochemistry()  # real IHC tissue, 512 x 512 uint8 RGB
    for side in (get_preset(name).tile_px, 300):  # the preset's tile, and a tile that must be resized
        tile = np.ascontiguousarray(img[37 : 37 + side, 101 : 101 + side])
        ours = preset_transform(pre)(tile)[0].double().numpy()
        expected = _hand_transform(tile, pre)
        assert ours.shape == expected.shape == (3, pre.input_px, pre.input_px)
        assert np.abs(ours - expected).max() <= 1e-6, (name, side)


def test_the_readme_table_states_each_presets_values() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Encoders") : text.index("## Outputs")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert list(rows) == PRESETS, "the README table lists every preset, in the table's order"
    for name, (_, _, dim, grid, pooling, model_input, _, gated, _) in rows.items():
        p = get_preset(name)
        assert int(dim) == p.feature_dim and grid == f"{p.tile_mpp:g}, {p.tile_px}" and pooling == p.pooling, name
        assert gated == ("yes" if p.gated else "no"), name
        assert model_input.startswith(str(p.preprocessing.resize_px)) and model_input.endswith(p.preprocessing.interpolation), name
