"""Feature standardisation (``standardize_features``): fitted on each fold's training tiles only, kept in the
checkpoint, applied by every later reader of the model (predict, heatmap)."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from _train_data import planted_cohort
from click.testing import CliRunner

from wsi_mil.cli.train import predict, train
from wsi_mil.errors import ConfigError
from wsi_mil.mil import Bag, InMemoryBagDataset, Trainer, TrainerConfig, create_model
from wsi_mil.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bags(rng: np.random.Generator, n_bags: int, dim: int, loc: float, scale: float) -> list[np.ndarray]:
    return [(loc + scale * rng.normal(size=(int(rng.integers(5, 40)), dim))).astype(np.float32) for _ in range(n_bags)]


def test_the_fitted_mean_and_sd_are_those_of_every_tile_and_the_forward_uses_them():
    rng = np.random.default_rng(0)
    bags = _bags(rng, 7, 6, loc=300.0, scale=40.0)
    for b in bags:  # a constant feature is only centred
        b[:, 2] = 5.0
    model = create_model("loss_attention", 6, 2, hidden_dims=[8], dropout=0.0, standardize_features=True)
    assert model.standardizes_features and model.hparams["standardize_features"] is True
    n = model.fit_feature_standardization(torch.from_numpy(b) for b in bags)
    tiles = np.concatenate(bags).astype(np.float64)
    assert n == len(tiles)
    np.testing.assert_allclose(model.feature_mean.numpy(), tiles.mean(0), rtol=1e-6)
    sd = tiles.std(0)
    sd[2] = 1.0
    np.testing.assert_allclose(model.feature_std.numpy(), sd, rtol=1e-5)

    plain = create_model("loss_attention", 6, 2, hidden_dims=[8], dropout=0.0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("feature_")})
    x = torch.from_numpy(bags[0])
    z = (x - model.feature_mean) / model.feature_std
    got, want = model.eval()(x), plain.eval()(z)
    torch.testing.assert_close(got.bag_logits, want.bag_logits)
    torch.testing.assert_close(got.attention, want.attention)
    # rebuilt from its hparams and state (what a checkpoint holds), the model is the same model
    again = create_model(**model.hparams)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.eval()(x).bag_logits, got.bag_logits)
    # a model without the option has no buffers and refuses to fit
    assert not plain.standardizes_features and "feature_mean" not in plain.state_dict()
    with pytest.raises(ConfigError, match="standardize_features=True"):
        plain.fit_feature_standardization([x])
    with pytest.raises(ConfigError, match="true or false"):
        create_model("abmil", 6, 2, standardize_features="yes")


@pytest.mark.parametrize("name", ["loss_attention", "abmil", "max"])
def test_the_trainer_fits_on_the_training_bags_only_never_on_validation(name):
    rng = np.random.default_rng(1)
    train_x = _bags(rng, 8, 5, loc=10.0, scale=3.0)
    val_x = _bags(rng, 4, 5, loc=-500.0, scale=90.0)  # far away: any leak moves the mean
    train = InMemoryBagDataset(Bag(f"t{i}", torch.from_numpy(x), i % 2) for i, x in enumerate(train_x))
    val = InMemoryBagDataset(Bag(f"v{i}", torch.from_numpy(x), i % 2) for i, x in enumerate(val_x))
    model = create_model(name, 5, 2, hidden_dims=[8], standardize_features=True)
    trainer = Trainer(model, TrainerConfig(epochs=2, device="cpu", early_stopping_patience=None))
    trainer.fit(train, val)
    tiles = np.concatenate(train_x).astype(np.float64)
    np.testing.assert_allclose(model.feature_mean.numpy(), tiles.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.feature_std.numpy(), tiles.std(0), rtol=1e-5)
    # resumed from its state at epoch 2, the trainer does not fit again (on the bags of the resumed call)
    state = trainer.state_dict()
    fresh = create_model(name, 5, 2, hidden_dims=[8], standardize_features=True)
    resumed = Trainer(fresh, TrainerConfig(epochs=3, device="cpu", early_stopping_patience=None))
    resumed.load_state_dict(state)
    resumed.fit(val)
    np.testing.assert_allclose(fresh.feature_mean.numpy(), tiles.mean(0), rtol=1e-5)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_standardize_features_keeps_each_folds_statistics_in_its_checkpoint_and_predict_applies_them(tmp_path):
    cohort = planted_cohort(tmp_path / "c", n_slides=12, dim=6, shift=4.0)
    for path in cohort.features_dir.glob("*.h5"):  # features far from zero mean / unit s.d.
        with h5py.File(path, "r+") as f:
            f["features"][...] = f["features"][:] * 25.0 + 400.0
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"hidden_dims": [8], "dropout": 0.0},
                                      "training": {"early_stopping_patience": None}, "metrics": {"n_bootstrap": 0}}))
    run = tmp_path / "run"
    args = [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(run), "--config", str(config),
            "--epochs", "3", "--folds", "3", "--device", "cpu", "--standardize-features"]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["standardize_features"] is True

    splits = _csv(run / "splits.csv")
    for k in range(3):
        ckpt = load_checkpoint(run / f"fold_{k}")
        assert ckpt.model.standardizes_features
        assert json.loads((run / f"fold_{k}" / "model.json").read_text())["model"]["hparams"]["standardize_features"]
        train_ids = [r["slide_id"] for r in splits if r["fold"] == str(k) and r["split"] == "train"]
        tiles = []
        for sid in train_ids:
            with h5py.File(cohort.features_dir / f"{sid}.h5") as f:
                tiles.append(f["features"][:].astype(np.float64))
        tiles = np.concatenate(tiles)
        np.testing.assert_allclose(ckpt.model.feature_mean.numpy(), tiles.mean(0), rtol=1e-5)
        np.testing.assert_allclose(ckpt.model.feature_std.numpy(), tiles.std(0), rtol=1e-4)

    # predict scores each slide with the fold model that held it out, standardisation included: the scores
    # equal training's out-of-fold predictions
    out = tmp_path / "pred"
    result = CliRunner().invoke(predict, [str(cohort.features_dir), "--checkpoint", str(run), "--out", str(out),
                                          "--device", "cpu"])
    assert result.exit_code == 0, result.output
    oof = {r["slide_id"]: float(r["prob_tumor"]) for r in _csv(run / "predictions.csv")}
    rows = _csv(out / "predictions.csv")
    assert {r["scored_by"].split(":")[0] for r in rows} == {"held_out"}
    for r in rows:
        assert float(r["prob_tumor"]) == pytest.approx(oof[r["slide_id"]], abs=1e-6)
