"""Preset weights and what extraction does with a preset: files in every published layout load exactly, bad
files are refused by name, gated models fail at once with how to get access, bags record the encoder,
training refuses mixed encoders, and `wsi-mil encoders` lists the table. Offline, CPU, random weights."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
from _train_data import planted_cohort
from click.testing import CliRunner
from extract_helpers import write_slide

from wsi_mil.errors import WeightsError
from wsi_mil.features import hub as hub_mod
from wsi_mil.features.encoders import Encoder, create_encoder
from wsi_mil.features.presets import get_preset
from wsi_mil.features.runtime import cpu_supports_bf16, resolve_precision
from wsi_mil.features.tile_settings import resolve_tile_settings

skimage_data = pytest.importorskip("skimage.data")
StateDict = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network, no developer caches or tokens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "WSI_MIL_ENCODER", "WSI_MIL_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def _tiles(n: int, px: int) -> np.ndarray:
    img = skimage_data.immunohistochemistry()
    return np.stack([img[20 * i : 20 * i + px, 30 * i : 30 * i + px] for i in range(n)])


def _random(name: str, depth: int | None = 1) -> Encoder:
    torch.manual_seed(3)
    return create_encoder(name, random_init=True, depth=depth)


def _trunk_state(enc: Encoder) -> StateDict:
    trunk = getattr(enc.model, "trunk", enc.model)
    return {k: v.clone() for k, v in trunk.state_dict().items()}


# --- published layouts, written by hand from timm's names -----------------------------------------------
def _to_transformers(sd: StateDict, swiglu: bool = False, dinov2: bool = True) -> StateDict:
    out: StateDict = {
        "embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    }  # fmt: skip
    if dinov2:
        out["embeddings.mask_token"] = torch.zeros_like(sd["cls_token"])  # unused at inference
    else:
        out["pooler.dense.weight"] = torch.zeros(4, 4)  # ViTModel's pooler, unused
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    if dinov2:
        names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.weights_in" if swiglu else "mlp.fc1",
                 "mlp.fc2": "mlp.weights_out" if swiglu else "mlp.fc2", "ls1.gamma": "layer_scale1.lambda1",
                 "ls2.gamma": "layer_scale2.lambda1"}  # fmt: skip
    names["attn.proj"] = "attention.output.dense"
    for key, value in sd.items():
        if not key.startswith("blocks."):
            continue
        _, block, rest = key.split(".", 2)
        if rest.startswith("attn.qkv."):
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layer.{block}.attention.attention.{part}.{rest.rsplit('.', 1)[1]}"] = chunk.clone()
            continue
        prefix = next(p for p in names if rest.startswith(p))
        out[f"encoder.layer.{block}.{names[prefix]}{rest[len(prefix):]}"] = value
    return out


def _to_meta_dinov2(sd: StateDict) -> StateDict:
    """Meta's DINOv2 names with registers: the class token shares the position embedding (values in
    steps of 1/256, so that moving it between the two is exact in float32)."""
    out = dict(sd)
    pos0 = torch.randint(-256, 256, sd["pos_embed"][:, :1].shape) / 256.0
    out["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    out["cls_token"] = sd["cls_token"] - pos0
    out["register_tokens"] = out.pop("reg_token")
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def _to_swin_v1(sd: StateDict) -> StateDict:
    """CTransPath's checkpoint names (timm 0.5): downsampling at the end of a stage, index buffers, a head."""
    out: StateDict = {}
    for key, value in sd.items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        out[key] = value
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    out["head.weight"], out["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    return {"model": out}  # type: ignore[dict-item]  # nested, as the published file


LAYOUTS: list[tuple[str, int | None, Callable[[StateDict], StateDict], str]] = [
    ("kaiko_vits16", 1, dict, "safetensors"),  # timm names
    ("virchow2", 1, dict, "pth"),  # CLS + mean over patch tokens, 4 registers
    ("phikon", 1, lambda sd: _to_transformers(sd, dinov2=False), "safetensors"),  # transformers ViTModel
    ("phikon_v2", 1, _to_transformers, "safetensors"),  # transformers Dinov2Model
    ("midnight", 1, lambda sd: _to_transformers(sd, swiglu=True), "safetensors"),  # Dinov2Model, SwiGLU
    ("kaiko_vitl14", 1, _to_meta_dinov2, "pth"),  # Meta's DINOv2 release names, registers
    ("ctranspath", None, _to_swin_v1, "pth"),  # Swin v1 names, conv stem, nested under "model"
]


@pytest.mark.parametrize("name,depth,layout,fmt", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_a_saved_random_model_loads_and_reproduces_its_features_exactly(
    name: str, depth: int | None, layout: Callable[[StateDict], StateDict], fmt: str, tmp_path: Path
) -> None:
    src = _random(name, depth)
    if layout is _to_meta_dinov2:
        with torch.no_grad():
            src.model.cls_token.copy_(torch.randint(-256, 256, src.model.cls_token.shape) / 256.0)
    tiles = _tiles(2, get_preset(name).tile_px)
    path = tmp_path / f"w.{fmt}"
    sd = layout(_trunk_state(src))
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    loaded = create_encoder(name, weights=path, depth=depth)
    assert loaded.weights_source == str(path) and len(loaded.weights_sha256) == 64
    assert torch.equal(loaded.encode(tiles), src.encode(tiles))


def test_a_hub_snapshot_folder_is_accepted_as_weights(tmp_path: Path) -> None:
    src = _random("lunit_vits8", depth=1)
    snap = tmp_path / "models--org--m"
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc")
    safetensors.torch.save_file(_trunk_state(src), str(snap / "snapshots" / "abc" / "model.safetensors"))
    loaded = create_encoder("lunit_vits8", weights=snap, depth=1)
    assert loaded.weights_source.endswith("snapshots/abc/model.safetensors")
    tiles = _tiles(1, 224)
    assert torch.equal(loaded.encode(tiles), src.encode(tiles))


def test_a_file_with_a_renamed_and_a_misshaped_tensor_is_refused_naming_both(tmp_path: Path) -> None:
    sd = _trunk_state(_random("kaiko_vits16"))
    sd["blocks.0.attn.out.weight"] = sd.pop("blocks.0.attn.proj.weight")
    sd["blocks.0.mlp.fc1.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(WeightsError) as info:
        create_encoder("kaiko_vits16", weights=path, depth=1)
    msg = str(info.value)
    for fragment in ("blocks.0.attn.out.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.bias: file (7,)"):
        assert fragment in msg, msg
    assert "kaiko_vits16" in msg and str(path) in msg


# --- gated models -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_gated_model_without_a_token_fails_in_under_a_second_with_how_to_get_it(
    offline: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)

    def no_network(*args: object, **kwargs: object) -> bool:
        raise AssertionError("no token: the network must not be tried")

    monkeypatch.setattr(hub_mod, "_host_reachable", no_network)
    monkeypatch.setattr(hub_mod, "_proxy_configured", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_encoder("uni")
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    for fragment in ("gated model MahmoodLab/UNI", "no Hugging Face token", "request access on https://huggingface.co/MahmoodLab/UNI",
                     "hf auth login", "HF_TOKEN", "--weights PATH"):  # fmt: skip
        assert fragment in msg, msg


def test_a_gated_model_with_a_token_offline_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(WeightsError, match="the hub is offline .* request access on https://huggingface.co/paige-ai/Virchow2"):
        create_encoder("virchow2")


def test_a_file_only_preset_without_a_file_says_where_to_get_it() -> None:
    with pytest.raises(WeightsError, match="file only .*TransPath.*--weights PATH"):
        create_encoder("ctranspath")


def test_the_extract_command_refuses_a_gated_model_before_opening_any_slide(tmp_path: Path) -> None:
    from wsi_mil.cli.main import main

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "broken.svs").write_bytes(b"not a slide: opening it would fail differently")
    out = CliRunner().invoke(main, ["extract", str(slides), "--out", str(tmp_path / "out"), "--encoder", "h_optimus_0", "--device", "cpu"])
    assert out.exit_code == 2, out.output
    assert "WeightsError" in out.output and "request access on https://huggingface.co/bioptimus/H-optimus-0" in out.output
    assert not (tmp_path / "out" / "tissue").exists() and not list((tmp_path / "out").rglob("*.h5"))


# --- precision, tile settings and what bags record --------------------------------------------------------
def test_precision_policy_follows_the_preset() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, "tf_efficientnet_lite0") == "fp32"
    for name in ("uni", "virchow2", "ctranspath"):
        assert resolve_precision("auto", cpu, name) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu, "uni") == "fp32"


def test_tile_settings_come_from_the_preset_and_a_contradiction_names_both_values() -> None:
    s = resolve_tile_settings("ctranspath", None, None)
    assert (s.mpp, s.tile_px, s.warnings) == (1.0, 224, [])
    s = resolve_tile_settings("uni", 1.0, 512)
    assert (s.mpp, s.tile_px) == (1.0, 512)
    assert any("1 overrides the uni preset's 0.5" in w for w in s.warnings), s.warnings
    assert any("512 px overrides the uni preset's 256 px" in w for w in s.warnings), s.warnings
    assert resolve_tile_settings("uni", 0.5, 256).warnings == []
    s = resolve_tile_settings("mobilenetv3_small_050", None, None)  # not a preset: the old defaults
    assert (s.mpp, s.tile_px, s.preset) == (0.5, 256, None)


def test_a_preset_extraction_records_the_encoder_in_every_bag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from wsi_mil.config import ExtractConfig, load_config
    from wsi_mil.runs.extract import run_extract

    slide = write_slide(tmp_path / "slides" / "a.tif", mpp=0.5)
    base = {"encoder": "kaiko_vits16", "random_init": True, "device": "cpu", "precision": "fp32", "workers": 0}
    summary = run_extract([slide], tmp_path / "out", ExtractConfig.model_validate(base), progress=False, threads=1)
    assert summary.exit_code == 0
    cfg = load_config(ExtractConfig, tmp_path / "out" / "config.yaml")
    assert (cfg.tiling.mpp, cfg.tiling.tile_px) == (0.5, 256)  # the preset's, written as what ran
    with h5py.File(tmp_path / "out" / "features" / "a.h5") as f:
        attrs = dict(f.attrs)
        assert f["features"].shape[1] == 384
    assert attrs["encoder_name"] == attrs["encoder_preset"] == "kaiko_vits16" and attrs["pooling"] == "cls"
    assert attrs["input_px"] == 224 and json.loads(attrs["norm_mean"]) == [0.5, 0.5, 0.5]
    assert attrs["tile_mpp"] == 0.5 and attrs["tile_px"] == 256 and attrs["precision"] == "fp32"
    assert attrs["weights_sha256"] == "random"

    with caplog.at_level(logging.WARNING, logger="wsi_mil"):
        run_extract([slide], tmp_path / "out1", ExtractConfig.model_validate({**base, "tiling": {"mpp": 1.0}}), progress=False, threads=1)
    assert "tile µm/px 1 overrides the kaiko_vits16 preset's 0.5 µm/px" in caplog.text


# --- training refuses mixed encoders and poolings ------------------------------------------------------------
@pytest.mark.parametrize("key,first,other", [("encoder_name", "uni", "phikon_v2"), ("pooling", "cls+mean", "cls")])
def test_train_refuses_bags_of_mixed_encoders_or_poolings_naming_two_slides(key: str, first: str, other: str, tmp_path: Path) -> None:
    from wsi_mil.cli.train import train

    cohort = planted_cohort(tmp_path / "c", n_slides=8, dim=8)
    for slide_id in cohort.slide_ids:
        with h5py.File(cohort.features_dir / f"{slide_id}.h5", "a") as f:
            f.attrs["encoder_name"], f.attrs["pooling"] = "uni", "cls+mean"
            f.attrs[key] = other if slide_id == "s005" else first
    out = CliRunner().invoke(train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"])
    assert out.exit_code == 2, out.output
    assert "FeatureSpecMismatchError" in out.output and f"expected {first!r}, got {other!r}" in out.output
    assert "'s000'" in out.output and "'s005'" in out.output  # the first slide and the one that differs


# --- wsi-mil encoders -----------------------------------------------------------------------------------------
def test_the_encoders_command_lists_every_preset_and_where_weights_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mil.cli.main import main
    from wsi_mil.features.presets import list_presets

    snap = Path(os.environ["HF_HOME"]) / "hub" / "models--owkin--phikon" / "snapshots" / "r1"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("r1")
    (snap / "model.safetensors").write_bytes(b"x")
    weights = tmp_path / "ctranspath.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("WSI_MIL_ENCODER", "ctranspath")
    monkeypatch.setenv("WSI_MIL_WEIGHTS", str(weights))

    out = CliRunner().invoke(main, ["encoders"])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.output.splitlines() if line.strip()}
    for p in list_presets():
        assert p.name in lines and f" {p.feature_dim} " in lines[p.name] and p.pooling in lines[p.name]
    assert "hub cache" in lines["phikon"] and "file: " in lines["ctranspath"] and "package" in lines["tf_efficientnet_lite0"]
    assert lines["uni"].rstrip().endswith("no") and "gated" in lines["uni"] and "1 " in lines["ctranspath"]

    data = json.loads(CliRunner().invoke(main, ["encoders", "--json"]).output)
    assert [d["name"] for d in data] == [p.name for p in list_presets()]
    by_name = {d["name"]: d for d in data}
    assert by_name["virchow2"]["feature_dim"] == 2560 and by_name["virchow2"]["gated"] is True
    assert by_name["prov_gigapath"]["preprocessing"]["resize_px"] == 256
    assert by_name["phikon"]["weights_here"] == "hub cache" and by_name["uni"]["weights_path"] is None
