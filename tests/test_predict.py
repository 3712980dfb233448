"""`wsi-mil predict`: planted tiles ranked first by the attention, fold averaging, R24 refusals."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from _train_data import bag_attrs, planted_cohort, write_bag
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from wsi_mil.cli.train import predict
from wsi_mil.config.train import TrainConfig
from wsi_mil.errors import FeatureSpecMismatchError
from wsi_mil.mil import create_model
from wsi_mil.runs.predict import predict_bag, run_predict
from wsi_mil.runs.train import run_train
from wsi_mil.store.bag_file import FeatureSpec
from wsi_mil.store.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A loss-attention run on a planted cohort (2 folds)."""
    root = tmp_path_factory.mktemp("planted")
    cohort = planted_cohort(root / "train", n_slides=40, dim=16, shift=4.0, planted_fraction=(0.05, 0.15))
    config = TrainConfig.model_validate(
        {
            "model": {"hidden_dims": [32], "dropout": 0.0},
            "training": {"epochs": 20, "lr": 0.002, "device": "cpu", "early_stopping_patience": None},
            "splits": {"folds": 2},
            "metrics": {"n_bootstrap": 100},
        }
    )
    result = run_train(cohort.features_dir, cohort.labels_csv, root / "run", config)
    return root, result


def test_attention_ranks_planted_tiles_first(trained):
    """Evidence (1): on new slides, planted tiles get the highest attention (tile-level AUC >= 0.95)."""
    root, result = trained
    assert result.metrics["pooled_out_of_fold"]["auc"]["value"] >= 0.9
    new = planted_cohort(root / "new", n_slides=20, dim=16, shift=4.0, planted_fraction=(0.05, 0.15), seed=11, prefix="new")
    out = run_predict(new.features_dir, [root / "run"], root / "pred", labels_csv=new.labels_csv)
    assert out.metrics is not None and out.metrics["auc"]["value"] >= 0.95
    per_slide, top_is_planted = [], []
    for slide_id, planted in new.planted.items():
        if not planted.any():
            continue
        with h5py.File(root / "pred" / "scores" / f"{slide_id}.h5") as f:
            attention = f["attention"][:]
            tumor_prob = f["instance_probabilities"][:, 1]
        per_slide.append(roc_auc_score(planted, attention))
        top_is_planted.append(planted[np.argmax(attention)])
        assert roc_auc_score(planted, tumor_prob) >= 0.9  # the tile's own class probability agrees
    assert np.mean(per_slide) >= 0.95, per_slide
    assert np.mean(top_is_planted) >= 0.9


def test_fold_checkpoints_are_averaged(trained, tmp_path):
    root, _ = trained
    folds = [load_checkpoint(root / "run" / f"fold_{k}") for k in range(2)]
    x = torch.randn(40, 16)
    both = predict_bag([c.model for c in folds], x)
    single = [predict_bag([c.model], x) for c in folds]
    np.testing.assert_allclose(both.bag_probabilities, (single[0].bag_probabilities + single[1].bag_probabilities) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.attention, (single[0].attention + single[1].attention) / 2, rtol=1e-5)
    np.testing.assert_allclose(
        both.instance_probabilities, (single[0].instance_probabilities + single[1].instance_probabilities) / 2, rtol=1e-5
    )
    assert both.attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_features_that_do_not_fit_the_checkpoint_are_refused(tmp_path):
    spec = FeatureSpec("test_encoder", 16, 0.5, 224, "ab" * 32, "0.1.0")
    save_checkpoint(tmp_path / "ckpt", create_model("loss_attention", 16, 2, hidden_dims=(8,)), ["n", "t"], spec)
    rng = np.random.default_rng(0)
    cases = {
        "dim": (rng.normal(size=(5, 32)).astype(np.float32), bag_attrs("x", 32), "feature_dim: expected 16, got 32"),
        "encoder": (rng.normal(size=(5, 16)).astype(np.float32), bag_attrs("x", 16, encoder="uni"), "encoder_name: expected 'test_encoder', got 'uni'"),
        "mpp": (rng.normal(size=(5, 16)).astype(np.float32), bag_attrs("x", 16, mpp=1.0), "tile mpp: expected 0.5 µm/px, got 1.0 µm/px"),
        "px": (rng.normal(size=(5, 16)).astype(np.float32), bag_attrs("x", 16, tile_px=256), "tile_px: expected 224, got 256"),
    }
    for name, (features, attrs, expected) in cases.items():
        write_bag(tmp_path / name / "x.h5", features, attrs=attrs)
        with pytest.raises(FeatureSpecMismatchError) as info:
            run_predict(tmp_path / name, [tmp_path / "ckpt"], tmp_path / f"out_{name}")
        assert expected in str(info.value) and "'x'" in str(info.value)
        assert not (tmp_path / f"out_{name}").exists()  # refused before anything is written
    result = CliRunner().invoke(predict, [str(tmp_path / "encoder"), "--checkpoint", str(tmp_path / "ckpt" / "model.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "FeatureSpecMismatchError" in result.output and "expected 'test_encoder'" in result.output


def test_predict_skips_empty_and_non_finite_bags(tmp_path):
    spec = FeatureSpec("test_encoder", 8, 0.5, 224, "ab" * 32, "0.1.0")
    save_checkpoint(tmp_path / "ckpt", create_model("abmil", 8, 2, hidden_dims=(8,)), ["n", "t"], spec)
    f = tmp_path / "f"
    write_bag(f / "ok.h5", np.ones((4, 8), np.float32))
    write_bag(f / "empty.h5", np.zeros((0, 8), np.float32))
    x = np.ones((4, 8), np.float32)
    x[0, 0] = np.inf
    with h5py.File(f / "inf.h5", "w") as h:
        h.create_dataset("features", data=x)
        h.create_dataset("coords", data=np.zeros((4, 2), np.int64))
        for k, v in {**bag_attrs("inf", 8), "complete": True}.items():
            h.attrs[k] = v
    result = CliRunner().invoke(predict, [str(f), "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output  # a slide could not be predicted
    assert sorted(p.name for p in (tmp_path / "o" / "scores").iterdir()) == ["ok.h5"]
    summary = json.loads((tmp_path / "o" / "predict.json").read_text())
    assert summary["skipped"] == {"empty": ["empty"], "non_finite": ["inf"]} and summary["n_predicted"] == 1
    with h5py.File(tmp_path / "o" / "scores" / "ok.h5") as h:
        assert h.attrs["label"] == "" and h.attrs["model_name"] == "abmil"
    strict = CliRunner().invoke(predict, [str(f), "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 2 and "'inf'" in strict.output and not (tmp_path / "s").exists()


def test_each_slide_of_the_run_is_scored_exactly_by_the_fold_model_that_held_it_out(trained, tmp_path):
    root, _ = trained
    cohort_dir = root / "train" / "features"
    out = run_predict(cohort_dir, [root / "run"], tmp_path / "oof")
    assert out.scored_by == {"held_out": 40} and not out.in_sample
    test_fold = {}
    for line in (root / "run" / "splits.csv").read_text().splitlines()[1:]:
        slide_id, _, _, fold, split = line.split(",")
        if split == "test":
            test_fold[slide_id] = int(fold)
    folds = [load_checkpoint(root / "run" / f"fold_{k}") for k in range(2)]
    rows = {r.split(",")[0]: r.split(",") for r in (tmp_path / "oof" / "predictions.csv").read_text().splitlines()[1:]}
    for slide_id, fold in test_fold.items():
        with h5py.File(tmp_path / "oof" / "scores" / f"{slide_id}.h5") as fh:
            assert fh.attrs["scored_by"] == f"held_out:fold_{fold}" and int(fh.attrs["n_checkpoints"]) == 1
            attention = fh["attention"][:]
            bag = json.loads(fh.attrs["bag_probabilities"])
        with h5py.File(cohort_dir / f"{slide_id}.h5") as fh:
            x = torch.from_numpy(fh["features"][:])
        alone = predict_bag([folds[fold].model], x)
        np.testing.assert_array_equal(attention, alone.attention)
        assert bag == [float(v) for v in alone.bag_probabilities]
        assert rows[slide_id][-1] == f"held_out:fold_{fold}"
    # a slide the run never saw is scored by both folds, and says so
    new = planted_cohort(tmp_path / "new", n_slides=4, dim=16, shift=4.0, seed=5, prefix="new")
    unseen = run_predict(new.features_dir, [root / "run"], tmp_path / "unseen")
    assert unseen.scored_by == {"ensemble": 4}
    with h5py.File(tmp_path / "unseen" / "scores" / f"{new.slide_ids[0]}.h5") as fh:
        assert fh.attrs["scored_by"] == "ensemble:2" and int(fh.attrs["n_checkpoints"]) == 2
    # one fold's checkpoint alone: its training slides are skipped, its test slides are held out
    one = run_predict(cohort_dir, [root / "run" / "fold_0"], tmp_path / "one")
    held = sorted(s for s, f in test_fold.items() if f == 0)
    assert one.n_predicted == len(held) and sorted(one.skipped["trained_on"]) == sorted(set(test_fold) - set(held))


def test_shuffled_labels_print_the_out_of_fold_auc_and_ensemble_all_is_marked_in_sample(tmp_path):
    """Random labels: the models memorise their training slides, so the in-sample AUC is high, while the
    out-of-fold AUC that predict (and so the pipeline) prints stays near chance."""
    cohort = planted_cohort(tmp_path / "c", n_slides=40, dim=16, shift=0.0, seed=3, two_slide_cases=0)
    rng = np.random.default_rng(0)
    lines = cohort.labels_csv.read_text().splitlines()
    shuffled = [lines[0]] + [",".join([*row.split(",")[:1], lab, *row.split(",")[2:]])
                             for row, lab in zip(lines[1:], rng.permutation(["normal", "tumor"] * 20), strict=True)]
    cohort.labels_csv.write_text("\n".join(shuffled) + "\n")
    config = TrainConfig.model_validate(
        {
            "model": {"hidden_dims": [64], "dropout": 0.0},
            "training": {"epochs": 60, "lr": 0.01, "device": "cpu", "early_stopping_patience": None},
            "splits": {"folds": 5},
            "metrics": {"n_bootstrap": 0},
        }
    )
    run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "run", config)
    oof = run_predict(cohort.features_dir, [tmp_path / "run"], tmp_path / "oof", labels_csv=cohort.labels_csv)
    ins = run_predict(cohort.features_dir, [tmp_path / "run"], tmp_path / "ins", labels_csv=cohort.labels_csv,
                      ensemble_all=True)
    assert oof.metrics is not None and ins.metrics is not None
    oof_auc, ins_auc = oof.metrics["auc"]["value"], ins.metrics["auc"]["value"]
    assert abs(oof_auc - 0.5) < 0.25 and ins_auc > 0.85, (oof_auc, ins_auc)
    assert "out of fold" in oof.table() and f"{oof_auc:.3f}" in oof.table()
    assert "IN-SAMPLE" in ins.table() and ins.in_sample
    assert json.loads((tmp_path / "oof" / "metrics.json").read_text())["scoring"] == "out_of_fold"
    assert json.loads((tmp_path / "ins" / "metrics.json").read_text())["scoring"] == "in_sample"
    with h5py.File(tmp_path / "ins" / "scores" / f"{cohort.slide_ids[0]}.h5") as fh:
        assert fh.attrs["scored_by"] == "in_sample:ensemble:5"


def test_a_bag_from_another_slide_under_a_training_id_is_refused_naming_the_slide(trained, tmp_path):
    """A bag whose slide file differs from the slide the run trained on under the same id would be called
    held-out wrongly: predict refuses it (or, asked to, scores it as the run's slide with a warning)."""
    import shutil

    from wsi_mil.errors import SlideIdentityError
    from wsi_mil.slide import SlideFingerprint

    root, _ = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    recorded = SlideFingerprint(4096, 4096, 0.25, 123_456, "a" * 64)
    other = SlideFingerprint(4096, 4096, 0.25, 654_321, "b" * 64)
    (run / "slide_fingerprints.json").write_text(json.dumps({"s000": recorded.to_json()}))
    x = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    features = tmp_path / "new"
    write_bag(features / "s000.h5", x, attrs={**bag_attrs("s000", 16), "slide_fingerprint": other.to_json()})
    with pytest.raises(SlideIdentityError, match=r"'s000' \(123,456 vs 654,321 bytes; .*--ignore-slide-identity"):
        run_predict(features, [run], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from wsi_mil.config.train import PredictConfig

    forced = run_predict(features, [run], tmp_path / "forced", PredictConfig(ignore_slide_identity=True))
    assert forced.n_predicted == 1 and forced.scored_by == {"held_out": 1}
    with h5py.File(tmp_path / "forced" / "scores" / "s000.h5") as fh:
        assert fh.attrs["slide_fingerprint"] == other.to_json()  # the scores say which slide they are about
