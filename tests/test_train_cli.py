"""`wsi-mil train` end to end through the CLI on generated feature files: every output, and the
cohort faults at training time (R16, R17, R18, R20, R28)."""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from dataclasses import asdict

import h5py
import numpy as np
import pytest
import torch
import yaml
from _train_data import bag_attrs, planted_cohort, write_bag
from click.testing import CliRunner

from wsi_mil.cli.train import predict, train
from wsi_mil.config import load_config
from wsi_mil.config.train import TrainConfig
from wsi_mil.errors import InputError, OutputConflictError
from wsi_mil.mil import BAG_CE_ONLY, ObjectiveSettings, Trainer, TrainerConfig, create_model
from wsi_mil.runs.train import run_train

FAST = ["--epochs", "12", "--lr", "0.005", "--device", "cpu", "--folds", "3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fast_config(tmp_path, **training):
    data = {
        "model": {"hidden_dims": [16], "dropout": 0.0},
        "training": {"early_stopping_patience": 4, **training},
        "metrics": {"n_bootstrap": 200},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_then_predict_through_the_cli(tmp_path):
    cohort = planted_cohort(tmp_path / "c", n_slides=18, dim=12, shift=4.0)
    run = tmp_path / "run"
    config = _fast_config(tmp_path)
    result = CliRunner().invoke(
        train, [str(cohort.features_dir.parent), "--labels", str(cohort.labels_csv), "--out", str(run), "--config", str(config), *FAST]
    )
    assert result.exit_code == 0, result.output
    assert "pooled OOF" in result.output and "auc" in result.output and "[" in result.output

    # config.yaml: the resolved config (flags applied)
    cfg = load_config(TrainConfig, run / "config.yaml")
    assert cfg.training.epochs == 12 and cfg.training.lr == 0.005 and cfg.splits.folds == 3 and cfg.model.hidden_dims == [16]
    assert json.loads((run / "classes.json").read_text()) == {"classes": ["normal", "tumor"], "class_index": {"normal": 0, "tumor": 1}}

    # splits.csv: long format, each slide once per fold, tested once, no case in two parts
    splits = _read_csv(run / "splits.csv")
    assert list(splits[0]) == ["slide_id", "case_id", "label", "fold", "split"]
    per_fold = defaultdict(list)
    for row in splits:
        per_fold[row["fold"]].append(row)
    assert sorted(per_fold) == ["0", "1", "2"]
    for rows in per_fold.values():
        assert sorted(r["slide_id"] for r in rows) == sorted(cohort.slide_ids)
        parts_of_case = defaultdict(set)
        for r in rows:
            parts_of_case[r["case_id"]].add(r["split"])
        assert all(len(p) == 1 for p in parts_of_case.values())
        assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert sorted(r["slide_id"] for r in splits if r["split"] == "test") == sorted(cohort.slide_ids)

    # history.jsonl: one line per fold x epoch, every loss term and validation metrics
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == sum(f["epochs_run"] for f in metrics["folds"])
    for key in ("fold", "epoch", "train_loss", "train_bag_ce", "train_recall", "train_consistency", "consistency_weight", "val_loss", "val_auc", "val_accuracy"):
        assert key in history[0]
    assert [h["epoch"] for h in history if h["fold"] == 0] == list(range(metrics["folds"][0]["epochs_run"]))

    # checkpoints
    for k in range(3):
        meta = json.loads((run / f"fold_{k}" / "model.json").read_text())
        assert (run / f"fold_{k}" / "model.safetensors").is_file()
        assert meta["classes"] == ["normal", "tumor"] and meta["model"]["name"] == "loss_attention"
        assert meta["feature_spec"]["encoder_name"] == "test_encoder" and meta["feature_spec"]["feature_dim"] == 12
        assert meta["training"]["best_epoch"] == metrics["folds"][k]["best_epoch"]

    # predictions.csv: out of fold, every slide once
    preds = _read_csv(run / "predictions.csv")
    assert list(preds[0]) == ["slide_id", "case_id", "label", "prob_normal", "prob_tumor", "predicted", "fold"]
    assert sorted(p["slide_id"] for p in preds) == sorted(cohort.slide_ids)
    test_fold = {r["slide_id"]: r["fold"] for r in splits if r["split"] == "test"}
    for p in preds:
        probs = [float(p["prob_normal"]), float(p["prob_tumor"])]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert p["predicted"] == ["normal", "tumor"][int(np.argmax(probs))]
        assert p["fold"] == test_fold[p["slide_id"]]

    # metrics.json: per fold and pooled, with intervals (learning itself: test_predict.py)
    pooled = metrics["pooled_out_of_fold"]
    for name in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
        assert set(pooled[name]) == {"value", "ci_low", "ci_high", "n_valid"}
        assert pooled[name]["ci_low"] <= pooled[name]["value"] <= pooled[name]["ci_high"]
        assert all(name in f["test"] for f in metrics["folds"])
    assert pooled["n_slides"] == 18 and pooled["class_counts"] == [9, 9]
    assert metrics["cohort"]["n_used"] == 18 and metrics["cohort"]["layout"] == "wsi-mil"

    # predict with the whole run (3 fold checkpoints averaged) on new slides
    new = planted_cohort(tmp_path / "new", n_slides=6, dim=12, shift=4.0, seed=5, prefix="new")
    out = tmp_path / "pred"
    result = CliRunner().invoke(predict, [str(new.features_dir), "--checkpoint", str(run), "--out", str(out), "--labels", str(new.labels_csv), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "predictions.csv")
    assert sorted(r["slide_id"] for r in rows) == new.slide_ids
    assert list(rows[0]) == ["slide_id", "case_id", "label", "prob_normal", "prob_tumor", "predicted", "n_tiles", "scored_by"]
    assert {r["scored_by"] for r in rows} == {"ensemble:3"}  # slides the run never saw: the folds' average
    for r in rows:
        with h5py.File(out / "scores" / f"{r['slide_id']}.h5") as f:
            n = int(r["n_tiles"])
            assert f["coords"].shape == (n, 2) and f["coords"].dtype == np.int64
            assert f["attention"].dtype == np.float32 and f["attention"][:].sum() == pytest.approx(1.0, abs=1e-5)
            assert f["instance_probabilities"].shape == (n, 2)
            np.testing.assert_allclose(f["instance_probabilities"][:].sum(1), 1.0, atol=1e-5)
            assert json.loads(f.attrs["class_names"]) == ["normal", "tumor"]
            bag = json.loads(f.attrs["bag_probabilities"])
            assert bag[1] == pytest.approx(float(r["prob_tumor"]), abs=1e-5)
            assert f.attrs["predicted_class"] == r["predicted"] and f.attrs["label"] == r["label"]
            assert f.attrs["n_checkpoints"] == 3 and f.attrs["model_name"] == "loss_attention"
            assert f.attrs["encoder_name"] == "test_encoder" and f.attrs["tile_px"] == 224
            assert f.attrs["mpp"] == 0.5 and f.attrs["footprint_px"] == 448 and f.attrs["slide_mpp"] == 0.25
            assert f.attrs["source_feature_file"].endswith(f"{r['slide_id']}.h5")
            with h5py.File(new.features_dir / f"{r['slide_id']}.h5") as src:
                np.testing.assert_array_equal(f["coords"][:], src["coords"][:])
    assert json.loads((out / "metrics.json").read_text())["labelled"]["n_slides"] == 6
    assert not list(out.rglob(".tmp-*"))

    # the same command again finds the run finished: nothing is trained, nothing rewritten
    stamp = (run / "metrics.json").stat().st_mtime_ns
    again = CliRunner().invoke(
        train, [str(cohort.features_dir.parent), "--labels", str(cohort.labels_csv), "--out", str(run), "--config", str(config), *FAST]
    )
    assert again.exit_code == 0 and (run / "metrics.json").stat().st_mtime_ns == stamp, again.output
    # another config into the same folder is refused unless --overwrite
    other = CliRunner().invoke(train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(run), *FAST, "--seed", "7"])
    assert other.exit_code == 2 and "another config" in other.output and "--overwrite" in other.output


def test_unmatched_slides_are_reported_and_refused_under_strict(tmp_path, caplog):
    cohort = planted_cohort(tmp_path / "c", n_slides=12, dim=8, shift=4.0)
    with open(cohort.labels_csv, "a") as fh:
        fh.write("ghost1,tumor,G1\nghost2,normal,G2\n")
    write_bag(cohort.features_dir / "orphan.h5", np.ones((5, 8), np.float32))
    config = TrainConfig.model_validate(
        {"model": {"hidden_dims": [8]}, "training": {"epochs": 1, "device": "cpu"}, "splits": {"folds": 2}, "metrics": {"n_bootstrap": 10}}
    )
    with caplog.at_level(logging.WARNING):
        result = run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "run", config)
    assert "2 of 14 labelled slides have no feature file: 'ghost1', 'ghost2'" in caplog.text
    assert "1 of 13 feature files have no label: 'orphan'" in caplog.text
    cohort_report = result.metrics["cohort"]
    assert cohort_report["labelled_without_features"] == ["ghost1", "ghost2"]
    assert cohort_report["features_without_labels"] == ["orphan"] and cohort_report["n_used"] == 12
    with pytest.raises(InputError, match="ghost1.*orphan"):
        run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "run2", config.model_copy(update={"strict": True}))


def test_non_finite_and_empty_bags_are_left_out_and_training_stays_finite(tmp_path, caplog):
    cohort = planted_cohort(tmp_path / "c", n_slides=12, dim=8, shift=4.0)
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    x[3, 2] = np.nan
    with h5py.File(cohort.features_dir / "nanslide.h5", "w") as f:  # a foreign writer, no write-time check
        f.create_dataset("features", data=x)
        f.create_dataset("coords", data=np.zeros((20, 2), np.int64))
        for k, v in {**bag_attrs("nanslide", 8), "complete": True}.items():
            f.attrs[k] = v
    write_bag(cohort.features_dir / "emptyslide.h5", np.zeros((0, 8), np.float32))
    with open(cohort.labels_csv, "a") as fh:
        fh.write("nanslide,tumor,N1\nemptyslide,normal,E1\n")
    config = TrainConfig.model_validate(
        {"model": {"hidden_dims": [8]}, "training": {"epochs": 2, "device": "cpu"}, "splits": {"folds": 2}, "metrics": {"n_bootstrap": 10}}
    )
    with caplog.at_level(logging.WARNING):
        result = run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "run", config)
    assert "NaN/Inf features: 'nanslide'" in caplog.text and "1 bag(s) with 0 tiles left out: 'emptyslide'" in caplog.text
    assert result.metrics["cohort"]["non_finite_bags"] == ["nanslide"] and result.metrics["cohort"]["empty_bags"] == ["emptyslide"]
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)
    preds = _read_csv(tmp_path / "run" / "predictions.csv")
    assert "nanslide" not in {p["slide_id"] for p in preds}
    out = CliRunner().invoke(
        train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "strict"), "--strict", *FAST]
    )
    assert out.exit_code == 2 and "nanslide" in out.output and "BagFileError" in out.output


def test_train_trusts_bags_their_writer_checked_and_recheck_scans_them(tmp_path):
    """A bag changed after its writer checked it (NaN written in place, attribute kept) is trusted by default,
    so its NaN reaches the loss and the error says how to find it; --recheck scans it and leaves it out."""
    from wsi_mil.mil import TrainingError

    cohort = planted_cohort(tmp_path / "c", n_slides=12, dim=8, shift=4.0)
    tampered = cohort.slide_ids[:3]
    for sid in tampered:
        with h5py.File(cohort.features_dir / f"{sid}.h5", "r+") as f:
            assert f.attrs["values_checked"] == "finite"
            f["features"][0, 0] = np.nan
    config = TrainConfig.model_validate(
        {"model": {"hidden_dims": [8]}, "training": {"epochs": 2, "device": "cpu"}, "splits": {"folds": 2}, "metrics": {"n_bootstrap": 10}}
    )
    with pytest.raises(TrainingError, match=r"loss became nan.*12 bag\(s\) were not scanned.*wsi-mil train --recheck"):
        run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "trusting", config)

    args = [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--device", "cpu", "--folds", "2", "--epochs", "2"]
    out = CliRunner().invoke(train, [*args, "--out", str(tmp_path / "strict"), "--recheck", "--strict"])
    assert out.exit_code == 2 and "BagFileError" in out.output and all(repr(s) in out.output for s in tampered)
    out = CliRunner().invoke(train, [*args, "--out", str(tmp_path / "run"), "--recheck"])
    assert out.exit_code == 0, out.output
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml").recheck is True
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sorted(metrics["cohort"]["non_finite_bags"]) == sorted(tampered)
    assert not set(tampered) & {p["slide_id"] for p in _read_csv(tmp_path / "run" / "predictions.csv")}


def test_leaky_splits_file_and_inconsistent_bags_fail_with_clear_errors(tmp_path):
    cohort = planted_cohort(tmp_path / "c", n_slides=12, dim=8, two_slide_cases=1)  # s000 and s002 share case P000
    splits = tmp_path / "splits.csv"
    rows = ["slide_id,case_id,label,fold,split"]
    rows += [f"{s},{c},{lab},0,{'test' if s == 's002' or i % 4 == 3 else 'train'}" for i, (s, c, lab) in enumerate(zip(cohort.slide_ids, cohort.cases, cohort.labels, strict=True))]
    splits.write_text("\n".join(rows) + "\n")
    out = CliRunner().invoke(
        train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "r1"), "--splits", str(splits), *FAST]
    )
    assert out.exit_code == 2 and "SplitLeakageError" in out.output and "case 'P000'" in out.output and "fold 0" in out.output

    with h5py.File(cohort.features_dir / "s005.h5", "a") as f:  # R28: coords one row short
        coords = f["coords"][:-1]
        del f["coords"]
        f.create_dataset("coords", data=coords)
    out = CliRunner().invoke(train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "r2"), *FAST])
    assert out.exit_code == 2 and "slide 's005'" in out.output and "coords" in out.output


def test_run_folder_is_refused_without_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    cohort = planted_cohort(tmp_path / "c", n_slides=8, dim=8)
    with pytest.raises(OutputConflictError, match="--overwrite"):
        run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "run", TrainConfig())


def test_multi_class_on_clam_pt_files_then_predict(tmp_path):
    """Three classes, CLAM's pt_files layout (no coords): macro one-vs-rest AUC, scores with coords -1."""
    rng = np.random.default_rng(0)
    directions = np.eye(8, dtype=np.float32)[:3] * 4.0
    pt_dir = tmp_path / "clam" / "pt_files"
    pt_dir.mkdir(parents=True)
    lines = ["slide_id,label"]
    for i in range(18):
        cls = i % 3
        x = rng.normal(size=(int(rng.integers(20, 40)), 8)).astype(np.float32)
        x[:4] += directions[cls]
        torch.save(torch.from_numpy(x), pt_dir / f"{i:03d}.pt")
        lines.append(f"{i:03d},{['alpha', 'beta', 'gamma'][cls]}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    config = TrainConfig.model_validate(
        {"model": {"hidden_dims": [8]}, "training": {"epochs": 3, "device": "cpu", "lr": 0.005}, "splits": {"folds": 3}, "metrics": {"n_bootstrap": 50}}
    )
    result = run_train(tmp_path / "clam", tmp_path / "labels.csv", tmp_path / "run", config)
    assert result.classes == ["alpha", "beta", "gamma"] and result.metrics["cohort"]["layout"] == "clam"
    pooled = result.metrics["pooled_out_of_fold"]
    assert pooled["auc"]["value"] is not None and pooled["class_counts"] == [6, 6, 6]
    meta = json.loads((tmp_path / "run" / "fold_0" / "model.json").read_text())
    assert meta["feature_spec"]["encoder_name"] is None and meta["feature_spec"]["feature_dim"] == 8
    preds = _read_csv(tmp_path / "run" / "predictions.csv")
    assert {"prob_alpha", "prob_beta", "prob_gamma"} <= set(preds[0])
    out = CliRunner().invoke(predict, [str(tmp_path / "clam"), "--checkpoint", str(tmp_path / "run" / "fold_1"), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    with h5py.File(tmp_path / "pred" / "scores" / "000.h5") as f:
        assert (f["coords"][:] == -1).all() and f["instance_probabilities"].shape[1] == 3
        assert f.attrs["tile_px"] == -1 and np.isnan(f.attrs["mpp"]) and f.attrs["encoder_name"] == ""


def test_classes_on_the_command_line_name_a_label_outside_them(tmp_path):
    cohort = planted_cohort(tmp_path / "c", n_slides=8, dim=8)
    lines = cohort.labels_csv.read_text().splitlines()
    row = lines[3].split(",")
    row[1] = "metastasis"
    lines[3] = ",".join(row)
    cohort.labels_csv.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "r"),
                "--classes", "normal,tumor", "--epochs", "1"],
    )
    assert result.exit_code == 2, result.output
    assert "line 4: 'metastasis'" in result.output and "['normal', 'tumor']" in result.output
    # without --classes, the single-case third class is named too
    result = CliRunner().invoke(
        train, [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(tmp_path / "r2"), "--epochs", "1"],
    )
    assert result.exit_code == 2 and "class 'metastasis' has a single case" in result.output, result.output


def test_epoch_lines_go_to_the_run_log_not_the_terminal(tmp_path, caplog):
    cohort = planted_cohort(tmp_path / "c", n_slides=8, dim=8, two_slide_cases=0)
    config = TrainConfig.model_validate(
        {"training": {"epochs": 3, "device": "cpu", "early_stopping_patience": None}, "splits": {"folds": 2},
         "metrics": {"n_bootstrap": 0}, "model": {"hidden_dims": [8]}}
    )
    with caplog.at_level(logging.INFO):
        run_train(cohort.features_dir, cohort.labels_csv, tmp_path / "run", config)
    epoch_records = [r for r in caplog.records if r.levelno >= logging.INFO and "epoch 1:" in r.getMessage()]
    assert not epoch_records, [r.getMessage() for r in epoch_records]
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"fold {f} epoch {e}" for f in range(2) for e in range(3)]
    assert all("train_loss=" in line and "val_loss=" in line for line in lines)


@pytest.mark.parametrize("model", ["loss_attention", "abmil"])
def test_wsi_mil_train_and_the_library_trainer_train_with_the_same_objective(tmp_path, model):
    """No objective setting anywhere: `wsi-mil train` trains with what Trainer(model, TrainerConfig())
    resolves (loss_attention: ObjectiveSettings(); the baselines: the bag cross-entropy alone)."""
    cohort = planted_cohort(tmp_path / "c", n_slides=8, dim=8)
    run = tmp_path / "run"
    args = [str(cohort.features_dir), "--labels", str(cohort.labels_csv), "--out", str(run), "--config", str(_fast_config(tmp_path))]
    result = CliRunner().invoke(train, [*args, "--model", model, "--epochs", "2", "--folds", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    library = Trainer(create_model(model, 8, 2), TrainerConfig()).objective
    assert library == (ObjectiveSettings() if model == "loss_attention" else BAG_CE_ONLY)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [f["objective"] for f in metrics["folds"]] == [asdict(library)] * 2
    assert load_config(TrainConfig, run / "config.yaml").training.recall_weight is None
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    if model == "loss_attention":
        assert all(h["train_recall"] > 0 for h in history)
        assert all(h["consistency_weight"] == pytest.approx(library.consistency_max * np.exp(-5 * 0.81)) for h in history if h["epoch"] == 1)
    else:
        assert all(h["train_recall"] == 0 and h["train_consistency"] == 0 and h["val_recall"] == 0 for h in history)


def test_an_objective_setting_for_a_baseline_is_refused_before_any_bag_is_read(tmp_path):
    config = _fast_config(tmp_path, recall_weight=0.3)
    (tmp_path / "features").mkdir()  # no bag at all: a later check would complain about that instead
    (tmp_path / "labels.csv").write_text("slide_id,label\na,0\nb,1\n")
    run = tmp_path / "run"
    args = [str(tmp_path / "features"), "--labels", str(tmp_path / "labels.csv"), "--out", str(run), "--config", str(config)]
    out = CliRunner().invoke(train, [*args, "--model", "abmil"])
    assert out.exit_code == 2
    assert "training.recall_weight is an option of loss_attention only; model 'abmil'" in out.output
    assert "remove the key" in out.output and not run.exists()
    # a TrainConfig built in Python for run_train is refused as it is built
    with pytest.raises(ValueError, match="training.recall_weight is an option of loss_attention only; model 'mean'"):
        TrainConfig.model_validate({"model": {"name": "mean"}, "training": {"recall_weight": 0.3}})
