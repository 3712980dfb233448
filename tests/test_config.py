"""Configs: shipped YAML defaults validate and equal the models; unknown keys are rejected (R26)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsi_mil.config import EXTRACT_HASH_FIELDS, ExtractConfig, TilesConfig, config_hash, load_config
from wsi_mil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,model", [("tiles", TilesConfig), ("extract", ExtractConfig)])
def test_shipped_defaults_match_models(name, model):
    cfg = load_config(model, ROOT / "configs" / f"{name}.yaml")
    assert cfg == model()


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"tiling": {"mpp": 0.5, "tile_size": 256}, "batchsize": 3}))
    with pytest.raises(ConfigError) as info:
        load_config(ExtractConfig, p)
    assert "tiling.tile_size" in str(info.value) and "batchsize" in str(info.value)


def test_bounds_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tiling:\n  mpp: 0.25\nbatch_size: 16\n")
    cfg = load_config(ExtractConfig, p, {"tiling.tile_px": 224, "batch_size": None})  # None: flag not given
    assert cfg.tiling.mpp == 0.25 and cfg.tiling.tile_px == 224 and cfg.batch_size == 16
    with pytest.raises(ConfigError, match="tiling.tile_px"):
        load_config(ExtractConfig, None, {"tiling.tile_px": 0})
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ExtractConfig, p)


def test_hash_tracks_output_fields_only():
    a = ExtractConfig()
    assert config_hash(a, EXTRACT_HASH_FIELDS) == config_hash(a.model_copy(update={"batch_size": 7}), EXTRACT_HASH_FIELDS)
    assert config_hash(a, EXTRACT_HASH_FIELDS) != config_hash(a.model_copy(update={"encoder": "resnet50_trunc"}), EXTRACT_HASH_FIELDS)


def test_cli_rejects_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tiling:\n  mpp: 0.5\n  bogus: 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "wsi_mil", "tiles", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(p)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "unknown key 'tiling.bogus'" in r.stderr


def test_auto_precision_keeps_lite0_at_fp32_on_cpu():
    import torch

    from wsi_mil.features.runtime import cpu_supports_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, "tf_efficientnet_lite0") == "fp32"
    assert resolve_precision("auto", cpu, "resnet50_trunc") == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu, "resnet50_trunc") == "fp32"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", cpu)
