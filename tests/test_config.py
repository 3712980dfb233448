"""Configs: shipped YAML defaults validate and equal the models; unknown keys are rejected (R26)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsi_mil.config import (
    EXTRACT_HASH_FIELDS,
    ExtractConfig,
    TilesConfig,
    config_hash,
    load_config,
    validate_config,
)
from wsi_mil.config.train import PredictConfig, TrainConfig
from wsi_mil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name,model", [("tiles", TilesConfig), ("extract", ExtractConfig), ("train", TrainConfig), ("predict", PredictConfig)]
)
def test_shipped_defaults_match_models(name, model):
    cfg = load_config(model, ROOT / "configs" / f"{name}.yaml")
    assert cfg == model()


OBJECTIVE_KEYS = ("recall_weight", "consistency_max", "rampup_epochs", "ema_beta")


def test_train_yaml_states_the_objective_defaults_of_their_one_source():
    """The keys are null (the model's default) and their comments give ObjectiveSettings' numbers."""
    from dataclasses import asdict

    from wsi_mil.mil import ObjectiveSettings

    text = (ROOT / "configs" / "train.yaml").read_text()
    training = yaml.safe_load(text)["training"]
    defaults = asdict(ObjectiveSettings())
    assert set(defaults) == set(OBJECTIVE_KEYS)
    for key, value in defaults.items():
        assert training[key] is None
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
        stated = line.split("default")[-1].strip()
        assert float(stated) == value, f"configs/train.yaml says {key} defaults to {stated}, the code {value}"


@pytest.mark.parametrize("model", ["abmil", "mean", "max"])
@pytest.mark.parametrize("key,value", [("recall_weight", 0.3), ("consistency_max", 1.0), ("rampup_epochs", 5), ("ema_beta", 0.5)])
def test_objective_settings_are_refused_for_models_other_than_loss_attention(model, key, value, tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump({"model": {"name": model}, "training": {key: value}}))
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, p)
    message = str(info.value)
    assert f"training.{key} is an option of loss_attention only; model '{model}'" in message
    assert "remove the key" in message
    # the same file is fine for loss_attention, and the model alone is fine without the key
    assert getattr(load_config(TrainConfig, p, {"model.name": "loss_attention"}).training, key) == value
    assert getattr(load_config(TrainConfig, None, {"model.name": model}).training, key) is None
    # the pipeline's train section is validated the same way
    from wsi_mil.runs.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=f"training.{key} is an option of loss_attention only; model '{model}'"):
        validate_config(PipelineConfig, {"train": {"model": {"name": model}, "training": {key: value}}})


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


def test_train_recheck_needs_the_scan_and_leaves_the_run_key_alone():
    from wsi_mil.runs.train_state import run_key

    with pytest.raises(ConfigError, match="recheck.*check_finite"):
        validate_config(TrainConfig, {"recheck": True, "check_finite": False})
    plain, rechecking = TrainConfig(), TrainConfig(recheck=True)
    assert plain.recheck is False and rechecking.check_finite is True
    # resuming a run with or without --recheck is the same run (a bag it leaves out changes the bags instead)
    assert run_key(plain, {}, []) == run_key(rechecking, {}, [])
    assert run_key(plain, {}, []) != run_key(TrainConfig(check_finite=False), {}, [])


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


def test_each_help_states_the_real_default():
    """Every "(default X)" in a command's --help is the default the command really uses."""
    import re

    from wsi_mil.cli.main import main
    from wsi_mil.config import ExtractConfig, TilesConfig
    from wsi_mil.config.heatmap import HeatmapConfig
    from wsi_mil.config.train import TrainConfig
    from wsi_mil.config.view import ViewConfig
    from wsi_mil.features.runtime import CPU_BATCH_SIZE, CUDA_BATCH_SIZE

    tiles, extract, train, heatmap, view = TilesConfig(), ExtractConfig(), TrainConfig(), HeatmapConfig(), ViewConfig()
    assert extract.tiling.mpp is None and extract.tiling.tile_px is None  # stated as "the encoder preset's"
    expected = {
        ("tiles", "--mpp"): tiles.tiling.mpp, ("tiles", "--tile-px"): tiles.tiling.tile_px,
        ("tiles", "--min-tissue"): tiles.tiling.min_tissue_fraction,
        ("extract", "--mpp"): "the encoder preset's", ("extract", "--tile-px"): "the encoder preset's",
        ("extract", "--batch-size"): f"{CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA",
        ("train", "--folds"): train.splits.folds, ("train", "--epochs"): train.training.epochs,
        ("train", "--lr"): train.training.lr, ("train", "--seed"): train.seed,
        ("train", "--id-col"): train.labels.id_col, ("train", "--label-col"): train.labels.label_col,
        ("train", "--case-col"): train.labels.case_col, ("train", "--recheck"): "on" if train.recheck else "off",
        ("heatmap", "--top-k"): heatmap.top_k, ("heatmap", "--max-side-px"): heatmap.max_side_px,
        ("heatmap", "--smooth-um"): heatmap.smooth_sigma_um,
        ("view", "--port"): view.port, ("view", "--host"): view.host, ("view", "--layer"): view.layer,
        ("view", "--top-k"): view.top_k,
    }
    checked = set()
    for name, command in main.commands.items():
        for param in command.params:
            match = re.search(r"\(default ([^);:]+)", getattr(param, "help", "") or "")
            key = (name, param.opts[0])
            if match is None or key not in expected:
                continue
            stated, real = match.group(1).strip(), expected[key]
            if isinstance(real, float | int) and not isinstance(real, bool):
                assert float(stated) == float(real), (key, stated, real)
            else:
                assert stated == str(real), (key, stated, real)
            checked.add(key)
    assert checked == set(expected)
